"""The training stage: fit on the reference stage's :class:`ScoredPairs`, then write ``summary.json``."""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import nullcontext
from typing import Any

from ray.train import TrainingFailedError

from rayalign.config import RunConfig
from rayalign.console import Console, TrainingProgress
from rayalign.data.stage import PreparedData
from rayalign.errors import TrainingDiverged, TrainingIncomplete
from rayalign.models import ModelSource, load_tokenizer
from rayalign.reference.stage import ScoredPairs
from rayalign.storage import (
    CONFIG_FILE,
    METRICS_FILE,
    QUARANTINE_FILE,
    SUMMARY_FILE,
    read_jsonl,
    run_location,
    upload,
    write_local,
)
from rayalign.train.checkpoint import read_checkpoint_file
from rayalign.diagnostics.report import plot_runs
from rayalign.tracking import SweepMembership, open_trackers
from rayalign.train.batching import LayoutCost, layout_cost
from rayalign.train.progress import relayed_progress
from rayalign.train.trainer import fit, planned_steps

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("rewards/accuracies", "pref/absolute_accuracy", "pref/frac_in_U", "rewards/margins")
PREFLIGHT_SAMPLE_PAIRS = 256


def preflight(cfg: RunConfig, data: PreparedData) -> LayoutCost:
    """What training will pay for, measured on the first pairs before it starts; printed, and kept in summary.json.

    Raises DataQualityError (one line) first when the usable pairs cannot make one optimizer step, before
    the reference or any worker starts.
    """
    planned_steps(cfg.train, cfg.scaling.num_workers, data.report.ok)
    cost = layout_cost(data.pairs.take(PREFLIGHT_SAMPLE_PAIRS), cfg.train, cfg.model.attn_implementation,
                       cfg.scaling.num_workers, load_tokenizer(data.model.driver_dir).pad_token_id)
    log.info(cost.line())
    return cost


def summarize(cfg: RunConfig, model: ModelSource, data_report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """``summary.json``: first and last metrics, alarms, held-out metrics, data counts, where the files are."""
    run_dir = cfg.output.run_dir
    rows = read_jsonl(run_dir / METRICS_FILE)
    if not rows:
        raise RuntimeError(f"training logged no steps: {run_dir / METRICS_FILE} is empty")
    # Average a few rows at each end so one noisy micro-batch does not decide "loss fell".
    k = max(1, min(3, len(rows) // 4))
    first = {key: sum(r[key] for r in rows[:k]) / k for key in ("loss", *SUMMARY_METRICS)}
    last = {key: sum(r[key] for r in rows[-k:]) / k for key in ("loss", *SUMMARY_METRICS)}
    alarms = [{"step": r["step"], "reason": r["alarm"]} for r in rows if "alarm" in r]
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    evaluated = [r for r in rows if "eval/loss" in r]
    storage = cfg.output.run_storage
    return {
        "run": cfg.output.name,
        "loss_type": cfg.loss.type,
        "steps": rows[-1]["step"],
        "first": first,
        "last": last,
        "loss_decreased": last["loss"] < first["loss"],
        "pathology_alarm": bool(alarms),
        "alarms": alarms,
        "resumed_from_steps": resumed,
        "heldout": {k: v for k, v in evaluated[-1].items() if k.startswith("eval/")} if evaluated else None,
        "data": data_report,
        "wall_seconds": round(wall_s, 1),
        "files": {
            "run_dir": str(run_dir),
            "config": str(run_dir / CONFIG_FILE),
            "metrics": str(run_dir / METRICS_FILE),
            "quarantine": str(run_dir / QUARANTINE_FILE),
            "model": f"{storage}/model",
            "base_model": str(model.stored or model.driver_dir),
            "checkpoints": f"{storage}/ray",
            "storage": storage,
        },
    }


def train_stage(
    cfg: RunConfig,
    model: ModelSource,
    scored: ScoredPairs,
    data_report: dict[str, Any],
    started: float,
    preflight: dict[str, Any] | None = None,
    callbacks: list | None = None,
    console: Console | None = None,
    sweep: SweepMembership | None = None,
) -> dict[str, Any]:
    """Fit on ``scored`` into ``cfg.output.run_dir``; write and return summary.json (with ``preflight``,
    a :class:`LayoutCost` as a dict) and the run's plot; the trackers get all of it.

    ``callbacks``: Ray Train callbacks (a sweep trial's report to Tune).
    ``console``: where the progress shows (None: no progress, as in a sweep's trials). ``sweep``: the
    sweep a trial's tracker runs belong to.
    """
    run_dir = cfg.output.run_dir
    trackers = open_trackers(cfg, sweep)
    planned = planned_steps(cfg.train, cfg.scaling.num_workers, scored.num_train)
    progress = TrainingProgress(console, planned, cfg.output.name)
    consumers = ([progress.show] if console is not None else []) + ([trackers.log_step] if trackers.runs else [])
    try:
        with relayed_progress(consumers) if consumers else nullcontext() as board:
            result = fit(cfg, scored.train, scored.num_train, model, scored.heldout, callbacks, progress=board)
    except TrainingFailedError as err:
        trackers.finish(failed=True)
        # The worker's own message, not Ray's traceback of it.
        diverged = re.search(rf"{TrainingDiverged.__name__}: (.*)", str(err))
        if diverged:
            raise TrainingDiverged(diverged.group(1)) from None
        raise
    except BaseException:
        trackers.finish(failed=True)
        raise
    finally:
        progress.close()
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint; see {run_dir / METRICS_FILE}")
    # The final checkpoint holds rank 0's metrics: the driver may be on another node than rank 0.
    write_local(run_dir / METRICS_FILE, read_checkpoint_file(result.checkpoint, METRICS_FILE))
    summary = summarize(cfg, model, data_report, time.perf_counter() - started)
    summary["preflight"] = preflight
    summary["planned_steps"] = planned
    summary["complete"] = summary["steps"] >= planned
    summary["reference"] = scored.source.as_dict()
    if scored.heldout is not None:
        summary["reference"]["heldout_pairs"] = scored.heldout.count()
    write_local(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    plot = plot_runs([run_dir])
    for path in (run_dir / CONFIG_FILE, run_dir / QUARANTINE_FILE, run_dir / METRICS_FILE, run_dir / SUMMARY_FILE, plot):
        if path.exists():
            upload(path, run_location(cfg.output) / path.name)
    if summary["steps"] < planned:
        trackers.finish(summary, [plot, run_dir / METRICS_FILE], failed=True)
        raise TrainingIncomplete(
            f"training ended at step {summary['steps']} of the {planned} planned: the workers' data ran out"
            + (f" after a restore from step {summary['resumed_from_steps'][-1]}" if summary["resumed_from_steps"]
               else " after a restart of the workers" if cfg.train.max_failures else "")
            + ". A reference streamed into training is not read again when Ray Train restarts the workers: "
            "set reference.cache: true when using train.max_failures, so that a restart re-reads the scored "
            f"pairs from storage. The run's files (summary.json says complete: false) are in {cfg.output.run_storage}")
    trackers.finish(summary, [plot, run_dir / METRICS_FILE])
    return summary
