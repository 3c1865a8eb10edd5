"""Checkpoints and the exported model: what survives a worker, its node, or the end of the run.

A checkpoint holds every rank's DeepSpeed shards (weights, optimizer, scheduler, step) plus rank 0's
``metrics.jsonl`` up to that step, so the history survives the loss of rank 0's node. Restoring puts
both back; the data position is recomputed from the step (see :mod:`rayalign.train.worker`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint

from rayalign.metrics import STEP
from rayalign.storage import METRICS_FILE, Location, download, read_jsonl, read_text, remove, upload, write_text

DEEPSPEED_TAG = "deepspeed"
BEST_RECORD = "best.json"


def report(metrics: dict[str, Any], engine=None, metrics_path: Path | None = None, adapters_only: bool = False) -> None:
    """Report to Ray Train (a barrier across workers); with ``engine``, also checkpoint it, together
    with rank 0's ``metrics_path``. ``adapters_only``: leave the frozen base weights out (LoRA: they are
    the starting weights, loaded again on restore)."""
    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=adapters_only)
        if metrics_path is not None and metrics_path.exists():
            shutil.copy(metrics_path, Path(tmp) / METRICS_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    # A checkpoint is restorable only once Ray Train's controller has taken it from the worker's
    # one-slot report queue (it polls every 2 s). This report waits for that, so a node lost after
    # training moved on never restores from an older checkpoint. No held-out metrics in it: Tune's
    # callback ignores it.
    ray.train.report({STEP: metrics[STEP]})


def restore(
    engine, checkpoint: Checkpoint, metrics_path: Path | None, adapters_only: bool = False
) -> list[dict[str, Any]]:
    """Load the engine (weights, optimizer, scheduler, step) from ``checkpoint``; with ``metrics_path`` (rank 0)
    also put ``metrics.jsonl`` back as it was at that step and return its rows (the alarm's history)."""
    with checkpoint.as_directory() as ckpt_dir, weights_only_loads(engine):
        engine.load_checkpoint(ckpt_dir, tag=DEEPSPEED_TAG, load_module_strict=not adapters_only)
        saved = Path(ckpt_dir) / METRICS_FILE
        if metrics_path is None or not saved.exists():
            return []
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(saved, metrics_path)
    return read_jsonl(metrics_path)


@contextmanager
def weights_only_loads(engine) -> Iterator[None]:
    """While the block runs, ``engine`` reads checkpoint files with ``torch.load(weights_only=True)``: tensors,
    containers, numbers and strings, plus the few plain DeepSpeed types its checkpoints hold, never arbitrary
    pickled code. DeepSpeed loads with ``weights_only=False``; whoever can write the run's storage could
    otherwise run code in every worker on the next restore.

    Raises ``pickle.UnpicklingError`` naming the file and the type, for a file that holds anything else."""
    import pickle
    import re

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    checkpoints = engine.checkpoint_engine
    allowed = [LossScaler, ZeroStageEnum, fragment_address]  # what DeepSpeed 0.19's ZeRO-1/2/3 checkpoints hold

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            raise pickle.UnpicklingError(
                f"{path}: not restored, it holds {found.group(1) if found else 'an object'}, which only a checkpoint "
                "tampered with would (a checkpoint holds tensors and DeepSpeed's own settings)"
            ) from None

    checkpoints.load = load  # an instance attribute: only this engine's reads change
    try:
        yield
    finally:
        del checkpoints.load


def read_checkpoint_file(checkpoint: Checkpoint, name: str) -> bytes:
    """One file of a (possibly remote) checkpoint, without downloading the model shards."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as stream:
        return stream.read()


@dataclass(frozen=True)
class BestModel:
    """The best model by a held-out key (``monitor.keep_best``), kept in the run's storage beside Ray Train's
    checkpoints, which keep only the latest: ``<where>/step-<N>/`` holds a DeepSpeed checkpoint of every rank, and
    ``<where>/best.json``, written last, says which step it is and its value (a folder without it is not kept).

    ``mode``: "max" or "min", the key's better direction. ``adapters_only``: LoRA, without the frozen base."""

    where: Location
    key: str
    mode: str
    adapters_only: bool = False

    def record(self) -> dict[str, Any] | None:
        """``best.json``: ``{"step", "key", "value", "dir"}``, or None while nothing is kept."""
        text = read_text(self.where / BEST_RECORD)
        return None if text is None else json.loads(text)

    def improves(self, value: float, record: dict[str, Any] | None) -> bool:
        if record is None:
            return True
        return value > record["value"] if self.mode == "max" else value < record["value"]

    def keep(self, engine, row: dict[str, Any], collective) -> None:
        """Save ``engine`` as the best model (every rank calls it: each saves its shards), ``row`` being the
        logged row whose held-out value made it the best; ``collective`` (the worker group's) orders the commit
        after every rank's upload."""
        import torch.distributed as dist

        folder = f"step-{row[STEP]}"
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, exclude_frozen_parameters=self.adapters_only)
            upload(Path(tmp), self.where / folder)
        collective.all_reduce_max(0)  # a barrier on the group's device: every rank's shards are in storage
        if dist.get_rank() != 0:
            return
        previous = self.record()
        write_text(
            self.where / BEST_RECORD,
            json.dumps({STEP: row[STEP], "key": self.key, "value": row[self.key], "dir": folder}),
        )
        if previous is not None and previous["dir"] != folder:
            remove(self.where / previous["dir"])

    def restore_into(self, engine) -> dict[str, Any]:
        """Load the best model into ``engine`` (every rank calls it); returns its record."""
        record = self.record()
        with tempfile.TemporaryDirectory() as tmp:
            download(self.where / record["dir"], Path(tmp))
            restore(engine, Checkpoint.from_directory(tmp), None, adapters_only=self.adapters_only)
        return record
