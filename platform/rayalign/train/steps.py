"""How many optimizer steps a run takes: one pure place, for ``train``, ``validate``, the sweep and the workers.

Ray Train splits the training stream equally across workers; each worker's share counts as micro-batches of
``micro_batch_size`` pairs (the last one may be short), and a step takes ``gradient_accumulation_steps`` of
them. Pairs left over at the end of an epoch are not trained. No torch and no Ray here: ``rayalign validate``
announces the same count without starting either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayalign.config import ConfigError, TrainConfig
from rayalign.errors import DataQualityError


def pairs_per_step(train: TrainConfig) -> int:
    """Pairs one worker trains per optimizer step."""
    return train.micro_batch_size * train.gradient_accumulation_steps


@dataclass(frozen=True)
class StepPlan:
    """A run's optimizer steps: ``total`` (what it will take) and ``per_epoch`` (before ``train.max_steps``)."""

    total: int
    per_epoch: int


def step_plan(train: TrainConfig, num_workers: int, num_pairs: int) -> StepPlan:
    """The steps ``num_pairs`` training pairs make on ``num_workers`` workers.

    Raises DataQualityError when they make no step, and ConfigError when ``train.warmup_steps`` is not below
    the total (the learning rate would never reach its value), each in one line."""
    per_epoch = math.ceil((num_pairs // num_workers) / train.micro_batch_size) // train.gradient_accumulation_steps
    total = train.epochs * per_epoch
    if total == 0:
        raise DataQualityError(
            f"{num_pairs} usable pairs are not enough for one optimizer step with {num_workers} workers × "
            f"micro_batch_size {train.micro_batch_size} × gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps}"
        )
    total = min(total, train.max_steps) if train.max_steps else total
    if train.warmup_steps >= total > 0 and train.warmup_steps > 0:
        raise ConfigError(
            f"train.warmup_steps={train.warmup_steps} is not below the run's {total} optimizer steps: "
            "the learning rate would never reach train.learning_rate (lower train.warmup_steps)"
        )
    return StepPlan(total, per_epoch)
