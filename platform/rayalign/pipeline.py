"""The training workflows, read top to bottom: config in, run directory out.

    model dir ─▶ data stage (Ray Data) ─▶ reference stage (actors or cache) ─▶ Ray Train + DeepSpeed ─▶ summary
                 rayalign.data            rayalign.reference                   rayalign.train

Each stage is one public function that takes the run's config and the previous stage's typed
value: ``prepare_data`` → :class:`PreparedData`, ``score_reference`` → :class:`ScoredPairs`,
``train_stage`` → ``summary.json``. The sweep (``rayalign.tune``) composes the same stages.

Run directory layout::

    <output.root>/<output.name>/
        config.yaml        the resolved config
        quarantine.jsonl   rejected records with file, row and reason (possibly empty)
        metrics.jsonl      one row per logging step
        summary.json       the final numbers and where everything is
        evaluate/          what the policy and the reference wrote, scored (eval.generation.after_training)
        model/             the trained policy (Hugging Face format, safetensors)
        ray/               Ray Train's storage: checkpoints

With ``output.storage`` set, the same layout is kept at ``<storage>/<name>/`` (see rayalign.storage).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from rayalign.config import RunConfig
from rayalign.console import Console
from rayalign.data.stage import prepare_data
from rayalign.evaluation.stage import check_scorer, evaluate_trained
from rayalign.reference.stage import score_into_cache, score_reference
from rayalign.run_dir import claimed_run_dir
from rayalign.runtime import Workload
from rayalign.storage import write_local
from rayalign.train.stage import TrainingHooks, preflight, train_stage
from rayalign.train.trainer import TrainingInputs

log = logging.getLogger(__name__)


def run_train(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Train one policy end to end and write its run directory; returns the summary.
    ``console``: where training's progress shows (None: nowhere but the logs and trackers)."""
    started = time.perf_counter()
    check_scorer(cfg)
    with claimed_run_dir(cfg) as run_dir:
        if console is not None:
            console.adopt_log()  # the name is this run's: its log may go into the run directory now
        log.info("data: reading and tokenizing")
        data = prepare_data(cfg, run_dir, Workload())
        cost = preflight(cfg, data)
        ref = cfg.reference
        if cfg.reference_scope != "all":
            log.info(
                "reference: none for training (loss.type %s needs none)%s",
                cfg.loss.type,
                f"; the held-out pairs scored by {ref.backend}" if cfg.reference_scope == "heldout" else "",
            )
        elif ref.in_worker:
            log.info("reference: in the training workers, LoRA adapters off (no actors)")
        else:
            log.info(
                "reference: %s, %d actor(s)%s",
                ref.backend,
                ref.num_actors,
                ", through the cache" if ref.cache else ", streamed into training",
            )
        scored = score_reference(cfg, data)
        s = cfg.scaling
        log.info("train: %d worker(s), ZeRO-%d, %s", s.num_workers, cfg.train.zero_stage, "GPU" if s.use_gpu else "CPU")
        inputs = TrainingInputs(data.model, scored, data.report.as_dict(), cost.as_dict(), started)
        after = (lambda: evaluate_trained(cfg, data.model, scored.heldout)) if cfg.evaluates_after_training else None
        return train_stage(cfg, inputs, TrainingHooks(console=console, after_training=after))


def run_reference(cfg: RunConfig) -> dict[str, Any]:
    """The reference pass alone: score every pair missing from the reference store into it, so later training runs
    and sweeps with the same model and data read it instead of starting reference actors.
    Writes ``<run_dir>/reference/reference.json`` and returns it."""
    started = time.perf_counter()
    out_dir = cfg.output.run_dir / "reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out_dir, Workload(train=False))
    scored, info = score_into_cache(cfg, data)
    report = {
        "backend": cfg.reference.backend,
        "cache": info.as_dict(),
        "scored_pairs": scored.count(),
        "data": data.report.as_dict(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_local(out_dir / "reference.json", json.dumps(report, indent=2))
    return report
