"""A training run on a multi-node local cluster survives losing a worker node.

Four Ray nodes on this machine (ray.cluster_utils.Cluster: a head and three worker raylets).
Mid-run, the node of one Ray Train worker is killed without warning. Ray Train restarts the
worker group from the last checkpoint (train.max_failures) and the run must end at the planned
step count with every step logged exactly once.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import make_config

pytestmark = pytest.mark.cluster

NUM_PAIRS, MICRO_BATCH, EPOCHS = 128, 4, 2
STEPS_PER_EPOCH = NUM_PAIRS // 2 // MICRO_BATCH  # two workers, one micro-batch per step
CHECKPOINT_EVERY = 4
KILL_AFTER_STEP = CHECKPOINT_EVERY + 2  # past the first checkpoint, before the second


def _steps_logged(metrics_path) -> int:
    if not metrics_path.exists():
        return 0
    lines = metrics_path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _kill_a_trainer_node(cluster, metrics_path, killed: dict) -> None:
    """Once training passed KILL_AFTER_STEP, kill a worker node hosting a Ray Train worker."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 600
    while _steps_logged(metrics_path) < KILL_AFTER_STEP:
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    trainers = list_actors(
        address=cluster.gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    trainer_nodes = {actor["node_id"] for actor in trainers}
    victim = next(node for node in cluster.worker_nodes if node.node_id in trainer_nodes)
    killed["at_step"] = _steps_logged(metrics_path)
    killed["node_id"] = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    killed["logged_after_kill"] = _steps_logged(metrics_path)


def test_training_resumes_from_checkpoint_after_losing_a_worker_node(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from rayalign.pipeline import run_train

    store = 200 * 1024**2
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": True},
    )
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        cfg = make_config(
            tmp_path,
            data={"synthetic": {"num_pairs": NUM_PAIRS}},
            train={"micro_batch_size": MICRO_BATCH, "epochs": EPOCHS, "log_every": 1,
                   "checkpoint_every": CHECKPOINT_EVERY, "max_failures": 2},
            # One CPU per trainer: the head (1 CPU) holds at most one, so one is on a worker node.
            scaling={"num_workers": 2, "cpus_per_worker": 1},
            ray={"address": cluster.address},
        )
        metrics_path = cfg.output.run_dir / "metrics.jsonl"
        killed: dict = {}
        killer = threading.Thread(target=_kill_a_trainer_node, args=(cluster, metrics_path, killed), daemon=True)
        killer.start()
        summary = run_train(cfg)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert killed, "training ended before a node could be killed"
    print(f"\n[node-failure] killed node at step {killed['at_step']}, resumed from {summary['resumed_from_steps']}, "
          f"finished at step {summary['steps']} in {summary['wall_seconds']} s")
    planned = EPOCHS * STEPS_PER_EPOCH
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    # Every step exactly once, up to the planned count: the rows after the checkpoint that were
    # trained again replaced the lost ones instead of repeating them.
    assert [row["step"] for row in rows] == list(range(1, planned + 1))
    assert summary["steps"] == planned
    # The data position came back too: after the restore each worker skipped the micro-batches
    # of the epoch it had trained, so every epoch still has exactly STEPS_PER_EPOCH steps.
    assert [row["epoch"] for row in rows] == [(row["step"] - 1) // STEPS_PER_EPOCH for row in rows]
    # It resumed from a checkpoint (not from scratch): the last one registered before the node was
    # lost, so at most CHECKPOINT_EVERY steps were trained twice. A step's row is logged before its
    # checkpoint is saved, and the next step starts only once that checkpoint is registered, so
    # when step s was logged every checkpoint up to step s - 1 was restorable; and none later than
    # the last step logged right after the kill can exist.
    (resumed,) = summary["resumed_from_steps"]
    assert resumed % CHECKPOINT_EVERY == 0 and resumed >= CHECKPOINT_EVERY
    surely_registered = (killed["at_step"] - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    at_most = killed["logged_after_kill"] // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert surely_registered <= resumed <= at_most, killed
    assert (cfg.output.run_dir / "model" / "model.safetensors").exists()
