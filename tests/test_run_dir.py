"""A training run's hold on its name (rayalign.run_dir): never into another run's directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from conftest import REPO, alive_train_controllers, make_config

from rayalign.cli import _load_configs, build_parser, main
from rayalign.config import ConfigError
from rayalign.pipeline import run_train
from rayalign.run_dir import claimed_run_dir, held_run_name


def _earlier_run(run_dir, *, finished: bool, checkpoint: bool = False):
    """What an earlier training run leaves, plus other commands' folders a new run must keep."""
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "model" / "model.safetensors").write_bytes(b"stale weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "validate").mkdir()
    (run_dir / "validate" / "quarantine.jsonl").write_text("")
    if finished:
        (run_dir / "summary.json").write_text("{}")
    if checkpoint:
        (run_dir / "ray" / "train" / "checkpoint_2026-11-30_10-00-00.000000").mkdir(parents=True)


def test_a_finished_run_is_refused_unless_replaced(tmp_path):
    cfg = make_config(tmp_path)
    _earlier_run(cfg.output.run_dir, finished=True)
    for policy in ("refuse", "resume"):
        with pytest.raises(ConfigError, match=r"holds a finished training run .*summary.json.*--replace"):
            with claimed_run_dir(make_config(tmp_path, output={"if_exists": policy})):
                pass
    assert (cfg.output.run_dir / "model" / "model.safetensors").is_file()
    with claimed_run_dir(make_config(tmp_path, output={"if_exists": "replace"})) as run_dir:
        assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()
        assert (run_dir / "config.yaml").is_file() and (run_dir / "validate" / "quarantine.jsonl").is_file()


def test_a_stale_model_never_survives_into_a_new_run(tmp_path):
    """An unfinished run without a checkpoint is not a result: its files go, the other commands' stay."""
    cfg = make_config(tmp_path)
    _earlier_run(cfg.output.run_dir, finished=False)
    with claimed_run_dir(cfg) as run_dir:
        assert not (run_dir / "model").exists() and not (run_dir / "metrics.jsonl").exists()
        assert (run_dir / "validate").is_dir()


def test_a_finished_run_in_storage_is_refused_too(tmp_path):
    """Kept in the run's storage, not on this driver's disk (another machine ran it)."""
    store = tmp_path / "store"
    cfg = make_config(tmp_path, output={"storage": f"file://{store}"})
    (store / "test").mkdir(parents=True)
    (store / "test" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"finished training run \(file://{store}/test/summary.json\)"):
        with claimed_run_dir(cfg):
            pass


def test_a_checkpoint_is_resumed_or_refused(tmp_path):
    cfg = make_config(tmp_path)
    _earlier_run(cfg.output.run_dir, finished=False, checkpoint=True)
    with pytest.raises(ConfigError, match=r"unfinished training run with a checkpoint .*--resume"):
        with claimed_run_dir(cfg):
            pass
    with claimed_run_dir(make_config(tmp_path, output={"if_exists": "resume"})) as run_dir:
        assert (run_dir / "ray" / "train").is_dir() and not (run_dir / "model").exists()


def test_the_cli_flags_set_if_exists():
    parser = build_parser()
    config = str(REPO / "jobs" / "configs" / "tiny-dpo.yaml")
    for flags, policy in (([], "refuse"), (["--replace"], "replace"), (["--resume"], "resume")):
        (cfg,) = _load_configs(parser.parse_args(["train", "--config", config, *flags]))
        assert cfg.output.if_exists == policy
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--config", config, "--replace", "--resume"])
    assert _load_configs(parser.parse_args(["report", "runs/a"])) == []  # a command without --config or --set


def test_a_name_held_by_another_process_is_refused(tmp_path):
    cfg = make_config(tmp_path)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.to_yaml())
    second = [
        sys.executable,
        "-c",
        "import sys; from rayalign.config import load_config; "
        "from rayalign.run_dir import held_run_name\n"
        "with held_run_name(load_config(sys.argv[1]).output): pass",
        str(config_file),
    ]
    with held_run_name(cfg.output):
        refused = subprocess.run(second, capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 1 and "another run named 'test' is running from this machine" in refused.stderr
    assert subprocess.run(second, cwd=REPO).returncode == 0  # free once its holder let go


def _steps(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_killed_run_is_refused_then_resumed_from_its_checkpoint(ray_cluster, tmp_path, capsys):
    """A LoRA run: its checkpoints hold the adapters alone, and the resume loads the base weights again."""
    sections = {
        "model": {"tiny": {}, "lora": {"rank": 4}},
        "train": {"micro_batch_size": 8, "epochs": 1, "checkpoint_every": 2, "log_every": 1, "learning_rate": 1e-2},
        "scaling": {"num_workers": 1},
    }
    cfg = make_config(tmp_path, **sections)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(cfg.to_yaml())
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rayalign.cli", "train", "--config", str(config_file)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 400
            # Step 3 logged: the checkpoint of step 2 was registered (the next step waits for that).
            while len(_steps(cfg.output.run_dir)) < 3:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.2)
            # While it runs, the same name cannot start a second run.
            with pytest.raises(ConfigError, match="another run named 'test' is running"):
                run_train(cfg)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()

    # The command again is refused, naming --resume, and leaves the killed run's log as it was (before, the refused
    # command truncated it as it started: console.capture's claim_first). As a person runs it, then in this process.
    run_log = cfg.output.run_dir / "logs" / "rayalign.log"
    kept = run_log.read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "rayalign.cli", "train", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "--resume" in again.stderr, again.stderr[-2000:]
    assert kept and run_log.read_bytes() == kept
    assert not list(cfg.output.run_dir.parent.glob("*.pending"))  # the refused command's own log is gone
    capsys.readouterr()
    code, refused = main(["train", "--config", str(config_file)]), capsys.readouterr().err
    assert code == 2 and "with a checkpoint" in refused and "--resume" in refused, refused
    summary = run_train(make_config(tmp_path, **sections, output={"if_exists": "resume"}))
    rows = _steps(cfg.output.run_dir)
    (resumed_from,) = summary["resumed_from_steps"]
    assert resumed_from >= 2 and resumed_from % 2 == 0
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1)) and summary["steps"] > resumed_from
    assert (cfg.output.run_dir / "model" / "adapter" / "adapter_model.safetensors").is_file()
    # The adapters came back from the checkpoint: freshly initialised ones would make the policy the reference
    # again, and the resumed step's loss exactly log 2 (as step 1's is).
    (after,) = [row for row in rows if row.get("resumed_from_step") is not None]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4) and abs(after["loss"] - 0.693147) > 1e-3, after
    # No controller outlives its run (rayalign.train.trainer.sigint_handler_restored): Ray's own SIGINT handler kept
    # the last one alive, and one restored from a checkpoint kept its workers' CPUs, so the next run in this process
    # waited for them forever.
    assert alive_train_controllers(wait_s=10) == []
