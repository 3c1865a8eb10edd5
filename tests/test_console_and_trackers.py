"""`rayalign train` as a person runs it: through a pipe, with MLflow, TensorBoard and W&B (offline) on.

One tiny run in a subprocess, watched while it runs: the console stays short and readable, Ray's
output lands in the run's log file, every port of the cluster it starts listens on loopback only,
and each tracker, read back through its own library, holds exactly what metrics.jsonl holds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO
from tracker_readers import mlflow_history, mlflow_runs, tensorboard_scalars, tensorboard_tags, wandb_offline_runs

# In `make test`'s second pytest process, beside the main suite: a `rayalign train` subprocess with a cluster
# of its own, self-contained.
pytestmark = [pytest.mark.e2e, pytest.mark.second_stream]

RUN_TIMEOUT_S = 600
MAX_CONSOLE_LINES = 40


def _listening_addresses(root_pid: int, gloo_interfaces: set) -> set[tuple[str, int, str]]:
    """(address, port, process name) of each TCP socket the process tree under ``root_pid`` listens on; adds
    the network interface each training worker's gloo is told to listen on to ``gloo_interfaces``."""
    found = set()
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
            if proc.name().startswith("ray::RayTrainWorker"):
                gloo_interfaces.add(proc.environ().get("GLOO_SOCKET_IFNAME"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("piped")
    overrides = {
        "output.root": out / "runs",
        "output.trackers": "[mlflow, tensorboard, wandb]",
        "output.tracking.wandb_mode": "offline",
        "data.synthetic.num_pairs": 192,
        "data.eval_fraction": 0.25,
        "monitor.eval_every": 2,
        "train.epochs": 1,
        "train.log_every": 1,
        # Then the policy and the reference answer held-out prompts, checked: one console line, the trackers.
        "eval.generation": "{after_training: true, verifier: arithmetic, max_new_tokens: 3, max_prompts: 16}",
    }
    argv = [sys.executable, "-m", "rayalign", "train", "--config", str(REPO / "jobs/configs/tiny-dpo.yaml")]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    # Its own Ray temp dir: the suite's cluster (in this process) keeps /tmp/ray.
    env["RAY_TMPDIR"] = str(Path("/tmp") / f"rp{os.getpid()}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out)
    listening: set[tuple[str, int, str]] = set()
    gloo_interfaces: set[str | None] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None:
        assert time.monotonic() < deadline, "rayalign train did not finish"
        listening |= _listening_addresses(proc.pid, gloo_interfaces)
        time.sleep(1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    return {
        "stdout": stdout,
        "stderr": stderr,
        "listening": listening,
        "gloo_interfaces": gloo_interfaces,
        "root": out / "runs",
        "run_dir": out / "runs" / "tiny-dpo",
    }


def test_console_is_short_and_the_log_holds_rays_output(piped_run):
    lines = piped_run["stdout"].splitlines()
    print("\n".join(lines))
    assert len(lines) <= MAX_CONSOLE_LINES, f"{len(lines)} lines on the console"
    rows = [json.loads(line) for line in (piped_run["run_dir"] / "metrics.jsonl").open()]
    total = rows[-1]["step"]
    # The demo's DPO run from an unbiased reference: no likelihood displacement, nothing acted on.
    assert not [r for r in rows if "displacement" in r or "action" in r]
    # One line per logged step (not a terminal), each with the numbers a person watches.
    step_lines = [line for line in lines if line.startswith("[rayalign] step ")]
    assert [line.split()[2] for line in step_lines] == [f"{r['step']}/{total}" for r in rows]
    assert all("loss=" in line and "abs_acc=" in line and "pairs/s=" in line for line in step_lines)
    # What it is doing, the alarm, and the final table.
    for stage in ("[rayalign] data:", "[rayalign] reference:", "[rayalign] train:"):
        assert any(line.startswith(stage) for line in lines), stage
    assert any(line.startswith("run ") and "frac_in_U" in line for line in lines), "no final table"
    (evaluated,) = [line for line in lines if "evaluate:" in line]
    assert evaluated.startswith("tiny-dpo: evaluate: 16 prompts, arithmetic policy ")
    # Ray's own chatter is not on the console, but in the log file the console names.
    for noise in ("RayTrainWorker", "Running Dataset", "TrainingReport", "(pid="):
        assert noise not in piped_run["stdout"], noise
    log_file = piped_run["run_dir"] / "logs" / "rayalign.log"
    assert str(log_file) in piped_run["stdout"]
    log_text = log_file.read_text()
    assert "RayTrainWorker" in log_text and "step 1/" in log_text
    assert "Traceback" not in piped_run["stderr"]


def test_the_local_cluster_listens_on_loopback_only(piped_run):
    listening = piped_run["listening"]
    assert listening, "saw no listening socket of the run's cluster"
    exposed = sorted((ip, port, name) for ip, port, name in listening if not _is_loopback(ip))
    # One known exception, outside Ray: rank 0's torch.distributed rendezvous store (TCPStore), which
    # torch binds to every interface and gives no option for; the README says so. It is one port, held
    # by a Ray worker process (retitled by what it runs: ray::RayTrainWorker, ray::execute._setup_torch_...);
    # Ray's own processes (GCS, raylet, agents, the driver, dashboard and client server) must all be on loopback.
    assert len({port for _, port, _ in exposed}) <= 1, f"listening beyond loopback: {exposed}"
    ray_system = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
    assert not [e for e in exposed if e[2] in ray_system or not e[2].startswith("ray::")], exposed
    # torch.distributed's gloo listens where the host name resolves, often the machine's LAN address (here it
    # resolves to 127.0.0.1, so the sockets above cannot show it): the workers are told the loopback interface.
    loopback = {name for name, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs)}
    assert piped_run["gloo_interfaces"] and piped_run["gloo_interfaces"] <= loopback, piped_run["gloo_interfaces"]


def test_trackers_hold_what_metrics_jsonl_holds(piped_run):
    root, run_dir = piped_run["root"], piped_run["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ["loss", "rewards/accuracies", "pref/absolute_accuracy", "pref/frac_in_U", "eval/loss", "pairs/s"]
    expected = {key: {r["step"]: r[key] for r in rows if key in r} for key in keys}
    assert expected["eval/loss"], "no held-out rows to compare"

    # MLflow: the embedded store under output.root, read with MlflowClient.
    uri = f"sqlite:///{root / 'mlflow.db'}"
    (run,) = mlflow_runs(uri, "rayalign")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-dpo"
    assert run.data.params["loss.beta"] == "0.5" and run.data.params["loss.type"] == "dpo"
    for key, values in expected.items():
        assert mlflow_history(uri, run.info.run_id, key) == pytest.approx(values, rel=1e-9), key
    client_artifacts = {a.path for a in __import__("mlflow").MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"summary.json", "report.png", "metrics.jsonl"} <= client_artifacts

    # TensorBoard: event files read with TensorBoard's EventAccumulator (float32 scalars).
    logdir = root / "tensorboard" / "tiny-dpo"
    scalars = tensorboard_scalars(logdir)
    for key, values in expected.items():
        assert scalars[key] == pytest.approx(values, rel=1e-6), key
    tags = tensorboard_tags(logdir)
    assert "plots/report" in tags["images"]
    assert {"config/text_summary", "summary/text_summary"} <= set(tags["tensors"])

    # W&B: the offline run's transaction log, read with W&B's own DataStore.
    (wandb_run,) = wandb_offline_runs(root, ended=True)
    assert wandb_run["name"] == "tiny-dpo" and wandb_run["exit_code"] == 0
    assert wandb_run["config"]["loss"]["beta"] == 0.5
    history = [h for h in wandb_run["history"] if "loss" in h or "eval/loss" in h]
    for key, values in expected.items():
        logged = {h["_step"]: h[key] for h in history if key in h}
        assert logged == pytest.approx(values, rel=1e-9), key
    assert wandb_run["summary"]["summary/steps"] == summary["steps"]

    # The evaluation by generation after training: at the last step, in every tracker.
    generation = {key: summary["generation"][key] for key in ("eval/gen/score", "eval/gen/win_rate")}
    last = summary["steps"]
    for key, value in generation.items():
        assert mlflow_history(uri, run.info.run_id, key) == pytest.approx({last: value}), key
        assert scalars[key] == pytest.approx({last: value}, rel=1e-6), key
        assert {h["_step"]: h[key] for h in wandb_run["history"] if key in h} == pytest.approx({last: value}), key
    assert "evaluation.png" in client_artifacts and "plots/evaluation" in tags["images"]


def test_the_log_is_private_and_never_written_through_a_planted_link(tmp_path):
    """A fresh process each (the console takes over its file descriptors): the log is created 0600, and a
    symbolic link in its place is refused in one line, the link's target left untouched."""
    script = (
        "import sys; from pathlib import Path; from rayalign.console import Console; "
        "c = Console(); c.capture(Path(sys.argv[1])); c.close()"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], check=True, capture_output=True)
    assert (tmp_path / "run" / "logs" / "rayalign.log").stat().st_mode & 0o777 == 0o600

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "planted" / "logs").mkdir(parents=True)
    (tmp_path / "planted" / "logs" / "rayalign.log").symlink_to(target)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "planted")], capture_output=True, text=True)
    assert done.returncode != 0 and "is a symbolic link; rayalign does not write its log through one" in done.stderr
    assert target.read_text() == "keep me"

    # A command that claims its run (train, sweep) writes beside the run directory until its claim succeeds: a
    # refused one leaves the run's log alone and keeps nothing of its own; an adopted one moves in, 0600.
    claiming = (
        "import sys; from pathlib import Path; from rayalign.console import Console; "
        "c = Console(); c.capture(Path(sys.argv[1]), claim_first=True); print('written')\n"
        "try:\n    c.adopt_log() if sys.argv[2] == 'adopt' else None\n"
        "except Exception as err:\n    c.error(str(err)); sys.exit(2)\n"
        "finally:\n    c.close()"
    )
    held = tmp_path / "held"
    (held / "logs").mkdir(parents=True)
    (held / "logs" / "rayalign.log").write_text("the running run's lines\n")
    subprocess.run([sys.executable, "-c", claiming, str(held), "refused"], check=True, capture_output=True)
    assert (held / "logs" / "rayalign.log").read_text() == "the running run's lines\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    subprocess.run([sys.executable, "-c", claiming, str(held), "adopt"], check=True, capture_output=True)
    adopted = held / "logs" / "rayalign.log"
    assert "written" in adopted.read_text() and adopted.stat().st_mode & 0o777 == 0o600
    done = subprocess.run(
        [sys.executable, "-c", claiming, str(tmp_path / "planted"), "adopt"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "is a symbolic link" in done.stderr and target.read_text() == "keep me"


@pytest.mark.parametrize("script", ["pathology", "sweep_gamma"])
def test_job_scripts_bind_a_cluster_they_start_to_loopback_before_importing_ray(script):
    """The setting only counts if it is made before Ray is imported; the scripts import Ray through rayalign."""
    from conftest import REPO

    probe = (
        f"import os, sys; sys.path.insert(0, {str(REPO / 'jobs')!r}); import {script}; "
        "print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'), 'ray' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["0", "True"]
