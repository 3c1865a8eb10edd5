"""Ray jobs on a secured, autoscaling local cluster (clusters/local/start.sh --autoscaling).

One cluster for the module: a head with token authentication and no CPUs, and Ray's real
autoscaler with the fake multi-node provider. The tiny DPO job is submitted through the Ray Jobs
SDK exactly as the README submits it (jobs/runtime-env.yaml, `python -m rayalign train`); its
trainers cannot run on the head, so the autoscaler must add worker nodes, and remove them once
they are idle.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO

pytestmark = pytest.mark.cluster

JOB_TIMEOUT_S = 600
IDLE_REMOVAL_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """The running head: its dashboard URL and the token a client must present."""

    def __init__(self, url: str, token_file: Path):
        self.url = url
        self.token_file = token_file

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def worker_nodes(self) -> list[dict]:
        """Alive non-head nodes, from the state API (needs the token like every endpoint)."""
        reply = requests.get(f"{self.url}/api/v0/nodes", params={"limit": 100}, headers=self.auth, timeout=30)
        reply.raise_for_status()
        nodes = reply.json()["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    # Ray's socket paths must stay short: a temp dir of its own, directly under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token_file = base / "secrets" / "auth_token"
    dashboard_port, gcs_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_BIN": str(REPO / ".venv" / "bin" / "ray") if (REPO / ".venv" / "bin" / "ray").exists() else "",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    if not env["RAY_BIN"]:
        del env["RAY_BIN"]
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    start = [
        "bash",
        str(REPO / "clusters/local/start.sh"),
        "--autoscaling",
        "--port",
        str(gcs_port),
        "--dashboard-port",
        str(dashboard_port),
        "--temp-dir",
        str(temp_dir),
    ]
    log = base / "start.log"
    with log.open("w") as out:
        started = subprocess.run(start, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180)
    assert started.returncode == 0, log.read_text()
    # start.sh created the token file, readable by its owner only.
    assert token_file.stat().st_mode & 0o777 == 0o600
    try:
        yield Head(f"http://127.0.0.1:{dashboard_port}", token_file)
    finally:
        # stop.sh stops only the cluster start.sh started on this port, in this temp dir.
        subprocess.run(
            [
                "bash",
                str(REPO / "clusters/local/stop.sh"),
                "--force",
                "--port",
                str(gcs_port),
                "--temp-dir",
                str(temp_dir),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )


@pytest.fixture(scope="module")
def tiny_job(head, tmp_path_factory):
    """Submit the tiny DPO job as the README does; watch the worker nodes while it runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path_factory.mktemp("job")
    runtime_env = yaml.safe_load((REPO / "jobs/runtime-env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env["py_modules"] = [str(REPO / module) for module in runtime_env["py_modules"]]
    overrides = {
        "output.root": out / "runs",
        "output.storage": f"file://{out / 'storage'}",
        "output.name": "job-dpo",
        "reference.cache_root": out / "refcache",
        "data.synthetic.num_pairs": 128,
        "train.epochs": 1,
        "train.max_steps": 4,
        # A whole 2-CPU worker node per trainer: the job needs two nodes the head does not have.
        "scaling.cpus_per_worker": 2,
    }
    entrypoint = "python -m rayalign train --config jobs/configs/tiny-dpo.yaml " + " ".join(
        f"--set {key}={value}" for key, value in overrides.items()
    )
    # The headers carry the token explicitly, so this process never caches a cluster token.
    client = JobSubmissionClient(head.url, headers=head.auth)
    peak = {"workers": 0}
    done = threading.Event()

    def watch_nodes():
        while not done.is_set():
            peak["workers"] = max(peak["workers"], len(head.worker_nodes()))
            done.wait(2)

    assert head.worker_nodes() == []
    watcher = threading.Thread(target=watch_nodes, daemon=True)
    watcher.start()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(3)
    done.set()
    watcher.join()
    print(
        f"\n[jobs] {job_id}: {status} in {time.monotonic() - deadline + JOB_TIMEOUT_S:.0f} s, "
        f"peak worker nodes {peak['workers']}"
    )
    return {
        "client": client,
        "job_id": job_id,
        "status": status,
        "logs": client.get_job_logs(job_id),
        "storage": out / "storage" / "job-dpo",
        "peak_workers": peak["workers"],
    }


def test_job_submitted_with_token_succeeds_and_writes_storage(tiny_job):
    assert tiny_job["status"] == "SUCCEEDED", tiny_job["logs"][-5000:]
    storage = tiny_job["storage"]
    rows = [json.loads(line) for line in (storage / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]  # log_every 2, max_steps 4
    assert (storage / "model" / "model.safetensors").stat().st_size > 0
    assert (storage / "model" / "config.json").exists()
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["files"]["storage"] == f"file://{storage}"
    assert any((storage / "ray").iterdir()), "no Ray Train checkpoints in the storage path"


def test_requests_without_the_token_are_refused(head, tiny_job):
    from ray.job_submission import JobSubmissionClient

    for call in (requests.get, requests.post):
        reply = call(f"{head.url}/api/jobs/", json={"entrypoint": "echo should-not-run"}, timeout=30)
        assert reply.status_code in (401, 403), (call.__name__, reply.status_code, reply.text[:200])
    wrong = {"Authorization": "Bearer " + "0" * 64}
    with pytest.raises(Exception, match="(?i)auth|token|401|403"):
        JobSubmissionClient(head.url, headers=wrong).submit_job(entrypoint="echo should-not-run")
    # Nothing was submitted by the refused calls.
    jobs = tiny_job["client"].list_jobs()
    assert [job.entrypoint for job in jobs if "should-not-run" in job.entrypoint] == []


def test_autoscaler_adds_nodes_for_the_job_and_removes_them_when_idle(head, tiny_job):
    assert tiny_job["status"] == "SUCCEEDED", tiny_job["logs"][-5000:]
    # Two trainers of 2 CPUs each on a head with none: at least two worker nodes were added.
    assert tiny_job["peak_workers"] >= 2
    started = time.monotonic()
    while alive := head.worker_nodes():
        waited = time.monotonic() - started
        assert waited < IDLE_REMOVAL_TIMEOUT_S, f"{len(alive)} worker nodes still alive {waited:.0f} s after the job"
        time.sleep(2)
    print(f"\n[autoscaling] all worker nodes removed {time.monotonic() - started:.0f} s after the job ended")
