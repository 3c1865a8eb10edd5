"""The training workflow, read top to bottom: config in, run directory out.

    model dir ─▶ data stage (Ray Data) ─▶ reference actors ─▶ Ray Train + DeepSpeed ─▶ summary

Run directory layout::

    <output.root>/<output.name>/
        config.yaml        the resolved config
        quarantine.jsonl   rejected records with file, row and reason (possibly empty)
        metrics.jsonl      one row per logging step
        summary.json       the final numbers and where everything is
        model/             the trained policy (Hugging Face format, safetensors)
        ray/               Ray Train's storage: checkpoints

With ``output.storage`` set, the same layout is kept at ``<storage>/<name>/`` (see rayalign.storage).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.data import DataReport, prepare_pairs, shuffled, split_heldout
from rayalign.metrics import read_jsonl
from rayalign.models import resolve_run_model
from rayalign.refcache import describe, scored_pairs_cached
from rayalign.reference import add_reference_logps
from rayalign.runtime import ResourceDemand, init_ray
from rayalign.storage import upload
from rayalign.synthetic import generate, write_jsonl
from rayalign.train import METRICS_FILE, fit, read_checkpoint_file

SUMMARY_METRICS = ("rewards/accuracies", "pref/absolute_accuracy", "pref/frac_in_U", "rewards/margins")


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = cfg.output.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", "quarantine.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def data_paths(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The configured files, or the synthetic task written into the run directory."""
    if cfg.data.paths:
        return list(cfg.data.paths)
    assert cfg.data.synthetic is not None
    return [str(write_jsonl(generate(cfg.data.synthetic), run_dir / "data" / "synthetic.jsonl"))]


def summarize(
    cfg: RunConfig, run_dir: Path, model_dir: Path, data_report: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise RuntimeError(f"training logged no steps: {run_dir / 'metrics.jsonl'} is empty")
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
            "config": str(run_dir / "config.yaml"),
            "metrics": str(run_dir / "metrics.jsonl"),
            "quarantine": str(run_dir / "quarantine.jsonl"),
            "model": f"{storage}/model",
            "base_model": str(model_dir),
            "checkpoints": f"{storage}/ray",
            "storage": storage,
        },
    }


@dataclass(frozen=True)
class PreparedData:
    """The opening of every workflow: the starting weights, the data files, and the validated,
    tokenized pairs (in the object store) with their counts and quarantine."""

    model_dir: Path
    paths: list[str]
    pairs: Dataset
    report: DataReport


@dataclass(frozen=True)
class ReferenceSource:
    """How the reference log-probs were obtained (``summary.json``'s ``reference``)."""

    backend: str
    cache: dict[str, Any] | None = None  # the cache entry (key, path, hit), when scored through it
    scored_by_sweep_driver: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoredPairs:
    """What the reference stage hands to training."""

    train: Dataset  # reference-scored training pairs, shuffled
    num_train: int
    heldout: Dataset | None  # scored held-out pairs, in the object store (every evaluation re-reads them)
    source: ReferenceSource


def prepare_data(cfg: RunConfig, out_dir: Path, demand: ResourceDemand) -> PreparedData:
    """Resolve the model, connect to Ray (checking ``demand`` fits), read and tokenize the data."""
    model_dir = resolve_run_model(cfg)
    init_ray(cfg.ray, demand)
    paths = data_paths(cfg, out_dir)
    pairs, report = prepare_pairs(cfg, paths, model_dir, out_dir)
    print(f"[rayalign] {report.summary_line()}", flush=True)
    return PreparedData(model_dir, paths, pairs, report)


def score_reference(cfg: RunConfig, data: PreparedData) -> ScoredPairs:
    """Reference-score ``data``'s pairs and split off the held-out pairs.

    With ``reference.cache`` the reference runs once into Parquet (or is read from an earlier
    run); otherwise the reference actors stream straight into training. The small held-out
    split is scored once and kept in the object store, since every evaluation re-reads it.
    """
    if cfg.reference.cache:
        scored, info = scored_pairs_cached(data.pairs, cfg, data.model_dir, data.paths)
        print(f"[rayalign] reference cache {'hit' if info.hit else 'miss'}: {info.path}", flush=True)
        return split_scored(cfg, scored, ReferenceSource(cfg.reference.backend, describe(info)), data.report.ok)

    train, heldout = split_heldout(data.pairs, cfg)
    if heldout is not None:
        heldout = add_reference_logps(heldout, cfg, data.model_dir).materialize()
    num_train = train.count() if heldout is not None else data.report.ok
    train = add_reference_logps(shuffled(train, cfg), cfg, data.model_dir)
    if cfg.train.epochs > 1:
        # Streaming would re-score the reference every epoch; keep one scored copy in the object store.
        train = train.materialize()
    return ScoredPairs(train, num_train, heldout, ReferenceSource(cfg.reference.backend))


def split_scored(cfg: RunConfig, scored: Dataset, source: ReferenceSource, num_scored: int) -> ScoredPairs:
    """Already-scored pairs (``num_scored`` of them) -> shuffled training split and held-out split."""
    train, heldout = split_heldout(scored, cfg)
    if heldout is None:
        return ScoredPairs(shuffled(train, cfg), num_scored, None, source)
    return ScoredPairs(shuffled(train, cfg), train.count(), heldout.materialize(), source)


def train_stage(
    cfg: RunConfig,
    run_dir: Path,
    model_dir: Path,
    scored: ScoredPairs,
    data_report: dict[str, Any],
    started: float,
    callbacks: list | None = None,
    resume_name: str | None = None,
) -> dict[str, Any]:
    """Fit on ``scored``; write and return summary.json."""
    result = fit(cfg, scored.train, scored.num_train, model_dir, run_dir, scored.heldout, callbacks, resume_name)
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint; see {run_dir / METRICS_FILE}")
    # The final checkpoint holds rank 0's metrics: the driver may be on another node than rank 0.
    (run_dir / METRICS_FILE).write_bytes(read_checkpoint_file(result.checkpoint, METRICS_FILE))
    summary = summarize(cfg, run_dir, model_dir, data_report, time.perf_counter() - started)
    summary["reference"] = scored.source.as_dict()
    if scored.heldout is not None:
        summary["reference"]["heldout_pairs"] = scored.heldout.count()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for name in ("config.yaml", "quarantine.jsonl", METRICS_FILE, "summary.json"):
        if (run_dir / name).exists():
            upload(run_dir / name, f"{cfg.output.run_storage}/{name}")
    return summary


def run_train(cfg: RunConfig) -> dict[str, Any]:
    """Train one policy end to end and write its run directory; returns the summary."""
    started = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    data = prepare_data(cfg, run_dir, ResourceDemand.of_run(cfg))
    scored = score_reference(cfg, data)
    return train_stage(cfg, run_dir, data.model_dir, scored, data.report.as_dict(), started)


def run_reference(cfg: RunConfig) -> dict[str, Any]:
    """The reference pass alone: score every pair into the reference cache, so later training runs
    and sweeps with the same model and data read it instead of starting reference actors.
    Writes ``<run_dir>/reference/reference.json`` and returns it."""
    started = time.perf_counter()
    out_dir = cfg.output.run_dir / "reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"cache": True})})
    data = prepare_data(cfg, out_dir, ResourceDemand.of_run(cfg, train=False))
    scored, info = scored_pairs_cached(data.pairs, cfg, data.model_dir, data.paths)
    report = {
        "backend": cfg.reference.backend,
        "cache": describe(info),
        "scored_pairs": scored.count(),
        "data": data.report.as_dict(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "reference.json").write_text(json.dumps(report, indent=2))
    return report
