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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.data import prepare_pairs, shuffled
from rayalign.metrics import read_jsonl
from rayalign.models import resolve_model_dir
from rayalign.refcache import describe, scored_pairs_cached
from rayalign.reference import add_reference_logps
from rayalign.runtime import init_ray
from rayalign.synthetic import generate, write_jsonl
from rayalign.train import fit

SUMMARY_METRICS = ("rewards/accuracies", "pref/absolute_accuracy", "pref/frac_in_U", "rewards/margins")


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = cfg.output.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", "quarantine.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def resolve_run_model(cfg: RunConfig) -> Path:
    """The starting weights' directory; tiny models are built once under <output.root>/_models."""
    return resolve_model_dir(cfg.model, cache_root=Path(cfg.output.root).expanduser().resolve() / "_models")


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
    return {
        "run": cfg.output.name,
        "loss_type": cfg.loss.type,
        "steps": rows[-1]["step"],
        "first": first,
        "last": last,
        "loss_decreased": last["loss"] < first["loss"],
        "data": data_report,
        "wall_seconds": round(wall_s, 1),
        "files": {
            "run_dir": str(run_dir),
            "config": str(run_dir / "config.yaml"),
            "metrics": str(run_dir / "metrics.jsonl"),
            "quarantine": str(run_dir / "quarantine.jsonl"),
            "model": str(run_dir / "model"),
            "base_model": str(model_dir),
            "checkpoints": str(run_dir / "ray"),
        },
    }


def reference_stage(cfg: RunConfig, pairs: Dataset, model_dir: Path, paths: list[str]) -> tuple[Dataset, dict]:
    """Scored, shuffled pairs ready for training, and how the reference was obtained.

    With ``reference.cache`` the reference runs once into Parquet (or is read from an
    earlier run); otherwise the reference actors stream straight into training.
    """
    if cfg.reference.cache:
        scored, info = scored_pairs_cached(pairs, cfg, model_dir, paths)
        state = "hit" if info.hit else "miss"
        print(f"[rayalign] reference cache {state}: {info.path}", flush=True)
        return shuffled(scored, cfg), {"backend": cfg.reference.backend, "cache": describe(info)}
    scored = add_reference_logps(shuffled(pairs, cfg), cfg, model_dir)
    if cfg.train.epochs > 1:
        # Streaming would re-score the reference every epoch; keep one scored copy in the object store.
        scored = scored.materialize()
    return scored, {"backend": cfg.reference.backend, "cache": None}


def run_train(cfg: RunConfig) -> dict[str, Any]:
    """Train one policy end to end and write its run directory; returns the summary."""
    start = time.perf_counter()
    run_dir = prepare_run_dir(cfg)
    model_dir = resolve_run_model(cfg)
    init_ray(cfg.ray)

    paths = data_paths(cfg, run_dir)
    pairs, data_report = prepare_pairs(cfg, paths, model_dir, run_dir)
    print(f"[rayalign] {data_report.summary_line()}", flush=True)
    scored, reference = reference_stage(cfg, pairs, model_dir, paths)
    fit(cfg, scored, data_report.ok, model_dir, run_dir)

    summary = summarize(cfg, run_dir, model_dir, data_report.as_dict(), time.perf_counter() - start)
    summary["reference"] = reference
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summaries(summaries: list[dict[str, Any]]) -> str:
    """A terminal table: one line per run, first → last of each headline metric."""
    header = f"{'run':<16}{'loss':>22}{'reward acc':>16}{'abs pref acc':>16}{'frac in U':>16}  run dir"
    lines = [header, "-" * len(header)]
    for s in summaries:
        f, l = s["first"], s["last"]
        cells = [
            f"{f['loss']:.4f} → {l['loss']:.4f}",
            f"{f['rewards/accuracies']:.2f} → {l['rewards/accuracies']:.2f}",
            f"{f['pref/absolute_accuracy']:.2f} → {l['pref/absolute_accuracy']:.2f}",
            f"{f['pref/frac_in_U']:.2f} → {l['pref/frac_in_U']:.2f}",
        ]
        lines.append(
            f"{s['run']:<16}{cells[0]:>22}{cells[1]:>16}{cells[2]:>16}{cells[3]:>16}  {s['files']['run_dir']}"
        )
    return "\n".join(lines)
