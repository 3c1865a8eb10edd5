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
from conftest import REPO, make_config

pytestmark = pytest.mark.cluster

NUM_PAIRS, MICRO_BATCH, EPOCHS = 128, 4, 2
STEPS_PER_EPOCH = NUM_PAIRS // 2 // MICRO_BATCH  # two workers, one micro-batch per step
CHECKPOINT_EVERY = 4
KILL_AFTER_STEP = CHECKPOINT_EVERY + 2  # past the first checkpoint, before the second


def _rows(metrics_path) -> list[dict]:
    """The log's complete rows (rank 0 may be writing the last one right now)."""
    text = metrics_path.read_text() if metrics_path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _kill_a_trainer_node(cluster, metrics_path, killed: dict) -> None:
    """Once training passed KILL_AFTER_STEP, kill a worker node hosting a Ray Train worker; then
    note the last step logged before training restarted from a checkpoint."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 600
    while (_rows(metrics_path) or [{"step": 0}])[-1]["step"] < KILL_AFTER_STEP:
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    trainers = list_actors(
        address=cluster.gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    trainer_nodes = {actor["node_id"] for actor in trainers}
    victim = next(node for node in cluster.worker_nodes if node.node_id in trainer_nodes)
    killed["at_step"] = _rows(metrics_path)[-1]["step"]
    killed["node_id"] = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    # The other workers run on until they notice the loss, and may log (and checkpoint) a step
    # more. The restore rewrites the log up to the checkpoint, so its highest step until the
    # first resumed row appears is the furthest training got before the loss.
    killed["last_step_before_restore"] = killed["at_step"]
    while time.monotonic() < deadline:
        rows = _rows(metrics_path)
        if any("resumed_from_step" in row for row in rows):
            return
        if rows:
            killed["last_step_before_restore"] = max(killed["last_step_before_restore"], rows[-1]["step"])
        time.sleep(0.1)


def test_training_resumes_from_checkpoint_after_losing_a_worker_node(tmp_path, monkeypatch):
    """Full fine-tuning that switched from DPO to CPO on the pathology alarm before the node loss: the restored run
    must go on with CPO. (A LoRA run's restore, whose checkpoints hold the adapters only and the base is loaded
    again, is tests/test_run_dir.py's killed run: the same restore from a checkpoint, at a tenth of the cost.)"""
    import ray
    from ray.cluster_utils import Cluster

    from rayalign.pipeline import run_train

    # A reference that prefers the wrong answers: within a few steps the policy has moved from it into U, and the
    # alarm (window 2, any change) switches the run to CPO by the first checkpoint (step 4).
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    from biased_reference import biased_reference

    reference = biased_reference(make_config(tmp_path, data={"synthetic": {"num_pairs": NUM_PAIRS}}), steps=100)

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
            model={"tiny": None, "path": str(reference)},
            data={"synthetic": {"num_pairs": NUM_PAIRS}},
            train={
                "micro_batch_size": MICRO_BATCH,
                "epochs": EPOCHS,
                "log_every": 1,
                "checkpoint_every": CHECKPOINT_EVERY,
                "max_failures": 2,
                "learning_rate": 1e-4,
            },
            # One CPU per trainer: the head (1 CPU) holds at most one, so one is on a worker node.
            scaling={"num_workers": 2, "cpus_per_worker": 1},
            ray={"address": cluster.address},
            monitor={
                "alarm_window": 2,
                "alarm_min_change": 0.0,
                "on_alarm": "switch",
                "switch_to": {"type": "cpo", "gamma": 4.0},
            },
        )
        metrics_path = cfg.output.run_dir / "metrics.jsonl"
        killed: dict = {}
        killer = threading.Thread(target=_kill_a_trainer_node, args=(cluster, metrics_path, killed), daemon=True)
        killer.start()
        summary = run_train(cfg)
        killer.join(timeout=10)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert killed, "training ended before a node could be killed"
    print(
        f"\n[node-failure] killed node at step {killed['at_step']} (last step logged before the restore: "
        f"{killed.get('last_step_before_restore')}), resumed from {summary['resumed_from_steps']}, "
        f"finished at step {summary['steps']} in {summary['wall_seconds']} s"
    )
    planned = EPOCHS * STEPS_PER_EPOCH
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    # Every step exactly once, up to the planned count: the rows after the checkpoint that were
    # trained again replaced the lost ones instead of repeating them.
    assert [row["step"] for row in rows] == list(range(1, planned + 1))
    assert summary["steps"] == planned
    # The data position came back too: after the restore each worker skipped the micro-batches
    # of the epoch it had trained, so every epoch still has exactly STEPS_PER_EPOCH steps.
    assert [row["epoch"] for row in rows] == [(row["step"] - 1) // STEPS_PER_EPOCH for row in rows]
    # It resumed from a checkpoint (not from scratch): at least the last one surely registered when
    # the node was lost (a step's row is logged before its checkpoint is saved, and the next step
    # starts only once that checkpoint is registered), and at most CHECKPOINT_EVERY steps that had
    # been trained were trained again.
    (resumed,) = summary["resumed_from_steps"]
    assert resumed % CHECKPOINT_EVERY == 0 and resumed >= CHECKPOINT_EVERY
    assert (killed["at_step"] - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY <= resumed, killed
    assert 0 <= killed["last_step_before_restore"] - resumed <= CHECKPOINT_EVERY, killed
    assert (cfg.output.run_dir / "model" / "model.safetensors").exists()
    # Switched at the alarm no later than the checkpoint it resumed from (a step's row, its action included, is
    # recorded before that step's checkpoint is saved, so a switch at the checkpoint's step is in it), and still
    # CPO after the restore: with γ = 4
    # and β = 0.1 CPO's loss near the reference is about −log σ(−0.1·softplus(4 − δ_ref)) ≥ 0.91 (δ_ref ≤ 0),
    # where DPO's is below log 2 (the alarm fired on its falling loss).
    ((action_step, action),) = [(row["step"], row["action"]) for row in rows if "action" in row]
    assert action.startswith("switched to cpo") and action_step <= resumed, (action_step, resumed)
    (after,) = [row for row in rows if row.get("resumed_from_step") is not None]
    assert after["loss"] > 0.8 and rows[action_step - 1]["loss"] < 0.7, (after, rows[action_step - 1])
    assert summary["actions"] == [{"step": action_step, "action": action}]
