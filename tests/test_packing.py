"""The three layouts of a batch of pairs give the same response log-probs as each sequence scored alone."""

from __future__ import annotations

import random

import pytest
import torch
from engines import FLOAT32_EPS, STEP_LOSS_ATOL, TEST_SEED, assert_same_sgd_weights

from rayalign.logprobs import PolicyLogps, response_token_logps, sequence_logps, split_pairs
from rayalign.models import load_causal_lm
from rayalign.packing import LAYOUTS, pack_pairs, response_start, row_width

PAD = 0
# One response token's log-prob (magnitude <= ~10) through the tiny model in float32, computed in another layout:
# the attention sums run in another order; measured <= 1e-6 over 20 seeds at 1 and 2 threads, so 1e-5.
TOKEN_ATOL = 1e-5


def assert_same_sequence_sums(sums: torch.Tensor, expected: torch.Tensor, counts: torch.Tensor) -> None:
    """A sequence's log-prob sums ``counts`` token log-probs: each may differ by :data:`TOKEN_ATOL`, and each of the
    ``counts`` float32 additions rounds by up to eps of the running sum (<= |sum|). A fixed 1e-5 (about one ulp
    of a sum near -80) flaked."""
    bound = counts * (TOKEN_ATOL + FLOAT32_EPS * expected.abs())
    assert bool(((sums - expected).abs() <= bound).all()), ((sums - expected).abs() / bound).max()


def _random_pairs(num_pairs: int, seed: int, empty_prompt: bool = False) -> dict[str, list[list[int]]]:
    rng = random.Random(seed + TEST_SEED)
    tokens = lambda n: [rng.randrange(3, 120) for _ in range(n)]  # noqa: E731
    prompts = [tokens(rng.randrange(1, 24)) for _ in range(num_pairs)]
    if empty_prompt:
        prompts[0] = []
    return {
        "prompt_ids": prompts,
        "chosen_ids": [tokens(rng.randrange(1, 16)) for _ in range(num_pairs)],
        "rejected_ids": [tokens(rng.randrange(1, 16)) for _ in range(num_pairs)],
    }


def _alone(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The definition: one sequence, no batch, the full logits, log-softmax at each response position."""
    ids = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = response_start(len(prompt))
    return logps[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]]  # empty when nothing is scored


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir).eval()


def test_layouts_put_each_token_where_its_sequence_expects_it():
    batch = {"prompt_ids": [[5, 6]], "chosen_ids": [[7, 8]], "rejected_ids": [[9]]}
    shared = pack_pairs(batch, "shared_prompt", PAD)
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the rejected response continues the prompt
    mask = shared.attention_mask[0, 0].int().tolist()
    assert mask[4] == [1, 1, 0, 0, 1]  # rejected sees the prompt and itself, not the chosen response
    assert mask[3] == [1, 1, 1, 1, 0]
    # chosen 7 <- 6, 8 <- 7; rejected 9 <- 6 (the prompt's last token, not the chosen 8)
    assert shared.predictor.tolist() == [1, 2, 1] and shared.target.tolist() == [7, 8, 9]
    assert shared.counts.tolist() == [2, 1] and shared.real_tokens == 5 == shared.computed_tokens

    packed = pack_pairs(batch, "packed", PAD, row_tokens=16)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 5, 6, 9]] and packed.real_tokens == 7
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    padded = pack_pairs(batch, "padded", PAD)
    assert padded.input_ids.tolist() == [[5, 6, 7, 8], [5, 6, 9, PAD]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]] and padded.computed_tokens == 8


def test_packed_rows_respect_the_row_budget_and_drop_nothing():
    batch = _random_pairs(12, seed=3)
    for layout in ("packed", "shared_prompt"):
        pairs = pack_pairs(batch, layout, PAD, row_tokens=64)
        lengths = (pairs.input_ids != PAD).sum(-1)
        assert pairs.input_ids.shape[1] <= 64 and pairs.input_ids.shape[0] > 1
        assert int(lengths.sum()) == pairs.real_tokens
        assert pairs.counts.tolist() == pack_pairs(batch, "padded", PAD).counts.tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_equals_each_sequence_scored_alone_in_float32(model, layout):
    batch = _random_pairs(6, seed=1, empty_prompt=True)
    with torch.no_grad():
        per_token = response_token_logps(model, pack_pairs(batch, layout, PAD, row_tokens=48), chunk_tokens=7)
        sums, counts = sequence_logps(model, pack_pairs(batch, layout, PAD, row_tokens=48), chunk_tokens=7)
        expected = [
            _alone(model, batch["prompt_ids"][i], batch[column][i])
            for column in ("chosen_ids", "rejected_ids")
            for i in range(6)
        ]
    assert counts.tolist() == [len(e) for e in expected]
    assert torch.allclose(per_token, torch.cat(expected), atol=TOKEN_ATOL, rtol=0)
    assert_same_sequence_sums(sums, torch.stack([e.sum() for e in expected]), counts)


def test_layouts_agree_in_bfloat16(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, "bfloat16").eval()
    batch = _random_pairs(6, seed=2)
    flex = load_causal_lm(tiny_model_dir, "bfloat16", attn_implementation="flex_attention").eval()
    one_row = row_width(None, "flex_attention")
    with torch.no_grad():
        sums = {layout: sequence_logps(model, pack_pairs(batch, layout, PAD))[0] for layout in LAYOUTS}
        sums |= {
            f"flex {layout}": sequence_logps(flex, pack_pairs(batch, layout, PAD, one_row))[0]
            for layout in ("packed", "shared_prompt")
        }
    for layout in ("packed", "shared_prompt", "flex packed", "flex shared_prompt"):
        # bf16 keeps 8 bits of mantissa: the layouts differ only in the order of the attention sums.
        assert torch.allclose(sums[layout], sums["padded"], rtol=2e-2, atol=0.1), layout


def test_gradients_of_the_shared_prompt_layout_equal_the_padded_ones(tiny_model_dir):
    """Chunked, recomputed head and shared prompt: the same loss gradient as the padded batch."""
    batch = _random_pairs(4, seed=5)
    grads = {}
    for layout in ("padded", "shared_prompt"):
        policy = PolicyLogps(load_causal_lm(tiny_model_dir), chunk_tokens=5)
        chosen, rejected = split_pairs(policy(pack_pairs(batch, layout, PAD))[0])
        (chosen - rejected).sum().backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert torch.allclose(grads["shared_prompt"], grads["padded"], atol=1e-5, rtol=1e-4)


def test_eager_attention_takes_the_same_mask(tiny_model_dir):
    batch = _random_pairs(4, seed=7)
    sdpa = load_causal_lm(tiny_model_dir).eval()
    eager = load_causal_lm(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        a, counts = sequence_logps(sdpa, pack_pairs(batch, "shared_prompt", PAD))
        b = sequence_logps(eager, pack_pairs(batch, "shared_prompt", PAD))[0]
    assert_same_sequence_sums(a, b, counts)


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_flex_attention_scores_a_whole_micro_batch_in_one_row(tiny_model_dir, model, layout):
    """Under flex attention a micro-batch is one row without padding, its block mask the layout's rule: every
    response token's log-prob equals the sequence's scored alone. (Forward only: torch has no CPU flex backward.)"""
    batch = _random_pairs(6, seed=11, empty_prompt=True)
    flex = load_causal_lm(tiny_model_dir, attn_implementation="flex_attention").eval()
    pairs = pack_pairs(batch, layout, PAD, row_width(None, "flex_attention"))
    assert pairs.input_ids.shape[0] == 1 and pairs.computed_tokens == pairs.real_tokens
    with torch.no_grad():
        per_token = response_token_logps(flex, pairs, chunk_tokens=7)
        expected = torch.cat(
            [
                _alone(model, p, r)
                for column in ("chosen_ids", "rejected_ids")
                for p, r in zip(batch["prompt_ids"], batch[column])
            ]
        )
    # 1e-5 per token, as for the other layouts (the compiled CPU kernel sums in another order than SDPA).
    assert torch.allclose(per_token, expected, atol=TOKEN_ATOL, rtol=0)
    assert row_width(None, "sdpa") is None and row_width(48, "flex_attention") == 48


def test_a_short_training_run_follows_the_same_loss_curve_in_every_layout(tiny_model_dir):
    """Fixed seed, same batches: four plain-SGD steps of the DPO objective; the layouts' losses and weights agree
    up to the order of float32 sums (the layouts only order the attention sums differently). SGD and not Adam: an
    update linear in the gradient keeps rounding noise at rounding size (engines.assert_same_sgd_weights)."""
    from rayalign.config import LossConfig
    from rayalign.losses import PairLogps, objective

    batches = [_random_pairs(4, seed=10)] * 4  # the same batch: the loss must fall
    reference = load_causal_lm(tiny_model_dir).eval()
    with torch.no_grad():
        refs = [split_pairs(sequence_logps(reference, pack_pairs(b, "padded", PAD))[0]) for b in batches]
    initial = torch.cat([p.detach().flatten().clone() for p in reference.parameters()])
    curves, weights = {}, {}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        policy = PolicyLogps(load_causal_lm(tiny_model_dir), chunk_tokens=16)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        curves[layout] = []
        for batch, (ref_chosen, ref_rejected) in zip(batches, refs):
            logps, counts = policy(pack_pairs(batch, layout, PAD, row_tokens=40))
            terms = objective(
                LossConfig(beta=0.5), PairLogps(*split_pairs(logps), ref_chosen, ref_rejected, *split_pairs(counts))
            )
            terms.loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            curves[layout].append(terms.loss.mean().item())
        weights[layout] = torch.cat([p.detach().flatten().clone() for p in policy.model.parameters()])
    assert curves["padded"][-1] < curves["padded"][0]  # it trains
    for layout in ("packed", "shared_prompt"):
        assert curves[layout] == pytest.approx(curves["padded"], abs=STEP_LOSS_ATOL), layout
        assert_same_sgd_weights(weights[layout], weights["padded"], initial, steps=len(batches), name=layout)


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir):
    batch = _random_pairs(3, seed=11)
    grads = []
    for recompute in (False, True):
        model = load_causal_lm(tiny_model_dir)
        if recompute:  # what train.gradient_checkpointing turns on in the worker
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy = PolicyLogps(model.train(), chunk_tokens=4)
        policy(pack_pairs(batch, "shared_prompt", PAD))[0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
