"""The errors that end a ``rayalign`` command with one line instead of a traceback.

They live apart from the stages that raise them so that the command line can name them
without importing Ray, torch or DeepSpeed (it decides how Ray starts before Ray is imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayalign.data.report import DataReport


class DataQualityError(RuntimeError):
    """The input cannot make a trustworthy run: unreadable, too much quarantined, or too few usable pairs.
    ``report``: the data stage's counts when it got that far (``rayalign validate`` prints them)."""

    def __init__(self, message: str, report: DataReport | None = None):
        super().__init__(message)
        self.report = report


class ClusterResourceError(RuntimeError):
    """The run asks for more CPUs or GPUs at once than the cluster has (Ray would wait forever)."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number; the run stops before it checkpoints or saves anything more."""


class StorageError(RuntimeError):
    """The run's storage, model or data cannot be reached from a node that will work on the run."""


class TrainingIncomplete(RuntimeError):
    """Training ended before its planned step count (its data ran out); the run is not a finished one."""
