"""A step's pairs in micro-batches of a fixed size or a token budget: every pair once, within the budget,
the same count on every worker, and the same optimizer step either way (a real DeepSpeed engine)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import make_config
from engines import PAD, pairs_batch, token_budget_against_fixed_micro_batches

from rayalign.packing import pack_pairs
from rayalign.train.batching import micro_batch_groups, pair_tokens, take


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_pair_tokens_are_what_the_layout_computes(layout):
    batch = pairs_batch(9, seed=1)
    assert sum(pair_tokens(batch, layout)) == pack_pairs(batch, layout, PAD).real_tokens
    with pytest.raises(ValueError, match="packed layout"):
        pair_tokens(batch, "padded")


def test_fixed_micro_batches_are_consecutive_slices():
    assert micro_batch_groups([0] * 7, micro_batch_size=3, tokens_per_batch=None) == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_token_budget_holds_every_pair_once_and_within_the_budget():
    rng = random.Random(3)
    for _ in range(200):
        tokens = [rng.randrange(5, 300) for _ in range(rng.randrange(1, 40))]
        budget = rng.randrange(100, 900)
        groups = micro_batch_groups(tokens, micro_batch_size=4, tokens_per_batch=budget)
        assert sorted(i for g in groups for i in g) == list(range(len(tokens)))
        for group in groups:
            assert group == sorted(group) and (len(group) == 1 or sum(tokens[i] for i in group) <= budget)
        # balanced: the fullest holds at most one pair's worth more than the emptiest
        loads = [sum(tokens[i] for i in g) for g in groups]
        assert max(loads) - min(loads) <= max(tokens)
        assert len(groups) >= math.ceil(sum(tokens) / budget) or len(groups) == len(tokens)


def test_a_worker_that_needs_fewer_micro_batches_splits_to_the_agreed_count():
    tokens = [10, 12, 30, 7, 9, 40, 5, 11]
    assert len(micro_batch_groups(tokens, 4, tokens_per_batch=200)) == 1
    groups = micro_batch_groups(tokens, 4, tokens_per_batch=200, agree=lambda count: 5)
    assert len(groups) == 5 and sorted(i for g in groups for i in g) == list(range(8))
    assert len(micro_batch_groups([500, 3], 4, tokens_per_batch=100)) == 2  # too long for the budget: alone
    with pytest.raises(ValueError, match="cannot make 3 micro-batches of 2 pairs"):
        micro_batch_groups([5, 3], 4, tokens_per_batch=100, agree=lambda count: 3)


def test_take_picks_rows_of_numpy_and_list_columns():
    batch = {"a": np.array([10, 11, 12]), "b": ["x", "y", "z"]}
    picked = take(batch, [2, 0])
    assert picked["a"].tolist() == [12, 10] and picked["b"] == ["z", "x"]


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_a_token_budget_takes_the_same_optimizer_steps_as_fixed_micro_batches(
    tiny_model_dir, process_group, zero_stage
):
    token_budget_against_fixed_micro_batches(
        tiny_model_dir, zero_stage, torch.device("cpu"), agree_count=lambda count: count
    )


def test_the_preflight_lays_the_sample_out_as_the_workers_will(tmp_path):
    from rayalign.train.batching import layout_cost

    batch = pairs_batch(16, seed=4)
    rows = [{k: batch[k][i].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(16)]
    two_workers = {"scaling": {"num_workers": 2}}
    fixed = layout_cost(
        rows, make_config(tmp_path, train={"micro_batch_size": 4, "gradient_accumulation_steps": 2}, **two_workers), PAD
    )
    assert fixed.passes_per_step == 2 and fixed.tokens_per_batch is None and "4 pairs per pass" in fixed.line()
    assert fixed.computed_tokens_per_pair["shared_prompt"] < fixed.computed_tokens_per_pair["padded"]
    budget = {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "tokens_per_batch": 100}
    cost = layout_cost(rows, make_config(tmp_path, train=budget, **two_workers), PAD)
    first, second = ({k: [r[k] for r in rows[i : i + 8]] for k in rows[0]} for i in (0, 8))
    expected = sum(len(micro_batch_groups(pair_tokens(s, "shared_prompt"), 4, 100)) for s in (first, second)) / 2
    assert cost.passes_per_step == expected > 2 and "passes of ≤100 tokens per step" in cost.line()
    real = sum(pair_tokens(first, "shared_prompt") + pair_tokens(second, "shared_prompt")) / 16
    assert cost.computed_tokens_per_pair["shared_prompt"] * (1 - cost.padding_share["shared_prompt"]) == pytest.approx(
        real
    )
    assert cost.tokens_per_step == pytest.approx(cost.computed_tokens_per_pair["shared_prompt"] * 8 * 2)


def test_a_tied_head_trains_under_zero3_with_the_model_built_partitioned(tmp_path):
    """A model whose output head is its input embedding (SmolLM2's, Llama 3.2's), built as a ZeRO-3 worker builds it:
    partitioned as it is constructed (no rank holds it whole), then two optimizer steps of the training step on a
    real DeepSpeed engine. (With ZeRO's buckets sized by the hidden size, the second step failed on CPU in
    DeepSpeed's zero_grad: rayalign.train.worker.deepspeed_config.) In a process of its own: DeepSpeed keeps
    process-wide state of the groups an earlier engine test made."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        losses, steps = pool.apply(_tied_head_under_zero3, (str(tmp_path),))
    assert all(math.isfinite(loss) for loss in losses) and steps == 2


def _tied_head_under_zero3(model_dir: str) -> tuple[list[float], int]:
    import deepspeed
    from engines import one_process_group
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.config import LossConfig, TrainConfig
    from rayalign.logprobs import PolicyLogps, ResponseHead
    from rayalign.models import load_causal_lm
    from rayalign.train.deepspeed_settings import deepspeed_config
    from rayalign.train.step import PreferenceStep
    from rayalign.train.worker import adamw, partitioned_construction

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    LlamaForCausalLM(LlamaConfig(vocab_size=128, tie_word_embeddings=True, **shape)).save_pretrained(model_dir)
    train = TrainConfig(zero_stage=3, micro_batch_size=4)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with one_process_group("gloo", torch.device("cpu")):
        config = deepspeed_config(train, "float32")
        with partitioned_construction(config):
            model = load_causal_lm(model_dir)
        embedding = model.get_input_embeddings().weight
        assert embedding.numel() == 0 and embedding.ds_numel == 128 * 32  # partitioned, never whole
        assert model.get_output_embeddings().weight is embedding
        policy = PolicyLogps(model)
        deepspeed.utils.set_z3_leaf_modules(policy, [ResponseHead])
        optimizer = adamw(list(policy.parameters()), train)
        engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=config)
        step = PreferenceStep(LossConfig(), train, PAD, torch.device("cpu"))
        losses = [
            step.optimizer_step(engine, pairs_batch(4, seed), lambda count: count)[0].terms.loss.mean().item()
            for seed in range(2)
        ]
        return losses, engine.global_steps
