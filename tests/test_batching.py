"""A step's pairs in micro-batches of a fixed size or a token budget: every pair once, within the budget,
the same count on every worker, and the same optimizer step either way (a real DeepSpeed engine)."""

from __future__ import annotations

import math
import random
import socket

import numpy as np
import pytest
import torch

from rayalign.config import LossConfig, TrainConfig
from rayalign.packing import pack_pairs
from rayalign.train.batching import micro_batch_groups, pair_tokens, take
from rayalign.train.worker import deepspeed_config, optimizer_step

PAD = 0


def _pairs(num_pairs: int, seed: int) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands it over (object columns of int arrays), with a reference column."""
    rng = random.Random(seed)
    ids = lambda low, high: np.array([rng.randrange(3, 120) for _ in range(rng.randrange(low, high))])  # noqa: E731
    columns = {
        "prompt_ids": [ids(1, 30) for _ in range(num_pairs)],
        "chosen_ids": [ids(1, 20) for _ in range(num_pairs)],
        "rejected_ids": [ids(1, 20) for _ in range(num_pairs)],
    }
    batch = {k: np.array(v + [None], dtype=object)[:-1] for k, v in columns.items()}  # keep 1-d object arrays
    batch["ref_chosen_logps"] = np.array([-rng.uniform(20, 80) for _ in range(num_pairs)])
    batch["ref_rejected_logps"] = np.array([-rng.uniform(20, 80) for _ in range(num_pairs)])
    return batch


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_pair_tokens_are_what_the_layout_computes(layout):
    batch = _pairs(9, seed=1)
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


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as Ray Train would have set up, for an in-process DeepSpeed engine."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:  # what a launcher sets, and DeepSpeed reads
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            env.setenv(key, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def _engine(model_dir, train: TrainConfig):
    import deepspeed

    from rayalign.logprobs import PolicyLogps, ResponseHead
    from rayalign.models import load_causal_lm

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    policy = PolicyLogps(load_causal_lm(model_dir), chunk_tokens=32)
    deepspeed.utils.set_z3_leaf_modules(policy, [ResponseHead])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=deepspeed_config(train, "float32"))
    return engine


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_a_token_budget_takes_the_same_optimizer_steps_as_fixed_micro_batches(tiny_model_dir, process_group,
                                                                              zero_stage):
    """Same pairs per step (6), split 3 × 2, 1 × 6, or by a 120-token budget (several passes, a different
    count each step): the losses and the trained weights agree to float noise."""
    import deepspeed

    steps = [_pairs(6, seed=s) for s in range(3)]
    for batch in steps:  # one long pair per step: under the budget, passes hold unequal numbers of pairs
        batch["prompt_ids"][0] = np.arange(3, 75)
    splits = {
        "3x2": TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3, zero_stage=zero_stage),
        "1x6": TrainConfig(micro_batch_size=6, zero_stage=zero_stage),
        "budget": TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3, zero_stage=zero_stage,
                              tokens_per_batch=120),
    }

    def gathered(engine) -> torch.Tensor:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):  # ZeRO-3 holds only shards
            return torch.cat([p.detach().flatten().float().clone() for p in params])

    losses, weights, passes, pass_sizes = {}, {}, {}, []
    for name, train in splits.items():
        engine = _engine(tiny_model_dir, train)
        initial = gathered(engine)
        losses[name], passes[name] = [], []
        for batch in steps:
            done = optimizer_step(engine, batch, LossConfig(beta=0.5), train, PAD, torch.device("cpu"),
                                  agree_count=lambda count: count)
            losses[name].append(float(sum(t.loss.sum() for t, _ in done)) / 6)
            passes[name].append(len(done))
            if name == "budget":
                pass_sizes.append([terms.loss.numel() for terms, _ in done])
        assert engine.global_steps == 3
        weights[name] = gathered(engine)
        assert weights[name].numel() > 0 and not torch.allclose(weights[name], initial), name  # it trained
    assert passes["3x2"] == [3, 3, 3] and passes["1x6"] == [1, 1, 1]
    assert all(count >= 2 for count in passes["budget"])
    # Passes of unequal pair counts: a per-pass mean instead of the step's would weigh pairs unequally.
    assert any(len(set(sizes)) > 1 for sizes in pass_sizes), pass_sizes
    for name in ("1x6", "budget"):
        assert losses[name] == pytest.approx(losses["3x2"], abs=1e-5), name
        assert torch.allclose(weights[name], weights["3x2"], atol=1e-5), name


def test_the_preflight_lays_the_sample_out_as_the_workers_will():
    from rayalign.train.batching import layout_cost

    batch = _pairs(16, seed=4)
    rows = [{k: batch[k][i].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(16)]
    fixed = layout_cost(rows, TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2), "sdpa", 2, PAD)
    assert fixed.passes_per_step == 2 and fixed.tokens_per_batch is None and "4 pairs per pass" in fixed.line()
    assert fixed.computed_tokens_per_pair["shared_prompt"] < fixed.computed_tokens_per_pair["padded"]
    budget = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, tokens_per_batch=100)
    cost = layout_cost(rows, budget, "sdpa", 2, PAD)
    first, second = ({k: [r[k] for r in rows[i:i + 8]] for k in rows[0]} for i in (0, 8))
    expected = sum(len(micro_batch_groups(pair_tokens(s, "shared_prompt"), 4, 100)) for s in (first, second)) / 2
    assert cost.passes_per_step == expected > 2 and "passes of ≤100 tokens per step" in cost.line()
    real = sum(pair_tokens(first, "shared_prompt") + pair_tokens(second, "shared_prompt")) / 16
    assert cost.computed_tokens_per_pair["shared_prompt"] * (1 - cost.padding_share["shared_prompt"]) == pytest.approx(real)
    assert cost.tokens_per_step == pytest.approx(cost.computed_tokens_per_pair["shared_prompt"] * 8 * 2)
