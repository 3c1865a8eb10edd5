"""rayalign.tracking on its own (no Ray): what each tracker holds after a run, read back through its
own library, including the alarm and a sweep's grouping. The end-to-end checks are in
test_console_and_trackers.py (a real run) and test_sweep.py (a real sweep)."""

from __future__ import annotations

import pytest
from conftest import make_config
from tracker_readers import mlflow_history, mlflow_runs, tensorboard_scalars, tensorboard_tags, wandb_offline_runs

from rayalign.diagnostics.report import plot_runs
from rayalign.storage import METRICS_FILE, append_jsonl
from rayalign.tracking import SweepMembership, finish_sweep_parent, open_sweep_parent, open_trackers

ROWS = [
    {
        "step": 1,
        "epoch": 0,
        "lr": 1e-3,
        "loss": 0.69,
        "rewards/accuracies": 0.5,
        "pref/absolute_accuracy": 0.4,
        "pref/frac_in_U": 0.1,
        "rewards/margins": 0.0,
        "pairs/s": 10.0,
    },
    {
        "step": 2,
        "epoch": 0,
        "lr": 1e-3,
        "loss": 0.60,
        "rewards/accuracies": 0.7,
        "pref/absolute_accuracy": 0.3,
        "pref/frac_in_U": 0.3,
        "rewards/margins": 0.2,
        "pairs/s": 11.0,
        "eval/loss": 0.65,
        "alarm": "loss fell by 0.090 over 2 logged steps while frac_in_U rose by 0.200",
    },
]


def _config(tmp_path, **tracking):
    return make_config(
        tmp_path,
        output={
            "root": str(tmp_path / "runs"),
            "name": "unit",
            "trackers": ["mlflow", "tensorboard", "wandb"],
            "tracking": {"wandb_mode": "offline", **tracking},
        },
    )


def _run_dir_with_plot(cfg):
    run_dir = cfg.output.run_dir
    for row in ROWS:
        append_jsonl(run_dir / METRICS_FILE, row)
    return plot_runs([run_dir])


def test_each_tracker_holds_the_rows_the_alarm_and_the_plot(tmp_path):
    cfg = _config(tmp_path)
    plot = _run_dir_with_plot(cfg)
    trackers = open_trackers(cfg)
    for row in ROWS:
        trackers.log_step(row)
    trackers.finish({"steps": 2, "loss_decreased": True}, [plot])
    root = tmp_path / "runs"

    uri = f"sqlite:///{root / 'mlflow.db'}"
    (run,) = mlflow_runs(uri, "rayalign")
    assert run.info.status == "FINISHED" and run.data.params["loss.beta"] == str(cfg.loss.beta)
    assert run.data.tags["pathology_alarm"] == f"step 2: {ROWS[1]['alarm']}"
    assert mlflow_history(uri, run.info.run_id, "pref/frac_in_U") == {1: 0.1, 2: 0.3}
    assert mlflow_history(uri, run.info.run_id, "eval/loss") == {2: 0.65}
    assert "alarm" not in run.data.metrics  # text is a tag, not a metric

    scalars = tensorboard_scalars(root / "tensorboard" / "unit")
    assert scalars["loss"] == pytest.approx({1: 0.69, 2: 0.60}) and "step" not in scalars
    tags = tensorboard_tags(root / "tensorboard" / "unit")
    assert "plots/report" in tags["images"] and "pathology_alarm/text_summary" in tags["tensors"]

    (wandb_run,) = wandb_offline_runs(root, ended=True)
    assert wandb_run["exit_code"] == 0 and wandb_run["job_type"] == "train" and wandb_run["group"] == ""
    assert "pathology-alarm" in wandb_run["tags"]
    assert wandb_run["summary"]["pathology_alarm"] == f"step 2: {ROWS[1]['alarm']}"
    assert [h["loss"] for h in wandb_run["history"] if "loss" in h] == [0.69, 0.60]
    assert wandb_run["summary"]["summary/steps"] == 2


def test_a_failed_run_is_marked_failed(tmp_path):
    cfg = _config(tmp_path)
    trackers = open_trackers(cfg)
    trackers.log_step(ROWS[0])
    trackers.finish(failed=True)
    (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "rayalign")
    assert run.info.status == "FAILED"
    (wandb_run,) = wandb_offline_runs(tmp_path / "runs", ended=True)
    assert wandb_run["exit_code"] == 1


def test_sweep_trials_are_runs_grouped_under_the_sweep(tmp_path):
    sweep_cfg = make_config(
        tmp_path,
        data={"synthetic": {}, "eval_fraction": 0.25},
        monitor={"eval_every": 1},
        loss={"type": "cpo"},
        output={
            "root": str(tmp_path / "runs"),
            "name": "gamma-sweep",
            "trackers": ["mlflow", "tensorboard", "wandb"],
            "tracking": {"wandb_mode": "offline"},
        },
        sweep={"space": {"loss.gamma": {"values": [0.0, 2.0]}}},
    )
    parent = open_sweep_parent(sweep_cfg)
    for trial, gamma in (("t1", 0.0), ("t2", 2.0)):
        trial_cfg = sweep_cfg.model_copy(update={"output": sweep_cfg.output.model_copy(update={"name": trial})})
        trackers = open_trackers(trial_cfg, SweepMembership("gamma-sweep", {"loss.gamma": gamma}, parent))
        trackers.log_step({**ROWS[1], "eval/loss": 0.6 + gamma})
        trackers.finish({"steps": 2})
    finish_sweep_parent(sweep_cfg, parent, {"sweep": "gamma-sweep", "interrupted": False}, [])
    root = tmp_path / "runs"

    runs = {r.info.run_name: r for r in mlflow_runs(f"sqlite:///{root / 'mlflow.db'}", "rayalign")}
    assert set(runs) == {"gamma-sweep", "t1", "t2"} and runs["gamma-sweep"].info.run_id == parent
    for trial, gamma in (("t1", 0.0), ("t2", 2.0)):
        assert runs[trial].data.tags["mlflow.parentRunId"] == parent
        assert runs[trial].data.params["loss.gamma"] == str(gamma)
        assert runs[trial].data.metrics["eval/loss"] == pytest.approx(0.6 + gamma)

    wandb_runs = {r["name"]: r for r in wandb_offline_runs(root, ended=True)}
    assert {r["group"] for r in wandb_runs.values()} == {"gamma-sweep"}
    assert {name: r["config"]["loss.gamma"] for name, r in wandb_runs.items()} == {"t1": 0.0, "t2": 2.0}

    for trial, gamma in (("t1", 0.0), ("t2", 2.0)):  # TensorBoard: a folder per trial, with its hparams
        logdir = root / "tensorboard" / "gamma-sweep" / trial
        assert "_hparams_/session_start_info" in tensorboard_tags(logdir)["hparams"]
        assert tensorboard_scalars(logdir)["hparam/eval/loss"] == pytest.approx({0: 0.6 + gamma})


def test_the_sweep_closes_the_runs_of_trials_tune_ended_mid_run(tmp_path):
    """A trial ASHA stops either dies before it can close its run (left RUNNING) or sees the stop as an
    error (FAILED); the sweep marks both KILLED. An errored trial left open becomes FAILED; a completed
    trial and a trial that closed itself as failed keep their status."""
    sweep_cfg = make_config(
        tmp_path,
        data={"synthetic": {}, "eval_fraction": 0.25},
        monitor={"eval_every": 1},
        loss={"type": "cpo"},
        output={"root": str(tmp_path / "runs"), "name": "gamma-sweep", "trackers": ["mlflow"]},
        sweep={"space": {"loss.gamma": {"values": [0.0, 2.0]}}},
    )
    parent = open_sweep_parent(sweep_cfg)
    ends = {"killed": None, "stopped_saw_error": True, "errored_open": None, "errored_closed": True, "done": False}
    for trial, failed in ends.items():
        trial_cfg = sweep_cfg.model_copy(update={"output": sweep_cfg.output.model_copy(update={"name": trial})})
        trackers = open_trackers(trial_cfg, SweepMembership("gamma-sweep", {"loss.gamma": 0.0}, parent))
        if failed is not None:
            trackers.finish(failed=failed)
    statuses = {
        "killed": "stopped_early",
        "stopped_saw_error": "stopped_early",
        "errored_open": "error",
        "errored_closed": "error",
        "done": "completed",
    }
    summary = {"interrupted": False, "trials": [{"trial_id": t, "status": s} for t, s in statuses.items()]}
    finish_sweep_parent(sweep_cfg, parent, summary, [])

    runs = {r.info.run_name: r for r in mlflow_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "rayalign")}
    assert {name: r.info.status for name, r in runs.items()} == {
        "gamma-sweep": "FINISHED",
        "killed": "KILLED",
        "stopped_saw_error": "KILLED",
        "errored_open": "FAILED",
        "errored_closed": "FAILED",
        "done": "FINISHED",
    }
    assert {name: r.data.tags.get("rayalign.trial_status") for name, r in runs.items()} == {
        "gamma-sweep": None,
        "killed": "stopped_early",
        "stopped_saw_error": "stopped_early",
        "errored_open": "error",
        "errored_closed": None,
        "done": None,
    }
