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
