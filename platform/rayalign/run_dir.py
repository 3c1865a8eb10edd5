"""A training run's hold on its name: one live run per run directory, and a finished run never overwritten
unless the user asks (``output.if_exists``, ``rayalign train --replace`` / ``--resume``).

What a new training run does with what it finds under ``output.root/output.name`` (and in its storage):

- no earlier training run, or an unfinished one without a checkpoint: starts (that run's files deleted first);
- an unfinished run with a checkpoint: refused; ``resume`` continues it, ``replace`` starts over;
- a finished run (its ``summary.json``): refused; ``replace`` deletes it and starts over (nothing to resume);
- a live run of the same name: always refused.

"Live" is decided by a lock file beside the local run directory, held for the whole run: it protects every run
whose driver is on this machine (Ray jobs' drivers all run on the cluster's head node), not two drivers on
different machines that share one ``output.storage``. Outputs of other commands (``validate/``, ``audit/``,
``refcheck/``, ``reference/``, ``logs/``) are not a training run's and are kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
from filelock import FileLock, Timeout

from rayalign.config import ConfigError
from rayalign.storage import (
    BEST_DIR,
    METRICS_FILE,
    MODEL_DIR,
    QUARANTINE_FILE,
    RAY_TRAIN_DIR,
    RAY_TRAIN_RUN,
    RUN_PLOT,
    SCORED_DIR,
    SUMMARY_FILE,
    Location,
    is_same_place,
    location,
    prepare_run_dir,
    remove,
    run_location,
)

if TYPE_CHECKING:
    from rayalign.config import OutputConfig, RunConfig

log = logging.getLogger(__name__)

SYNTHETIC_DIR = "data"  # the synthetic task a run writes (rayalign.data.stage)
# Everything `rayalign train` writes into its run directory and its storage (config.yaml is rewritten anyway).
TRAINING_OUTPUTS = (
    METRICS_FILE,
    SUMMARY_FILE,
    QUARANTINE_FILE,
    SCORED_DIR,
    MODEL_DIR,
    RUN_PLOT,
    RAY_TRAIN_DIR,
    SYNTHETIC_DIR,
    BEST_DIR,
)


@contextlib.contextmanager
def held_run_name(output: OutputConfig) -> Iterator[None]:
    """Hold ``output.name`` under ``output.root`` for this process until the block ends (a training run or a
    sweep). The lock file lies beside the run directory, so deleting or replacing the directory never frees it.

    Raises ConfigError when another live process on this machine holds the name."""
    output.run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output.run_dir.parent / f".{output.name}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"{output.run_dir}: another run named {output.name!r} is running from this machine (it "
            "holds the lock beside the run directory); wait for it, or set another output.name"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def claimed_run_dir(cfg: RunConfig) -> Iterator[Path]:
    """The run directory, held by this run until the block ends (:func:`held_run_name`), cleared of any earlier
    training run as ``cfg.output.if_exists`` allows (see above); the config written into it.

    Raises ConfigError (one line, naming the run directory and what to do) where the list above says refused."""
    with held_run_name(cfg.output):
        _clear_earlier_run(cfg)
        yield prepare_run_dir(cfg)


def _clear_earlier_run(cfg: RunConfig) -> None:
    output, policy = cfg.output, cfg.output.if_exists
    places = [location(str(output.run_dir))]
    stored = run_location(output)
    if not is_same_place(output.run_dir, stored):
        places.append(stored)
    finished = next(((p / SUMMARY_FILE).uri for p in places if (p / SUMMARY_FILE).is_file()), None)
    checkpoint = next((c for c in map(_checkpoint, places) if c), None)
    holds = f"{output.run_dir} holds"
    if finished and policy != "replace":
        nothing = "; a finished run has nothing to resume" if policy == "resume" else ""
        raise ConfigError(
            f"{holds} a finished training run ({finished}){nothing}: set another output.name, or "
            "replace it with --replace (output.if_exists: replace)"
        )
    if checkpoint and policy == "refuse":
        raise ConfigError(
            f"{holds} an unfinished training run with a checkpoint ({checkpoint}): continue it with "
            "--resume (output.if_exists: resume), start over with --replace, or set another output.name"
        )
    if checkpoint and policy == "resume":
        log.info("resuming %s from %s", output.name, checkpoint)
    keep = (RAY_TRAIN_DIR, BEST_DIR) if policy == "resume" else ()
    for place in places:
        for name in TRAINING_OUTPUTS:
            if name not in keep:
                remove(place / name)


def _checkpoint(run: Location) -> str | None:
    """The latest checkpoint of the run's Ray Train run, if any: the one a resume continues from."""
    train_run = run / RAY_TRAIN_DIR / RAY_TRAIN_RUN
    infos = train_run.fs.get_file_info(pafs.FileSelector(train_run.path, allow_not_found=True))
    names = sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )
    return (train_run / names[-1]).uri if names else None
