"""The memory plan per training rank (rayalign.memory_plan): counts from the config alone, DeepSpeed's accounting."""

from __future__ import annotations

import pytest
from conftest import make_config

from rayalign.memory_plan import GIB, ModelSize, memory_plan, model_size

# Llama-3-8B's shape: 8.03 B parameters, its largest gathered piece the 128,256 x 4,096 embedding (and head).
LLAMA_8B = ModelSize(
    total=8_030_261_248,
    trainable=8_030_261_248,
    largest_layer=128_256 * 4096,
    hidden_size=4096,
    num_layers=32,
    vocab_size=128_256,
)


def test_the_model_is_counted_from_its_config_without_its_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rayalign.config import LoraConfig
    from rayalign.models import with_adapters

    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    size = model_size(tiny_model_dir)
    assert size.total == size.trainable == sum(p.numel() for p in real.parameters())
    layer = sum(p.numel() for p in real.model.layers[0].parameters())  # above the 259 x 64 embedding's
    assert size.largest_layer == layer > real.get_input_embeddings().weight.numel()
    assert (size.hidden_size, size.num_layers, size.vocab_size) == (64, 2, 259)
    lora = LoraConfig(rank=4)
    adapted = with_adapters(real, lora)
    counted = model_size(tiny_model_dir, lora)
    assert counted.trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad) < counted.total
    assert counted.total == sum(p.numel() for p in adapted.parameters())


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_model_states_match_deepspeeds_own_estimators_in_bfloat16(tmp_path, zero_stage):
    """8 ranks, bfloat16, no offload: weights + gradients + Adam states (plus, under ZeRO-3, one gathered layer)
    are what DeepSpeed's estimate_zero{2,3}_model_states_mem_needs say a GPU needs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = make_config(
        tmp_path, model={"tiny": {}, "dtype": "bfloat16"}, train={"zero_stage": zero_stage}, scaling={"num_workers": 8}
    )
    plan = memory_plan(cfg, LLAMA_8B)
    states = sum(plan.device[k] for k in ("weights", "gradients", "optimizer_states")) * GIB
    if zero_stage == 2:
        _, expected = estimate_zero2_model_states_mem_needs(LLAMA_8B.total, num_gpus_per_node=8, cpu_offload=False)
    else:
        _, expected, largest = estimate_zero3_model_states_mem_needs(
            LLAMA_8B.total, LLAMA_8B.largest_layer, num_gpus_per_node=8, cpu_offload=False, cpu_offload_params=False
        )
        states += largest  # counted among the plan's buffers
    assert states == pytest.approx(expected, rel=1e-6)
    # ZeRO-3 holds an eighth of the weights, ZeRO-2 all of them.
    assert plan.device["weights"] * GIB == pytest.approx(2 * LLAMA_8B.total / (8 if zero_stage == 3 else 1))


def test_offload_moves_states_to_the_host_and_a_budget_says_whether_a_rank_fits(tmp_path):
    offload = {
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    }
    sections = dict(model={"tiny": {}, "dtype": "bfloat16"}, scaling={"num_workers": 8})
    on_device = memory_plan(make_config(tmp_path, train={"zero_stage": 3}, **sections), LLAMA_8B, 80)
    offloaded = memory_plan(make_config(tmp_path, train={"zero_stage": 3, "deepspeed": offload}, **sections), LLAMA_8B)
    assert offloaded.device["weights"] == offloaded.device["optimizer_states"] == offloaded.device["gradients"] == 0
    assert offloaded.host["weights"] == pytest.approx(on_device.device["weights"])
    assert offloaded.host["optimizer_states"] == pytest.approx(
        on_device.device["optimizer_states"] + on_device.device["gradients"]
    )
    assert on_device.fits is True and "fits a 80 GiB device" in on_device.line()
    assert offloaded.fits is None and "offloaded to host memory" in offloaded.line()
    # One 80 GiB GPU cannot train 8 B parameters alone without ZeRO: 16 bytes of states per parameter.
    alone = memory_plan(make_config(tmp_path, train={"zero_stage": 0}, **{**sections, "scaling": {}}), LLAMA_8B, 80)
    assert alone.fits is False and "does NOT fit" in alone.line()
    # Activation checkpointing keeps each layer's input instead of its activations.
    budget = {"zero_stage": 3, "tokens_per_batch": 8192}
    full = memory_plan(make_config(tmp_path, train=budget, **sections), LLAMA_8B)
    recomputed = memory_plan(
        make_config(tmp_path, train={**budget, "gradient_checkpointing": True}, **sections), LLAMA_8B
    )
    assert recomputed.device["activations"] < full.device["activations"] / 8
    assert full.tokens_per_pass == 8192 and full.reference_actor == pytest.approx(2 * LLAMA_8B.total / GIB)


def test_the_large_model_recipes_load_and_the_8b_one_fits_80_gib_per_rank():
    """jobs/configs' recipes for nodes of 8 x 80 GB (paths are placeholders): valid configs; the 8 B one's plan,
    with Llama-3.1-8B's shape, fits an 80 GiB GPU (bench/memory_plans.py prints both plans)."""
    from conftest import REPO

    from rayalign.config import load_config

    eight = load_config(REPO / "jobs/configs/llama-8b-dpo-8xh100.yaml")
    seventy = load_config(REPO / "jobs/configs/llama-70b-lora-dpo-2x8xh100.yaml")
    assert (eight.train.zero_stage, eight.scaling.num_workers, eight.model.dtype) == (3, 8, "bfloat16")
    assert seventy.model.lora is not None and seventy.reference.in_worker and seventy.scaling.num_workers == 16
    plan = memory_plan(eight, LLAMA_8B, 80)
    assert plan.fits and plan.device["weights"] * GIB == pytest.approx(2 * LLAMA_8B.total / 8)
