"""Shared by the step tests on CPU (test_batching) and on a GPU (test_gpu): a batch as Ray Data hands it
to a worker, a one-process group as Ray Train sets it up, a real DeepSpeed engine around the policy, and
the comparison of a token budget's optimizer steps with fixed micro-batches."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from rayalign.config import LoraConfig, LossConfig, TrainConfig
from rayalign.train.deepspeed_settings import deepspeed_config
from rayalign.train.step import PreferenceStep

PAD = 0
# Shifts every seed the exactness tests draw their pairs from: `RAYALIGN_TEST_SEED=7 pytest ...` runs them on
# other data (how they were run in a loop over seeds and thread counts before being trusted).
TEST_SEED = int(os.environ.get("RAYALIGN_TEST_SEED", "0"))


def pairs_batch(num_pairs: int, seed: int) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands it over (object columns of int arrays), with a reference column."""
    rng = random.Random(seed + TEST_SEED)
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


def launcher_env() -> dict[str, str]:
    """The variables a launcher sets for rank 0 of a one-process group (DeepSpeed reads them), on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


@contextlib.contextmanager
def one_process_group(backend: str, device: torch.device, env: dict[str, str] | None = None) -> Iterator[None]:
    """A one-process ``torch.distributed`` group (gloo or NCCL) as Ray Train would have set up, for an
    in-process DeepSpeed engine; the launcher's variables (``env``, else :func:`launcher_env`) set meanwhile."""
    import torch.distributed as dist

    env = env or launcher_env()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{env['MASTER_PORT']}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def deepspeed_engine(
    model_dir,
    train: TrainConfig,
    device: torch.device,
    dtype: str = "float32",
    lora: LoraConfig | None = None,
    lr: float = 1e-3,
    optimizer: str = "adamw",
):
    """A real DeepSpeed engine around ``PolicyLogps`` on ``device`` (in a process group already set up).
    ``optimizer``: ``adamw`` (what training uses) or ``sgd`` (plain, no momentum: the exactness tests)."""
    import deepspeed

    from rayalign.logprobs import PolicyLogps, ResponseHead
    from rayalign.models import load_causal_lm, with_adapters

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = load_causal_lm(model_dir, dtype)
    policy = PolicyLogps(with_adapters(model, lora) if lora else model, chunk_tokens=32).to(device)
    deepspeed.utils.set_z3_leaf_modules(policy, [ResponseHead])
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizers = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    engine, *_ = deepspeed.initialize(
        model=policy, optimizer=optimizers[optimizer](trainable, lr=lr), config=deepspeed_config(train, dtype)
    )
    return engine


FLOAT32_EPS = torch.finfo(torch.float32).eps
# A step's loss is the mean of per-pair losses, each a logsigmoid of beta times four float32 sums of at most
# 20 response-token log-probs of magnitude at most ~10 (vocabulary 128): another summation order moves each sum
# by at most 20 * 10 * eps = 2.4e-5 and the loss by at most beta * 4 * 2.4e-5 = 5e-5 (beta 0.5).
STEP_LOSS_ATOL = 1e-4
# A gradient entry sums at most 6 pairs x 90 positions of float32 products: another order moves it by at most
# ~540 * eps = 6.5e-5 of the largest entry; rounded up.
GRADIENT_RTOL = 1e-4


def assert_same_sgd_weights(
    trained: torch.Tensor, expected: torch.Tensor, initial: torch.Tensor, steps: int, name: str
):
    """Weights after ``steps`` plain-SGD steps from ``initial`` that took the same gradients up to summation order.

    Why SGD: each update is -lr * g, linear in the gradient, so the weights differ only by the gradients'
    rounding (:data:`GRADIENT_RTOL` of the largest update) plus one rounding of each weight per step (one
    ulp of the largest weight a step). Adam divides by sqrt(v): an entry whose gradient is ~0 moves by
    +-lr on rounding noise alone, so weights after Adam are not comparable at float precision."""
    update = (expected - initial).abs().max().item()
    assert update > 0, f"{name}: nothing trained"
    atol = GRADIENT_RTOL * update + steps * FLOAT32_EPS * expected.abs().max().item()
    worst = (trained - expected).abs().max().item()
    print(f"{name}: weights differ by {worst:.3g}, tolerance {atol:.3g}")  # shown with -s: the margin
    assert worst <= atol, f"{name}: weights differ by {worst:.3g} > {atol:.3g} (largest update {update:.3g})"


def token_budget_against_fixed_micro_batches(model_dir, zero_stage: int, device: torch.device, agree_count) -> None:
    """Same pairs per step (6), split 3 x 2, 1 x 6, or by a 120-token budget (several passes, a different
    count each step): three plain-SGD steps take the same losses and leave the same weights, up to the order of
    float32 sums (:func:`assert_same_sgd_weights`, :data:`STEP_LOSS_ATOL`)."""
    import deepspeed

    steps = [pairs_batch(6, seed=s) for s in range(3)]
    for batch in steps:  # one long pair per step: under the budget, passes hold unequal numbers of pairs
        batch["prompt_ids"][0] = np.arange(3, 75)
    splits = {
        "3x2": TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3, zero_stage=zero_stage),
        "1x6": TrainConfig(micro_batch_size=6, zero_stage=zero_stage),
        "budget": TrainConfig(
            micro_batch_size=2, gradient_accumulation_steps=3, zero_stage=zero_stage, tokens_per_batch=120
        ),
    }

    def gathered(engine) -> torch.Tensor:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):  # ZeRO-3 holds only shards
            return torch.cat([p.detach().flatten().float().cpu().clone() for p in params])

    losses, weights, passes, pass_sizes = {}, {}, {}, []
    for name, train in splits.items():
        engine = deepspeed_engine(model_dir, train, device, lr=0.1, optimizer="sgd")
        initial = gathered(engine)
        losses[name], passes[name] = [], []
        for batch in steps:
            done = PreferenceStep(LossConfig(beta=0.5), train, PAD, device).optimizer_step(engine, batch, agree_count)
            losses[name].append(float(sum(d.terms.loss.sum() for d in done)) / 6)
            passes[name].append(len(done))
            if name == "budget":
                pass_sizes.append([d.terms.loss.numel() for d in done])
        assert engine.global_steps == 3
        weights[name] = gathered(engine)
        del engine
    assert passes["3x2"] == [3, 3, 3] and passes["1x6"] == [1, 1, 1]
    assert all(count >= 2 for count in passes["budget"])
    # Passes of unequal pair counts: a per-pass mean instead of the step's would weigh pairs unequally.
    assert any(len(set(sizes)) > 1 for sizes in pass_sizes), pass_sizes
    for name in ("1x6", "budget"):
        assert losses[name] == pytest.approx(losses["3x2"], abs=STEP_LOSS_ATOL), name
        assert_same_sgd_weights(weights[name], weights["3x2"], initial, steps=3, name=name)
