"""Shared fixtures: one real local Ray cluster per test session, and a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Imported before any test can call the CLI in-process: the CLI keeps a cluster it starts on
# 127.0.0.1 only when Ray is not imported yet, and that choice would then carry over to later tests.
import ray  # noqa: F401

from rayalign.config import ModelConfig, TinyModelConfig, config_from_dict
from rayalign.models import resolve_model_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Ray Train's controller polls its workers every 2 s, and a worker's report() (each checkpoint and
# held-out evaluation) waits for that poll: most of a tiny run's wall time. Ray Train passes this
# setting from the driver to its controller and workers; a user can set it the same way.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# Ray keeps as many idle worker processes as the node has CPUs (2 here) and ends the others a second after their
# task: each run's Ray Data tasks then started fresh processes that imported torch and transformers again (~4 s of
# CPU each). Four kept idle are reused across the session's runs: a tiny run after the first went from 45 s to 35 s
# on this machine (2026-12-08). A long-lived cluster with more CPUs keeps more by default.
TEST_CLUSTER_SYSTEM_CONFIG = {"num_workers_soft_limit": 4}


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Small, fixed sizing so the suite behaves the same on a 2-core CI machine.
    # The dashboard serves the state API (list_actors) that some tests inspect.
    # address="local": always a cluster of this session's own, never one another test process started with
    # `ray start` or ray.cluster_utils (which plain ray.init() would join).
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 1024**2,
        include_dashboard=True,
        _system_config=TEST_CLUSTER_SYSTEM_CONFIG,
    )
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_train_run_outlives_its_test(request):
    """After each e2e test the session cluster holds no Ray Train run and no placement group. Ray 2.60's ``fit()``
    kept its controller alive through the SIGINT handler it installs (rayalign.train.trainer.sigint_handler_restored
    puts the old one back), and on clean clones a run's placement group was sometimes left behind after its run
    (after tests/test_run_dir.py's killed and resumed run): every later run that needs the whole node then waits
    for those CPUs until its timeout. What is still there 10 s after the test is stopped here, with a warning that
    names the test, so that one leak fails no other test."""
    yield
    import ray

    if request.node.get_closest_marker("e2e") is None or not ray.is_initialized():
        return
    import signal
    import time
    import warnings

    controllers = alive_train_controllers(wait_s=10)
    for controller in controllers:
        try:
            os.kill(controller["pid"], signal.SIGKILL)  # the session cluster is this machine's
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (groups := _held_placement_groups()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for group in groups:
        ray.util.remove_placement_group(group)
    if controllers or groups:
        jobs = sorted({controller.get("job_id") for controller in controllers})
        warnings.warn(
            f"{request.node.nodeid} left {len(controllers)} Ray Train controller(s) (job(s) {jobs}) and "
            f"{len(groups)} placement group(s) behind; removed",
            stacklevel=1,
        )


def alive_train_controllers(wait_s: float) -> list[dict]:
    """The session cluster's Ray Train controllers still alive after waiting up to ``wait_s`` for none to be (Ray's
    state API rows: pid, job_id, ...)."""
    import time

    import ray
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        alive = list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")],
            detail=True,
            raise_on_missing_output=False,
        )
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _held_placement_groups() -> list:
    """The session's placement groups not yet removed (none is expected between tests)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    return [
        PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
        for group_id, info in ray.util.placement_group_table().items()
        if info["state"] != "REMOVED"
    ]


@pytest.fixture(scope="session")
def _session_gloo_group():
    """One one-process gloo group for the whole session: DeepSpeed keeps the first group it sees, so an engine
    built in a later group would use one torch no longer knows."""
    import torch
    from engines import launcher_env, one_process_group

    env = launcher_env()
    with one_process_group("gloo", torch.device("cpu"), env), pytest.MonkeyPatch.context() as patch:
        for key in env:  # only while a test asks for the group: later subprocesses must not inherit rank 0's
            patch.delenv(key, raising=False)
        yield env


@pytest.fixture
def process_group(_session_gloo_group, monkeypatch):
    """The session's gloo group, with the launcher's variables set for this test, as Ray Train would have set
    them up for an in-process DeepSpeed engine."""
    for key, value in _session_gloo_group.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return resolve_model_dir(ModelConfig(tiny=TinyModelConfig()), tmp_path_factory.mktemp("models"))


def make_config(tmp_path: Path, **sections):
    """A valid RunConfig for tests: tiny model, synthetic data, output under tmp_path, 0.5 CPU per worker and per
    reference actor (tests of `auto` set "auto": it gives a lone tiny-model worker or actor most of the 2-CPU node
    and 2 threads it cannot use, and serializes what could overlap)."""
    tree = {
        "model": {"tiny": {}},
        "data": {"synthetic": {"num_pairs": 64}, "max_length": 64, "max_prompt_length": 32},
        "output": {"root": str(tmp_path / "runs"), "name": "test"},
        "scaling": {"cpus_per_worker": 0.5},
        "reference": {"cpus_per_actor": 0.5},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return config_from_dict(tree)


def pytest_configure(config):
    # Registered here rather than in pyproject.toml, whose contents key CI's cached virtual environment.
    config.addinivalue_line(
        "markers",
        "second_stream: `make test` runs these in a second pytest process (its own Ray session and temp dir) "
        "beside the main suite, which keeps the two processes about equally long",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cluster`` run first: they start their own Ray clusters (and stop only those),
    and `ray.init()` in this process would join a running `ray start` cluster instead of starting one.
    Tests marked ``gpu`` skip without CUDA, with the reason in the summary (tests/test_gpu.py)."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)
    import torch

    if torch.cuda.is_available() or os.environ.get("RAYALIGN_GPU_TESTS_ON_CPU") == "1":
        return
    no_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (torch.cuda.is_available() is False here); `make gpu-check` runs it on a lent GPU"
    )
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(no_gpu)


def train_and_reference_actors() -> dict[str, str]:
    """This session's Ray Train workers and reference scorer actors, alive or dead: actor id -> class name."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000, raise_on_missing_output=False
    )
    return {
        a["actor_id"]: a.get("class_name") or ""
        for a in actors
        if "RayTrainWorker" in (a.get("class_name") or "") or "ReferenceScorer" in (a.get("class_name") or "")
    }


def logged_threads(actor_ids) -> dict[str, list[tuple[int, float]]]:
    """The torch threads and reserved CPUs each of ``actor_ids`` logged (rayalign.cpus.use_reserved_cpus), read
    from its Ray log, by kind of process."""
    import re

    import ray
    from ray.util.state import get_actor, get_log
    from ray.util.state.exception import RayStateApiException

    address = ray.get_runtime_context().gcs_address

    def stderr_of(actor_id: str) -> str:
        # Through the state API by the actor's id; else from the session's log directory on this machine (the
        # suite's cluster is local), by the actor's process: Ray's log monitor moves the files of processes that have
        # ended into logs/old/, where the state API does not look (on clean clones, the vLLM reference actor's, which
        # Ray Data had ended once it scored). An actor that never got a process logged nothing.
        try:
            return "".join(get_log(address=address, actor_id=actor_id, suffix="err"))
        except RayStateApiException:
            actor = get_actor(actor_id, address=address)
            if not actor or not actor.pid:
                return ""
            logs = Path(ray._private.worker._global_node.get_logs_dir_path())
            ended = sorted(logs.glob(f"worker-*-{actor.pid}.err")) + sorted(logs.glob(f"old/worker-*-{actor.pid}.err"))
            return "".join(path.read_text(errors="replace") for path in ended)

    line = re.compile(r"(train worker|reference actor)[^:]*: (\d+) torch thread\(s\) for the ([\d.]+) CPU")
    found: dict[str, list[tuple[int, float]]] = {}
    for actor_id in actor_ids:
        if said := line.search(stderr_of(actor_id)):  # Ray Train may echo a worker's stderr in its log: the first line
            kind, threads, cpus = said.groups()
            found.setdefault(kind.replace(" ", "_"), []).append((int(threads), float(cpus)))
    return found
