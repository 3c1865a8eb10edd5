"""Ray Train's TorchTrainer for one run: which resources, which datasets, what each worker is given."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

from rayalign.config import RunConfig
from rayalign.cpus import resolved
from rayalign.metrics import OBJECTIVE_MODES, STEP
from rayalign.models import ModelSource
from rayalign.reference.stage import ScoredPairs
from rayalign.storage import BEST_DIR, MODEL_DIR, RAY_TRAIN_DIR, RAY_TRAIN_RUN, run_location
from rayalign.train.checkpoint import BestModel
from rayalign.train.steps import StepPlan
from rayalign.train.worker import WorkerPlan, train_loop_per_worker


@dataclass(frozen=True)
class TrainingInputs:
    """What training needs besides the config, from the stages before it: ``run_train`` and a sweep's trial
    each build one."""

    model: ModelSource  # the starting weights, published for every node
    scored: ScoredPairs  # the reference stage's pairs (training split, held-out split)
    data_report: dict[str, Any]  # the data stage's counts (DataReport.as_dict())
    preflight: dict[str, Any] | None  # what the layout costs (LayoutCost.as_dict()), measured before training
    started: float  # time.perf_counter() when the run began: summary.json's wall_seconds


def best_model(cfg: RunConfig) -> BestModel | None:
    """Where the run keeps its best held-out model, when ``monitor`` asks for one (keep_best, or a stop)."""
    key = cfg.monitor.best_key
    if key is None:
        return None
    where = run_location(cfg.output) / BEST_DIR
    return BestModel(where, key, OBJECTIVE_MODES[key], adapters_only=cfg.model.lora is not None)


def worker_plan(cfg: RunConfig, inputs: TrainingInputs, steps: StepPlan, progress: Any = None) -> WorkerPlan:
    """What every worker of the run is given (its config sections, the step plan). ``progress``: a
    ProgressBoard's handle that rank 0 posts its logged rows to."""
    return WorkerPlan(
        model=inputs.model,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        lora=cfg.model.lora,
        loss=cfg.loss,
        train=cfg.train,
        monitor=cfg.monitor,
        run_dir=str(cfg.output.run_dir),
        model_storage=run_location(cfg.output) / MODEL_DIR,
        best_model=best_model(cfg),
        steps=steps,
        has_eval=inputs.scored.heldout is not None,
        reference_in_worker=cfg.reference.in_worker,
        progress=progress,
    )


def fit(cfg: RunConfig, plan: WorkerPlan, scored: ScoredPairs, callbacks: list | None = None):
    """Train the policy on ``scored`` (evaluating on its held-out pairs) with ``plan`` on every worker;
    returns Ray Train's Result. ``callbacks``: Ray Train callbacks, e.g. a sweep trial's report to Tune."""
    s = resolved(cfg).scaling
    stored = run_location(cfg.output)
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    heldout = {"eval": scored.heldout} if scored.heldout is not None else {}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=RayScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        datasets={"train": scored.train, **heldout},
        # Only the training pairs are split; every worker reads the held-out pairs whole and evaluates its
        # share (rayalign.train.batching.heldout_share), since an equal split drops the remainder.
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RayRunConfig(
            # One Ray Train run per run directory: a run that starts again under the same storage path (a resumed
            # run, a sweep trial Tune restores) continues from its last checkpoint; a fresh run finds none there
            # (rayalign.run_dir clears it).
            name=RAY_TRAIN_RUN,
            # The filesystem is handed over, not guessed from a string: an S3-compatible server's
            # endpoint travels with it to every worker.
            storage_path=(stored / RAY_TRAIN_DIR).path,
            storage_filesystem=stored.fs,
            # Kept by step, not by arrival: see rayalign.train.stage.last_step_checkpoint.
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=STEP, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
    )
    with sigint_handler_restored():
        return trainer.fit()


@contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """Put back the SIGINT handler that ``TorchTrainer.fit()`` replaces in the main thread (Ray 2.60): its handler
    holds the run's controller actor, so left in place it keeps that controller alive after the run, in a notebook
    or any process that trains twice, and a controller restored from a checkpoint keeps its workers' CPUs too: the
    next run then waits for them forever."""
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    finally:
        if main_thread and before is not None:
            signal.signal(signal.SIGINT, before)
