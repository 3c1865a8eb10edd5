"""End to end on a real local Ray cluster: Ray Data → reference actors → Ray Train + DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import logged_threads, make_config, train_and_reference_actors

from rayalign.metrics import METRIC_KEYS
from rayalign.pipeline import run_train
from rayalign.storage import read_jsonl

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(600)
def test_two_workers_zero2_cpo(ray_cluster, tmp_path):
    """Also the CPUs `auto` reserves (the default) and the threads each worker and actor computes on."""
    cfg = make_config(
        tmp_path,
        data={"synthetic": {"num_pairs": 64}},
        loss={"type": "cpo", "beta": 0.5, "gamma": 4.0},
        train={"micro_batch_size": 8, "zero_stage": 2, "log_every": 1, "learning_rate": 3e-3},
        scaling={"num_workers": 2, "cpus_per_worker": "auto"},
        reference={"cpus_per_actor": "auto"},
    )
    before = train_and_reference_actors()
    summary = run_train(cfg)
    run_dir = cfg.output.run_dir

    # auto on the suite's 2-CPU cluster: 2 workers and the streaming reference actor share 1.75 CPUs (a quarter
    # left to Ray Data), 0.58 each; each computes on 1 thread (Ray's floor of 0.58 would be 0), none on 2.
    assert cfg.scaling.cpus_per_worker == cfg.reference.cpus_per_actor == 0.58
    threads = logged_threads(set(train_and_reference_actors()) - set(before))
    assert sorted(threads) == ["reference_actor", "train_worker"], threads
    assert threads["train_worker"] == [(1, 0.58)] * 2 and threads["reference_actor"] == [(1, 0.58)]

    for name in ("config.yaml", "metrics.jsonl", "quarantine.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # 64 pairs / 2 workers / 8 per micro-batch = 4 optimizer steps, logged every step.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert set(METRIC_KEYS) <= set(row), set(METRIC_KEYS) - set(row)
        assert 0.0 <= row["pref/absolute_accuracy"] <= 1.0 and 0.0 <= row["pref/frac_in_U"] <= 1.0
        assert row["pairs/s"] > 0 and row["tokens/s"] > row["pairs/s"]
    # Before the first update the policy equals the reference, so every DPO-family margin is 0.
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    # ... and γ reached the workers: at h = 0 CPO's loss is −log σ(−(β/α)·softplus(γ − δ_ref)), about 2.1 for γ = 4
    # with the tiny model's |δ_ref| < 1 (above 1.7), where DPO's is log 2 and CPO with γ = 0 about 0.9.
    assert rows[0]["loss"] > 1.5 and summary["loss_type"] == "cpo"

    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["data"]["ok"] == 64 and summary["steps"] == 4
    # The pre-flight line's numbers: the default shared-prompt layout computes fewer positions than padding.
    preflight = summary["preflight"]
    assert preflight["layout"] == "shared_prompt" and preflight["attention"] == "sdpa"
    assert preflight["computed_tokens_per_pair"]["shared_prompt"] < preflight["computed_tokens_per_pair"]["padded"]
    assert preflight["padding_share"]["padded"] > preflight["padding_share"]["shared_prompt"]

    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert (run_dir / "model" / "model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(summary["files"]["base_model"])
    changed = any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    assert changed, "training did not change the saved weights"


@pytest.mark.timeout(600)
def test_a_loss_without_reference_trains_without_any_reference(ray_cluster, tmp_path):
    """A loss that needs no reference (rayalign.loss_specs) starts no reference actor at all, asserted through
    Ray's state API, and lowers its loss; the metrics that need a reference are left out, never written as 0.
    SimPO here; ORPO, the other such loss, trains in test_heldout_split_is_evaluated (with a reference for the
    held-out pairs only)."""
    # At step 1 the policy's per-token averages s(y_w) and s(y_l) are close: L ≈ −log σ(−γ_SimPO) = 1.31 for γ = 1.
    loss = {"type": "simpo", "beta": 2.0, "simpo_margin": 1.0}
    cfg = make_config(
        tmp_path,
        data={"synthetic": {"num_pairs": 16}},
        loss=loss,
        # The same 16 pairs four times over: the loss falls on pairs it has seen, not by the luck of new ones.
        train={"micro_batch_size": 8, "zero_stage": 0, "log_every": 1, "learning_rate": 3e-3, "epochs": 4},
        scaling={"num_workers": 1},
    )
    before = train_and_reference_actors()
    summary = run_train(cfg)
    started = {actor_id: name for actor_id, name in train_and_reference_actors().items() if actor_id not in before}
    assert len(started) == 1 and "RayTrainWorker" in next(iter(started.values())), started
    rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
    print("simpo losses", [round(r["loss"], 4) for r in rows])
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all("pref/frac_in_U" not in r and "rewards/chosen" not in r and "pref/absolute_accuracy" in r for r in rows)
    assert rows[0]["loss"] == pytest.approx(1.3133, abs=0.3)
    assert summary["loss_decreased"] and "pref/frac_in_U" not in summary["last"]
    assert summary["reference"]["scope"] == "none"


@pytest.mark.timeout(600)
def test_kto_trains_on_unpaired_completions_and_each_kind_of_loss_refuses_the_others_data(ray_cluster, tmp_path):
    """KTO on an unpaired JSONL (TRL's prompt/completion/label; each synthetic pair as a desirable and an undesirable
    completion) with one bad line, quarantined. At step 1 the policy is the reference: every completion's log-ratio
    and the KL estimate are 0, so each row's loss is exactly 1 − σ(0) = 0.5 when the reference and the workers score
    the same tokens, KL completions included. A paired loss on this file, and KTO on pairs, are refused in one line."""
    from rayalign.data.synthetic import arithmetic_pairs, to_jsonl
    from rayalign.errors import DataQualityError

    pairs = arithmetic_pairs(16, seed=0)
    records = [
        {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs for k in p if k != "prompt"
    ]
    unpaired = tmp_path / "unpaired.jsonl"
    bad = '{"prompt": "Q: 1+1=?", "completion": " 2", "label": "yes"}\n'
    unpaired.write_text(to_jsonl(records[:7]) + bad + to_jsonl(records[7:]))
    paired = tmp_path / "paired.jsonl"
    paired.write_text(to_jsonl(pairs))

    def config(path, loss, name):
        return make_config(
            tmp_path,
            data={"synthetic": None, "paths": [str(path)]},
            loss=loss,
            output={"name": name},
            reference={"cache": True},  # through the reference store, as pairs go
            # All 32 completions in every step (and KL completions rotated among all of them), 6 times over: each
            # step's loss is over the same rows, so it falls step by step rather than with the luck of a sample.
            train={"micro_batch_size": 32, "zero_stage": 0, "log_every": 1, "learning_rate": 3e-3, "epochs": 6},
            scaling={"num_workers": 1},
        )

    cfg = config(unpaired, {"type": "kto", "beta": 0.5}, "kto")
    summary = run_train(cfg)
    rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
    print("kto losses", [round(r["loss"], 4) for r in rows], "kl", [round(r["kl"], 4) for r in rows])
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4) and rows[0]["kl"] == pytest.approx(0, abs=1e-4)
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    assert all("pref/absolute_accuracy" not in r and "rewards/margins" not in r for r in rows)
    assert summary["loss_decreased"] and rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]
    assert summary["data"]["ok"] == 32 and summary["data"]["quarantined_by_reason"] == {"not_a_bool": 1}
    assert summary["reference"]["cache"]["scored"] == 32  # each completion with its KL completion, one stored row
    (bad,) = read_jsonl(cfg.output.run_dir / "quarantine.jsonl")
    assert (bad["row"], bad["reason"], bad["field"]) == (8, "not_a_bool", "label")

    refusals = (
        (unpaired, "dpo", "unpaired_record", "set loss.type: kto"),
        (paired, "kto", "paired_record", "takes unpaired prompt/completion/label records"),
    )
    for path, loss_type, reason, remedy in refusals:
        with pytest.raises(DataQualityError) as refused:
            run_train(config(path, {"type": loss_type}, f"refused-{loss_type}"))
        message = str(refused.value)
        assert "\n" not in message and f"{path.name} line 1: {reason}" in message and remedy in message, message


@pytest.mark.timeout(600)
def test_zero3_shared_prompt_with_activation_checkpointing_and_a_token_budget(ray_cluster, tmp_path):
    """ZeRO-3 (parameters sharded; the chunked head gathers them again when it recomputes) with the
    decoder's activations recomputed too: at step 1 the policy is the reference, so DPO's loss is log 2
    when the actors and the workers score the same tokens (an off-by-one or a wrong mask moves it).
    Each step's 8 pairs per worker go in passes of at most 50 tokens (2 or 3 pairs of about 17), which
    the two workers must run as many of, or ZeRO-3's parameter gathers wait forever."""
    cfg = make_config(
        tmp_path,
        data={"synthetic": {"num_pairs": 48}},
        train={
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "tokens_per_batch": 50,
            "zero_stage": 3,
            "log_every": 1,
            "learning_rate": 3e-3,
            "gradient_checkpointing": True,
            "packing": {"row_tokens": 64, "logps_chunk_tokens": 16},
        },
        scaling={"num_workers": 2, "cpus_per_worker": 0.5},
    )
    summary = run_train(cfg)
    rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(cfg.output.run_dir / "model")  # gathered from the shards
    base = AutoModelForCausalLM.from_pretrained(summary["files"]["base_model"])
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))


def _fraction_holding_out(rows: int, name: str, want: int, seed: int = 0) -> float:
    """An eval_fraction that holds out exactly ``want`` of the file's rows (split_heldout's hash)."""
    import zlib

    draws = sorted(zlib.crc32(f"{seed}:{name}:{row}".encode()) / 2**32 for row in range(1, rows + 1))
    return (draws[want - 1] + draws[want]) / 2 if want else draws[0] / 2


@pytest.mark.timeout(600)
def test_heldout_split_is_evaluated(ray_cluster, tmp_path, capsys):
    """One held-out pair and two workers: an equal split would evaluate nothing and write every eval/* as 0.0;
    here the pair is evaluated once at every evaluation. Under ZeRO-3 each forward pass gathers the parameters from
    both workers: the one without a held-out pair joins the other's pass (before, the run hung at the first
    evaluation, each worker waiting in a different collective). `rayalign validate` announces the steps train took,
    and a fraction that holds out no pair is refused in one line naming data.eval_fraction.
    The loss is ORPO, which needs no reference: the reference actor scores the held-out pair alone
    (monitor.reference_for_heldout), so frac_in_U and the rewards are on the eval rows and not on the training
    ones, and the loss falls."""
    import ray

    from rayalign.cli import main
    from rayalign.config import ConfigError
    from rayalign.reference.stage import split_scored

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}: {i}+1=?", "chosen": f" {i + 1}", "rejected": f" {i + 2}"}) + "\n"
            for i in range(40)
        )
    )
    sections = dict(
        loss={"type": "orpo", "odds_ratio_weight": 0.5},
        train={
            "micro_batch_size": 4,
            "zero_stage": 3,
            "log_every": 1,
            "learning_rate": 3e-3,
            # Every parameter partitioned: the tiny model's are all below DeepSpeed's default persistence threshold
            # (1e5 elements), which keeps a parameter whole on every worker, and no forward pass would gather.
            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
        monitor={"eval_every": 2},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5},
        reference={"cpus_per_actor": "auto"},
    )
    cfg = make_config(
        tmp_path,
        data={"paths": [str(data)], "synthetic": None, "eval_fraction": _fraction_holding_out(40, "pairs.jsonl", 1)},
        **sections,
    )
    before = train_and_reference_actors()
    summary = run_train(cfg)
    started = sorted(name for actor_id, name in train_and_reference_actors().items() if actor_id not in before)
    assert sum("ReferenceScorer" in name for name in started) == 1, started  # for the held-out pair
    assert summary["reference"]["heldout_pairs"] == 1 and summary["reference"]["scope"] == "heldout"
    assert summary["loss_decreased"]
    rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
    last = rows[-1]["step"]
    evaluated = [r["step"] for r in rows if "eval/loss" in r]
    assert evaluated == sorted({s for s in range(2, last + 1, 2)} | {last})
    for key in ("eval/loss", "eval/pref/absolute_accuracy", "eval/pref/frac_in_U", "eval/rewards/accuracies"):
        assert key in rows[-1]
    assert all("pref/frac_in_U" not in r and "rewards/chosen" not in r for r in rows)
    # ORPO's L ≈ −s(y_w) + λ·log 2 at step 1: the chosen response's NLL (logps/chosen is s(y_w), the per-token
    # average ORPO compares), and an odds ratio near 1.
    assert rows[0]["loss"] == pytest.approx(-rows[0]["logps/chosen"] + 0.5 * math.log(2), abs=0.1)
    assert all(r["eval/loss"] > 0.3 for r in rows if "eval/loss" in r)  # measured on the pair, not 0.0
    assert summary["heldout"]["eval/loss"] == rows[-1]["eval/loss"]
    assert "eval/pairs/s" not in rows[-1]

    empty = make_config(
        tmp_path,
        data={"paths": [str(data)], "synthetic": None, "eval_fraction": _fraction_holding_out(40, "pairs.jsonl", 0)},
        **sections,
    )
    rows = ray.data.from_items([{"source": str(data), "row": row, "prompt_ids": [1]} for row in range(1, 41)])
    with pytest.raises(ConfigError, match=r"data.eval_fraction=.* selects none of the 40 usable pairs"):
        split_scored(empty, rows, None, 40)

    # The command leaves the session's cluster connected: it was connected before the command ran.
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["validate", "--config", str(config), "--json"]) == 0 and ray.is_initialized()
    announced = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert announced["optimizer_steps"] == summary["planned_steps"] == summary["steps"]
    # ... the memory plan per rank (rayalign.memory_plan), with no GPU to hold it against here.
    plan = announced["memory_plan"]
    assert (plan["zero_stage"], plan["num_workers"], plan["dtype"], plan["fits"]) == (3, 2, "float32", None)
    assert plan["device"]["weights"] > 0 and plan["device_total"] > plan["device"]["weights"]
    # ... and the CPUs and threads of each process: the workers' as given, the reference actor's from auto (it
    # scores the held-out pair before training starts: the node less Ray Data's quarter core).
    assert announced["cpus"]["train_worker"] == {"count": 2, "cpus": 0.5, "torch_threads": 1}
    assert announced["cpus"]["reference_actor"] == {"count": 1, "cpus": 1.75, "torch_threads": 2}
