"""Rank 0's logged rows, relayed live to the process that started training.

Ray Train only hands the driver what a worker reports, and a worker blocks in ``report()`` until
the controller has taken it (see ``TrainingWorker.log_step``), so live progress takes another
path: rank 0 posts each logged row to a small actor without waiting, and a thread beside
``fit()`` takes them and hands them to the consumers (the console's progress, the trackers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayalign.metrics import STEP

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25

Row = dict[str, Any]


@ray.remote(num_cpus=0)  # a CPU held by a mailbox would be a CPU the trainers wait for
class ProgressBoard:
    """Rows posted by rank 0, kept until taken."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def post(self, row: Row) -> None:
        self.rows.append(row)

    def take(self) -> list[Row]:
        rows, self.rows = self.rows, []
        return rows


@contextmanager
def relayed_progress(consumers: list[Callable[[Row], None]]) -> Iterator[Any]:
    """A :class:`ProgressBoard` whose rows reach every consumer, in order, while the block runs and
    once more at its end; yields the board's handle for the workers (``WorkerPlan.progress``)."""
    # On the driver's own node: a worker node lost mid-run must not take the mailbox with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ProgressBoard.options(name=None, scheduling_strategy=here).remote()
    stop = threading.Event()

    def deliver() -> None:
        for row in ray.get(board.take.remote()):
            for consume in consumers:
                try:
                    consume(row)
                except Exception:  # a tracker's hiccup must not stop training or the other consumers
                    log.warning("progress consumer %s failed on step %s", consume, row.get(STEP), exc_info=True)

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            deliver()

    thread = threading.Thread(target=poll, name="rayalign-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join()
        deliver()
        ray.kill(board)
