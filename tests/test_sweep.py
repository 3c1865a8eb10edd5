"""`rayalign sweep`: Ray Tune trials that are real Ray Train + DeepSpeed runs, sharing one reference pass."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import ray
import yaml
from conftest import make_config
from ray.util.state import list_actors
from tracker_readers import mlflow_runs, wandb_offline_runs

from rayalign.cli import main
from rayalign.config import ConfigError, config_from_dict, load_config
from rayalign.reference.stage import split_scored
from rayalign.schema import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS
from rayalign.tune.sweep import _absolute_paths, _score_once, _searcher, _trials_need_reference, run_sweep

pytestmark = pytest.mark.e2e


def reference_actor_starts() -> int:
    """How many reference scorer actors this Ray session has ever started (alive or dead)."""
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000, raise_on_missing_output=False
    )
    return sum("ReferenceScorer" in (a.get("repr_name") or a.get("class_name") or "") for a in actors)


def sweep_config(tmp_path, sweep: dict, **sections):
    """A small CPO sweep: 64 synthetic pairs (48 train / 16 held out), one Train worker per trial."""
    base = {
        "data": {"synthetic": {"num_pairs": 64, "label_noise": 0.1}, "eval_fraction": 0.25},
        "reference": {"batch_size": 64, "cache_root": str(tmp_path / "refcache")},
        "loss": {"type": "cpo", "beta": 0.5},
        "train": {"micro_batch_size": 8, "learning_rate": 3e-3, "log_every": 1},
        "monitor": {"eval_every": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "output": {"name": "sweep"},
        "sweep": sweep,
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return make_config(tmp_path, **base)


def test_sweep_config_errors_name_the_key():
    base = {
        "model": {"tiny": {}},
        "data": {"synthetic": {}, "eval_fraction": 0.2},
        "monitor": {"eval_every": 2},
        "loss": {"type": "cpo"},
    }
    with pytest.raises(
        ConfigError, match=r"sweep.space.loss.gamma = 2.0 is not a valid setting: .*loss.type dpo ignores"
    ):
        config_from_dict({**base, "loss": {"type": "dpo"}, "sweep": {"space": {"loss.gamma": {"values": [0.0, 2.0]}}}})
    with pytest.raises(
        ConfigError, match=r"sweep.space.loss.gama = 0.0 is not a valid setting: loss.gama: unknown key"
    ):
        config_from_dict({**base, "sweep": {"space": {"loss.gama": {"values": [0.0]}}}})
    with pytest.raises(ConfigError, match=r"loss.beta: Input should be greater than 0"):
        config_from_dict({**base, "sweep": {"space": {"loss.beta": {"values": [-1.0]}}}})
    with pytest.raises(ConfigError, match=r"search: grid needs `values`"):
        config_from_dict({**base, "sweep": {"space": {"loss.gamma": {"uniform": [0, 2]}}}})
    with pytest.raises(ConfigError, match=r"set data.eval_fraction > 0"):
        config_from_dict({**base, "data": {"synthetic": {}}, "sweep": {"space": {"loss.gamma": {"values": [0]}}}})
    with pytest.raises(ConfigError, match=r"set monitor.eval_every"):
        config_from_dict({**base, "monitor": {}, "sweep": {"space": {"loss.gamma": {"values": [0]}}}})
    cfg = config_from_dict({**base, "sweep": {"space": {"loss.gamma": {"uniform": [0, 2]}}, "search": "optuna"}})
    assert cfg.sweep.objective == "eval/pref/absolute_accuracy" and cfg.sweep.objective_mode == "max"
    assert type(_searcher(cfg.sweep)).__name__ == "OptunaSearch"
    assert (
        config_from_dict(
            {**base, "sweep": {"space": {"loss.gamma": {"values": [0]}}, "objective": "eval/loss"}}
        ).sweep.objective_mode
        == "min"
    )
    # What the policy writes as the objective: measured once, at the end of each trial, by a scorer.
    by_generation = {"space": {"loss.gamma": {"values": [0]}}, "objective": "eval/gen/win_rate"}
    with pytest.raises(ConfigError, match=r"sweep.objective eval/gen/win_rate scores .* set eval.generation.verifier"):
        config_from_dict({**base, "sweep": {**by_generation, "early_stopping": "none"}})
    with pytest.raises(ConfigError, match=r"ASHA has nothing to compare at its rungs; set sweep.early_stopping: none"):
        config_from_dict({**base, "eval": {"generation": {"verifier": "arithmetic"}}, "sweep": by_generation})
    cfg = config_from_dict(
        {
            **base,
            "eval": {"generation": {"verifier": "arithmetic"}},
            "sweep": {**by_generation, "early_stopping": "none"},
        }
    )
    assert cfg.evaluates_after_training and cfg.sweep.objective_mode == "max"
    assert _absolute_paths(cfg, Path("/tmp/trials"))["eval"]["generation"]["after_training"] is True


def test_fresh_never_deletes_a_directory_that_is_not_a_sweeps(tmp_path):
    cfg = sweep_config(tmp_path, {"space": {"loss.gamma": {"values": [0.0]}}})
    other_run = cfg.output.run_dir
    other_run.mkdir(parents=True)
    (other_run / "model").mkdir()
    (other_run / "summary.json").write_text("{}")  # a training run's directory under the same name
    with pytest.raises(ConfigError, match=r"--fresh would delete .* which is not a sweep directory"):
        run_sweep(cfg, fresh=True)
    assert (other_run / "summary.json").is_file() and (other_run / "model").is_dir()


def _max_concurrent(trials: list[dict]) -> int:
    """Most trials whose [started, ended] intervals overlap at one moment (1 s margin for rounding)."""
    edges = sorted([(t["started"] + 1, 1) for t in trials] + [(t["ended"] - 1, -1) for t in trials])
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


# The suite's longest sweep runs in `make test`'s second pytest process, which has time to spare beside the main one.
@pytest.mark.second_stream
@pytest.mark.timeout(900)
def test_sweep_gamma_asha_shared_reference_and_best_config(ray_cluster, tmp_path, capsys):
    cfg = sweep_config(
        tmp_path,
        {
            # Three trials, two at once: whichever of the first two reaches the rung second is compared with
            # the first, and the third with both, so ASHA has a decision to make in every order of arrival.
            "space": {"loss.gamma": {"values": [0.0, 2.0, 4.0]}},
            "max_concurrent_trials": 2,
            # On this easy task every γ ties on held-out accuracy early on, and ASHA stops no one on a
            # tie; CPO's loss grows with γ, so the held-out loss makes ASHA's decisions certain.
            "objective": "eval/loss",
            "asha": {"grace_period": 2, "reduction_factor": 2},
        },
        output={"trackers": ["mlflow", "tensorboard", "wandb"], "tracking": {"wandb_mode": "offline"}},
    )
    before = reference_actor_starts()
    summary = run_sweep(cfg)

    # The reference ran once, in the sweep driver's actor pool; trials only read its output.
    assert reference_actor_starts() - before == cfg.reference.num_actors
    assert summary["reference"]["scored_now"] is True
    trials = summary["trials"]
    assert sorted(t["params"]["loss.gamma"] for t in trials) == [0.0, 2.0, 4.0]
    # Every trial reported the held-out objective; ASHA stopped at least one at a rung.
    assert all(t["objective"] is not None and t["status"] in ("completed", "stopped_early") for t in trials)
    stopped = [t for t in trials if t["status"] == "stopped_early"]
    assert stopped and all(t["steps"] < summary["planned_steps"] for t in stopped)
    assert any(t["status"] == "completed" and t["steps"] == summary["planned_steps"] for t in trials)
    # Two trials ran at once, never more.
    assert _max_concurrent(trials) == 2

    with open(summary["files"]["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["trial_id"] for r in rows} == {t["trial_id"] for t in trials}
    assert os.path.getsize(summary["files"]["plot"]) > 10_000

    # Each trial is a tracker run of its own, grouped under the sweep, with its γ as a parameter.
    root = cfg.output.run_dir.parent
    gammas = {t["trial_id"]: t["params"]["loss.gamma"] for t in trials}
    mlflow = {r.info.run_name: r for r in mlflow_runs(f"sqlite:///{root / 'mlflow.db'}", "rayalign")}
    assert set(mlflow) == {"sweep", *gammas}
    parent = mlflow["sweep"].info.run_id
    assert {"summary.json", "sweep_results.csv"} <= {
        a.path for a in __import__("mlflow").MlflowClient(f"sqlite:///{root / 'mlflow.db'}").list_artifacts(parent)
    }
    for trial_id, gamma in gammas.items():
        assert mlflow[trial_id].data.tags["mlflow.parentRunId"] == parent
        assert float(mlflow[trial_id].data.params["loss.gamma"]) == gamma
    # A trial that completes has its whole history; one ASHA stops is ended by Tune mid-run, and the
    # sweep closes its run as stopped.
    for trial in (t for t in trials if t["status"] == "completed"):
        assert mlflow[trial["trial_id"]].data.metrics["eval/loss"] == pytest.approx(trial["objective"])
        assert mlflow[trial["trial_id"]].info.status == "FINISHED"
    for trial in stopped:
        run = mlflow[trial["trial_id"]]
        assert run.info.status == "KILLED" and run.data.tags["rayalign.trial_status"] == "stopped_early"
    wandb = {r["name"]: r for r in wandb_offline_runs(root) if r["name"]}
    assert {r["group"] for r in wandb.values()} == {"sweep"}
    for trial in (t for t in trials if t["status"] == "completed"):
        run = wandb[trial["trial_id"]]
        assert run["config"]["loss.gamma"] == trial["params"]["loss.gamma"] and run["exit_code"] == 0
    assert {d.name for d in (root / "tensorboard" / "sweep").iterdir()} == set(gammas)

    # The best trial's config is a complete run config that `rayalign train` accepts as is: `rayalign validate`
    # (the same checks, the data read and the steps planned, no training) passes and plans the trials' steps.
    best_path = summary["files"]["best_config"]
    best = next(t for t in trials if t["status"] == "completed")  # trials are sorted best first
    tree = yaml.safe_load(open(best_path))
    assert "sweep" not in tree and tree["loss"]["gamma"] == best["params"]["loss.gamma"]
    assert load_config(best_path).loss.type == "cpo"
    assert main(["validate", "--config", best_path, "--json"]) == 0
    announced = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert announced["optimizer_steps"] == summary["planned_steps"]


def test_a_sweep_of_a_loss_without_reference_scores_only_its_heldout_pairs(ray_cluster, tmp_path):
    """SimPO trials train on no reference log-probs: the sweep's driver scores the held-out pairs alone, once for all
    trials (for frac_in_U on them), and nothing at all without `monitor.reference_for_heldout`."""
    space = {"loss.simpo_margin": {"values": [0.0, 0.5]}}
    cfg = sweep_config(tmp_path, {"space": space}, loss={"type": "simpo", "beta": 2.0})
    before = reference_actor_starts()
    shared = _score_once(cfg)
    heldout = shared.heldout.take_all()
    assert reference_actor_starts() - before == cfg.reference.num_actors
    assert shared.source.scope == "heldout" and shared.scored_now and shared.num_train + len(heldout) == 64
    assert len(heldout) > 0 and all(row[REF_CHOSEN_LOGPS] < 0 and row[REF_REJECTED_LOGPS] < 0 for row in heldout)
    assert REF_CHOSEN_LOGPS not in shared.scored.schema().names and shared.scored.count() == 64
    assert not list((tmp_path / "refcache").rglob("*.parquet"))  # nothing went to the reference store
    # Each trial splits the shared pairs as the driver did and keeps the driver's scored held-out pairs.
    split = split_scored(cfg, shared.scored, shared.source, 64, shared.heldout)
    assert split.heldout is shared.heldout and split.num_train == shared.num_train

    cfg = sweep_config(
        tmp_path, {"space": space}, loss={"type": "simpo", "beta": 2.0}, monitor={"reference_for_heldout": False}
    )
    before = reference_actor_starts()
    shared = _score_once(cfg)
    assert reference_actor_starts() == before and shared.heldout is None and shared.source.scope == "none"
    # Searching the loss itself (or the data) keeps every pair scored: some trial may need them.
    assert _trials_need_reference(sweep_config(tmp_path, {"space": {"loss.type": {"values": ["simpo", "dpo"]}}}))
