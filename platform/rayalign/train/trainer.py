"""Ray Train's TorchTrainer for one run: how many steps, which resources, which datasets."""

from __future__ import annotations

import math

from ray.data import Dataset
from ray.train import CheckpointConfig, DataConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

from rayalign.config import ConfigError, RunConfig, TrainConfig
from rayalign.errors import DataQualityError
from rayalign.models import ModelSource
from rayalign.storage import MODEL_DIR, RAY_TRAIN_DIR, RAY_TRAIN_RUN, run_location
from rayalign.train.worker import WorkerPlan, train_loop_per_worker


def steps_per_epoch(train: TrainConfig, num_workers: int, num_pairs: int) -> int:
    """Optimizer steps per epoch. Ray Train splits the stream equally across workers; each worker's share
    counts as micro-batches of ``micro_batch_size`` pairs (the last one may be short), and a step takes
    ``gradient_accumulation_steps`` of them. Pairs left over at the end of an epoch are not trained."""
    micro_batches = math.ceil((num_pairs // num_workers) / train.micro_batch_size)
    return micro_batches // train.gradient_accumulation_steps


def planned_steps(train: TrainConfig, num_workers: int, num_pairs: int) -> int:
    """Optimizer steps the run will take."""
    steps = train.epochs * steps_per_epoch(train, num_workers, num_pairs)
    if steps == 0:
        raise DataQualityError(
            f"{num_pairs} usable pairs are not enough for one optimizer step with {num_workers} workers × "
            f"micro_batch_size {train.micro_batch_size} × gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps}"
        )
    steps = min(steps, train.max_steps) if train.max_steps else steps
    if train.warmup_steps >= steps > 0 and train.warmup_steps > 0:
        raise ConfigError(f"train.warmup_steps={train.warmup_steps} is not below the run's {steps} optimizer steps: "
                          "the learning rate would never reach train.learning_rate (lower train.warmup_steps)")
    return steps


def fit(
    cfg: RunConfig,
    pairs: Dataset,
    num_pairs: int,
    model: ModelSource,
    heldout: Dataset | None = None,
    callbacks: list | None = None,
    progress=None,
):
    """Train the policy on reference-scored ``pairs`` (evaluating on ``heldout``); returns Ray Train's Result.

    ``callbacks`` are Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` inside a sweep trial.
    ``progress``: a ProgressBoard's handle that rank 0 posts its logged rows to.
    """
    s = cfg.scaling
    stored = run_location(cfg.output)
    plan = WorkerPlan(
        model=model,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        lora=cfg.model.lora,
        loss=cfg.loss,
        train=cfg.train,
        monitor=cfg.monitor,
        run_dir=str(cfg.output.run_dir),
        model_storage=stored / MODEL_DIR,
        total_steps=planned_steps(cfg.train, s.num_workers, num_pairs),
        steps_per_epoch=steps_per_epoch(cfg.train, s.num_workers, num_pairs),
        has_eval=heldout is not None,
        reference_in_worker=cfg.reference.in_worker,
        progress=progress,
    )
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=RayScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        datasets={"train": pairs, **({"eval": heldout} if heldout is not None else {})},
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
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
