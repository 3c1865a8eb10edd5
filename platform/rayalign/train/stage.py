"""The training stage: fit on the reference stage's :class:`ScoredPairs`, then write ``summary.json``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import TrainingFailedError

from rayalign.config import RunConfig
from rayalign.console import Console, TrainingProgress
from rayalign.data.stage import PreparedData
from rayalign.diagnostics.report import plot_runs
from rayalign.errors import TrainingDiverged, TrainingIncomplete
from rayalign.metrics import (
    ACTION,
    DISPLACEMENT,
    LOSS,
    RESUMED_FROM_STEP,
    STEP,
    SUMMARY_KEYS,
    actions,
    alarms,
    eval_key,
    heldout,
)
from rayalign.models import ModelSource, load_tokenizer
from rayalign.storage import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    QUARANTINE_FILE,
    RAY_TRAIN_DIR,
    SUMMARY_FILE,
    read_jsonl,
    run_location,
    upload,
    write_local,
)
from rayalign.tracking import SweepMembership, open_trackers
from rayalign.train.batching import LayoutCost, layout_cost
from rayalign.train.checkpoint import read_checkpoint_file
from rayalign.train.progress import relayed_progress
from rayalign.train.steps import step_plan
from rayalign.train.trainer import TrainingInputs, best_model, fit, worker_plan

log = logging.getLogger(__name__)

PREFLIGHT_SAMPLE_PAIRS = 256


def preflight(cfg: RunConfig, data: PreparedData) -> LayoutCost:
    """What training will pay for, measured on the first pairs before it starts; printed, and kept in summary.json.

    Raises DataQualityError (one line) first when the usable pairs cannot make one optimizer step, before
    the reference or any worker starts.
    """
    step_plan(cfg.train, cfg.scaling.num_workers, data.report.ok)
    cost = layout_cost(data.pairs.take(PREFLIGHT_SAMPLE_PAIRS), cfg, load_tokenizer(data.model.driver_dir).pad_token_id)
    log.info(cost.line())
    return cost


def _diverged(err: TrainingFailedError) -> TrainingDiverged | None:
    """The TrainingDiverged a worker raised, if that is why training failed (Ray Train keeps each worker's error)."""
    for failure in getattr(err, "worker_failures", {}).values():
        for cause in (failure, getattr(failure, "cause", None), failure.__cause__):
            if isinstance(cause, TrainingDiverged):
                return cause
    return None


def summarize(cfg: RunConfig, model: ModelSource, data_report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """``summary.json``: first and last metrics, alarms, held-out metrics, data counts, where the files are."""
    run_dir = cfg.output.run_dir
    rows = read_jsonl(run_dir / METRICS_FILE)
    if not rows:
        raise RuntimeError(f"training logged no steps: {run_dir / METRICS_FILE} is empty")
    # Average a few rows at each end so one noisy micro-batch does not decide "loss fell".
    k = max(1, min(3, len(rows) // 4))
    # A key needing the reference is absent where none was scored (a loss that needs none): left out here too.
    keys = [key for key in (LOSS, *SUMMARY_KEYS) if all(key in r for r in rows)]
    first = {key: sum(r[key] for r in rows[:k]) / k for key in keys}
    last = {key: sum(r[key] for r in rows[-k:]) / k for key in keys}
    resumed = [r[RESUMED_FROM_STEP] for r in rows if RESUMED_FROM_STEP in r]
    evaluated = [r for r in rows if eval_key(LOSS) in r]
    storage = cfg.output.run_storage
    taken = actions(rows)
    stopped = next((a for a in taken if a[ACTION] == "stopped"), None)
    best = best_model(cfg)
    best_record = best.record() if best is not None else None
    exported = (
        {"model": "best", **best_record}
        if best_record is not None and (cfg.monitor.keep_best or stopped)
        else {"model": "last", STEP: rows[-1][STEP]}
    )
    return {
        "run": cfg.output.name,
        "loss_type": cfg.loss.type,
        "steps": rows[-1][STEP],
        "first": first,
        "last": last,
        "loss_decreased": last[LOSS] < first[LOSS],
        "pathology_alarm": bool(alarms(rows)),
        "alarms": alarms(rows),
        "displacement_alarms": [{STEP: r[STEP], "reason": r[DISPLACEMENT]} for r in rows if DISPLACEMENT in r],
        "actions": taken,
        "stopped_on_alarm": stopped is not None,
        "exported": exported,
        "resumed_from_steps": resumed,
        "heldout": heldout(evaluated[-1]) if evaluated else None,
        "data": data_report,
        "wall_seconds": round(wall_s, 1),
        "files": {
            "run_dir": str(run_dir),
            "config": str(run_dir / CONFIG_FILE),
            "metrics": str(run_dir / METRICS_FILE),
            "quarantine": str(run_dir / QUARANTINE_FILE),
            "model": f"{storage}/{MODEL_DIR}",
            "base_model": str(model.stored or model.driver_dir),
            "checkpoints": f"{storage}/{RAY_TRAIN_DIR}",
            "storage": storage,
        },
    }


@dataclass(frozen=True)
class TrainingHooks:
    """Who else takes part in a training run: ``console`` shows its progress (None: nowhere, as in a sweep's
    trials); ``callbacks`` are Ray Train callbacks (a sweep trial's report to Tune); ``sweep`` is the sweep a
    trial's tracker runs belong to."""

    console: Console | None = None
    callbacks: tuple = ()
    sweep: SweepMembership | None = None
    # Once a run ends with its model exported: an evaluation by generation (eval.generation.after_training),
    # returning its ``eval/gen/*`` numbers for summary.json and the trackers.
    after_training: Callable[[], dict[str, Any]] | None = None


def last_step_checkpoint(result):
    """The kept checkpoint (``ray.train.Checkpoint``) of the latest step in Ray Train's ``result``, or None.

    Not ``result.checkpoint``, the last one registered: across a restart of the workers, registration order need
    not be step order (a report of the failed group can arrive late)."""
    kept = result.best_checkpoints or []
    if not kept:
        return result.checkpoint
    return max(kept, key=lambda kept_one: kept_one[1].get(STEP, -1))[0]


def train_stage(cfg: RunConfig, inputs: TrainingInputs, hooks: TrainingHooks = TrainingHooks()) -> dict[str, Any]:
    """Fit on ``inputs.scored`` into ``cfg.output.run_dir``; write and return summary.json (with the pre-flight
    :class:`LayoutCost`) and the run's plot; the trackers get all of it.

    Raises TrainingDiverged (the loss stopped being finite), TrainingIncomplete (the data ran out), or Ray
    Train's TrainingFailedError."""
    run_dir, scored = cfg.output.run_dir, inputs.scored
    trackers = open_trackers(cfg, hooks.sweep)
    steps = step_plan(cfg.train, cfg.scaling.num_workers, scored.num_train)
    planned = steps.total
    progress = TrainingProgress(hooks.console, planned, cfg.output.name)
    consumers = ([progress.show] if hooks.console is not None else []) + ([trackers.log_step] if trackers.runs else [])
    try:
        with relayed_progress(consumers) if consumers else nullcontext() as board:
            result = fit(cfg, worker_plan(cfg, inputs, steps, board), scored, list(hooks.callbacks))
    except TrainingFailedError as err:
        trackers.finish(failed=True)
        diverged = _diverged(err)
        if diverged is not None:
            raise TrainingDiverged(*diverged.args) from None  # the worker's own message, not Ray's traceback
        raise
    except BaseException:
        trackers.finish(failed=True)
        raise
    finally:
        progress.close()
    final = last_step_checkpoint(result)
    if final is None:
        raise RuntimeError(f"training ended without a checkpoint; see {run_dir / METRICS_FILE}")
    # The final checkpoint holds rank 0's metrics: the driver may be on another node than rank 0.
    write_local(run_dir / METRICS_FILE, read_checkpoint_file(final, METRICS_FILE))
    summary = summarize(cfg, inputs.model, inputs.data_report, time.perf_counter() - inputs.started)
    summary["preflight"] = inputs.preflight
    summary["planned_steps"] = planned
    summary["complete"] = summary["steps"] >= planned
    summary["reference"] = scored.source.as_dict()
    if scored.heldout is not None:
        summary["reference"]["heldout_pairs"] = scored.heldout.count()
    if hooks.after_training is not None and (summary["complete"] or summary["stopped_on_alarm"]):
        try:
            summary["generation"] = hooks.after_training()
        except Exception as err:  # the run trained and exported its model: a failed evaluation must not lose it
            log.error("evaluation after training failed: %s: %s", type(err).__name__, err)
            summary["generation"] = {"error": f"{type(err).__name__}: {err}"}
        else:
            trackers.log_step({STEP: summary["steps"], **summary["generation"]})
    write_local(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    plot = plot_runs([run_dir])
    for path in (
        run_dir / CONFIG_FILE,
        run_dir / QUARANTINE_FILE,
        run_dir / METRICS_FILE,
        run_dir / SUMMARY_FILE,
        plot,
    ):
        if path.exists():
            upload(path, run_location(cfg.output) / path.name)
    if summary["steps"] < planned and not summary["stopped_on_alarm"]:
        trackers.finish(summary, [plot, run_dir / METRICS_FILE], failed=True)
        raise TrainingIncomplete(
            f"training ended at step {summary['steps']} of the {planned} planned: the workers' data ran out"
            + (
                f" after a restore from step {summary['resumed_from_steps'][-1]}"
                if summary["resumed_from_steps"]
                else " after a restart of the workers"
                if cfg.train.max_failures
                else ""
            )
            + ". A reference streamed into training is not read again when Ray Train restarts the workers: "
            "set reference.cache: true when using train.max_failures, so that a restart re-reads the scored "
            f"pairs from storage. The run's files (summary.json says complete: false) are in {cfg.output.run_storage}"
        )
    generation_plot = [Path(summary["generation"]["files"]["plot"])] if "files" in summary.get("generation", {}) else []
    trackers.finish(summary, [plot, run_dir / METRICS_FILE, *generation_plot])
    return summary
