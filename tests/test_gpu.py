"""What only a CUDA device can show: bf16 through the chunked head, flex attention's backward, NCCL.

Each test is marked ``gpu`` and skips without CUDA (the reason is in `make test`'s summary); `make gpu-check`
runs them first on a lent GPU. Each compares against a float32 or padded-SDPA reference computed in the same
test. ``RAYALIGN_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead (gloo for NCCL; flex attention's backward,
which torch does not have on a CPU, is left out): a dry run of their logic, not a GPU check.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import REPO
from engines import PAD, deepspeed_engine, one_process_group, pairs_batch, token_budget_against_fixed_micro_batches

from rayalign.config import LoraConfig, LossConfig, TrainConfig
from rayalign.distributed import Collective
from rayalign.logprobs import PolicyLogps, split_pairs
from rayalign.losses import PairLogps, objective
from rayalign.models import load_causal_lm
from rayalign.packing import pack_pairs, row_width
from rayalign.train.step import PreferenceStep

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("RAYALIGN_GPU_TESTS_ON_CPU") == "1"


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cpu") if ON_CPU else torch.device("cuda", 0)


@pytest.fixture(scope="module")
def process_group(device):
    """One process, NCCL on the GPU as Ray Train sets it up for GPU workers."""
    with one_process_group("gloo" if ON_CPU else "nccl", device):
        yield


def _dpo_step(policy: PolicyLogps, batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and backward of the mean DPO loss; returns (loss, sequence log-probs, flat gradient)."""
    pairs = pack_pairs(batch, "shared_prompt", PAD).to(device)
    logps, counts = policy(pairs)
    ref_chosen = torch.as_tensor(batch["ref_chosen_logps"], device=device, dtype=torch.float32)
    ref_rejected = torch.as_tensor(batch["ref_rejected_logps"], device=device, dtype=torch.float32)
    terms = objective(
        LossConfig(beta=0.1), PairLogps(*split_pairs(logps), ref_chosen, ref_rejected, *split_pairs(counts))
    )
    loss = terms.loss.mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in policy.parameters() if p.grad is not None])
    return loss.detach().float().cpu(), logps.detach().float().cpu(), grad.cpu()


def test_a_bf16_step_through_the_chunked_head_agrees_with_float32(tiny_model_dir, device):
    batch = pairs_batch(6, seed=21)
    out = {}
    for dtype in ("float32", "bfloat16"):
        policy = PolicyLogps(load_causal_lm(tiny_model_dir, dtype), chunk_tokens=7).to(device)
        out[dtype] = _dpo_step(policy, batch, device)
        assert out[dtype][1].dtype == torch.float32  # log-probs leave the head in float32 whatever the weights
    (loss32, logps32, grad32), (loss16, logps16, grad16) = out["float32"], out["bfloat16"]
    # bf16 keeps 8 bits of mantissa: sums of ~20 token log-probs agree to a few hundredths relative.
    assert torch.allclose(logps16, logps32, rtol=2e-2, atol=0.1), (logps16, logps32)
    assert abs(float(loss16) - float(loss32)) < 2e-2
    assert torch.isfinite(grad16).all()
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.98, float(cosine)


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_flex_attention_forward_and_backward_equal_the_padded_sdpa_layout(tiny_model_dir, device, layout):
    """One unpadded row under flex attention's block mask against the padded batch under SDPA: the same
    response log-probs and the same gradients of every weight (float32)."""
    batch = pairs_batch(6, seed=23)
    results = {}
    for name, attention, lay, width in (
        ("sdpa padded", "sdpa", "padded", None),
        ("flex", "flex_attention", layout, row_width(None, "flex_attention")),
    ):
        policy = PolicyLogps(load_causal_lm(tiny_model_dir, attn_implementation=attention), chunk_tokens=16).to(device)
        pairs = pack_pairs(batch, lay, PAD, width).to(device)
        if name == "flex":
            assert pairs.input_ids.shape[0] == 1 and pairs.computed_tokens == pairs.real_tokens
        if ON_CPU and name == "flex":  # torch has no flex attention backward on the CPU
            with torch.no_grad():
                results[name] = (policy(pairs)[0].cpu(), None)
            continue
        logps, _ = policy(pairs)
        chosen, rejected = split_pairs(logps)
        (chosen - rejected).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters()]).cpu()
        results[name] = (logps.detach().cpu(), grads)
    (ref_logps, ref_grads), (flex_logps, flex_grads) = results["sdpa padded"], results["flex"]
    assert torch.allclose(flex_logps, ref_logps, atol=1e-4, rtol=0), (flex_logps - ref_logps).abs().max()
    if flex_grads is not None:
        assert torch.isfinite(flex_grads).all() and flex_grads.abs().sum() > 0
        assert torch.allclose(flex_grads, ref_grads, atol=1e-4, rtol=1e-3), (flex_grads - ref_grads).abs().max()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_token_budget_under_nccl_takes_the_same_steps_as_fixed_micro_batches(
    tiny_model_dir, device, process_group, zero_stage
):
    """The CPU test's comparison (test_batching) on the GPU under NCCL, the pass count agreed by a real
    all-reduce on the worker's device."""
    agree = Collective.of_worker_group(device).all_reduce_max
    token_budget_against_fixed_micro_batches(tiny_model_dir, zero_stage, device, agree_count=agree)


def test_lora_with_the_adapters_off_reference_trains_from_log_2(tiny_model_dir, device, process_group):
    """reference.backend adapters_off on the GPU in bf16 under DeepSpeed: the policy starts as its own
    reference (LoRA's B is zero), so the first loss is log 2 exactly; then the adapters train it down."""
    train = TrainConfig(micro_batch_size=4, zero_stage=2)
    engine = deepspeed_engine(
        tiny_model_dir, train, device, dtype="bfloat16", lora=LoraConfig(rank=8, alpha=16), lr=1e-2
    )
    batch = {key: value for key, value in pairs_batch(4, seed=25).items() if not key.startswith("ref_")}
    losses = []
    for _ in range(8):
        step = PreferenceStep(LossConfig(beta=0.5), train, PAD, device, reference_in_worker=True)
        done = step.optimizer_step(engine, batch, agree_count=lambda count: count)
        losses.append(float(sum(d.terms.loss.sum() for d in done)) / 4)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6), losses
    assert losses[-1] < losses[0] - 0.05, losses
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_reference_actor_and_a_train_worker_share_one_gpu(ray_cluster, tmp_path, capsys):
    """A real `rayalign train`: the reference actor (0.25 GPU) streams into one train worker (0.75 GPU) on one card."""
    import ray

    from rayalign.cli import main

    gpus = ray.cluster_resources().get("GPU", 0)
    if not ON_CPU and gpus < 1:
        pytest.skip(f"the test's Ray cluster sees {gpus} GPUs")
    overrides = {
        "scaling.use_gpu": not ON_CPU,
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 0.5,
        "scaling.gpus_per_worker": 0.75,
        "reference.gpus_per_actor": 0.0 if ON_CPU else 0.25,
        "reference.cpus_per_actor": 0.5,
        "reference.cache": False,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.epochs": 1,
        "output.root": str(tmp_path),
        "output.name": "one-gpu",
    }
    args = ["train", "--config", str(REPO / "jobs/configs/tiny-dpo.yaml")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    code = main(args)
    assert code == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "one-gpu"
    summary = json.loads((run / "summary.json").read_text())
    resolved = (run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == list(range(1, 7))
    assert summary["complete"] is True
    if not ON_CPU:
        assert "dtype: bfloat16" in resolved and "gpus_per_actor: 0.25" in resolved
        assert all(row["memory/peak_allocated_gib"] > 0 for row in train_rows)
    # The reference scored in the policy's own precision on the same card: the first loss is log 2
    # up to bf16 rounding of the two forward passes (different batch shapes).
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)
