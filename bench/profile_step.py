"""Where a training step's time goes: rayalign's step against the bare padded loop, same model, pairs and settings.

    python bench/profile_step.py              # CPU: SmolLM2-135M's shape, HH-RLHF, micro-batch 4 (issue 40's setting)
    python bench/profile_step.py --quick      # CI-sized: the tiny model
    python bench/profile_step.py --device cuda --micro-batch 16

Contenders, each in a process of its own, on the same batches (``bench/packing.py``'s inputs):

* ``bare``: ``bench/gpu_throughput.py``'s bare loop (padded batches, full float32 logits, DPO, fused AdamW);
* ``step_<layout>``: rayalign's training step (:class:`rayalign.train.step.PreferenceStep`: the layout's packing,
  the chunked log-prob head, the objective) with torch's AdamW and gradient clipping, no DeepSpeed;
* ``deepspeed_shared_prompt``: the same step as a worker runs it, through a DeepSpeed ZeRO-2 engine (one
  process, gloo): what DeepSpeed adds. Ray Train's own per-step cost is the gap between this and
  ``bench/gpu_throughput.py``'s ``rayalign``.

For each: seconds per step and computed tokens per second over unprofiled steps after a warm-up (so the profiler's
own cost is not in the rates), then the same steps under ``torch.profiler``: the share of the step in each named
range (``rayalign.pack``, ``rayalign.policy_logps``, ``rayalign.backward``, ``rayalign.optimizer_step`` and the bare
loop's own), the share of op time by kind (attention, matmuls, the log-prob head, the optimizer, copies), the
attention ops that ran (which SDPA kernel), and the top ops. ``vs_bare`` is computed tokens/s over the bare
loop's: per computed token, how efficient the contender is. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import SMOLLM2_135M, TINY, bare_sequence_logps, device_info, versions  # noqa: E402
from packing import parse_args as packing_args  # noqa: E402
from packing import prepare_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("bare", "step_padded", "step_packed", "step_shared_prompt", "deepspeed_shared_prompt")
# Op kinds by name fragment, first match wins; everything else is "elementwise and other".
OP_KINDS = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("log-prob head", ("logsumexp", "log_softmax", "gather")),
    ("optimizer", ("adam", "_foreach_", "optimizer")),
    ("copies and layout", ("copy_", "contiguous", "aten::cat", "index", "aten::to", "clone", "zeros", "fill_")),
)


@dataclass(frozen=True)
class Job:
    contender: str
    device: str
    dtype: str
    model_dir: str
    batches: list[dict[str, list[list[int]]]]
    references: list[tuple[list[float], list[float]]]
    warmup: int
    timed: int
    profiled: int


def _kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in OP_KINDS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return kind
    return "elementwise and other"


def _bare_step(job: Job, model, optimizer):
    import torch
    import torch.nn.functional as F
    from torch.profiler import record_function

    from rayalign.logprobs import split_pairs
    from rayalign.models import load_tokenizer
    from rayalign.packing import pack_pairs

    pad_id, device = load_tokenizer(job.model_dir).pad_token_id, torch.device(job.device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch, reference) -> int:
        with record_function("bare.pack"):
            pairs = pack_pairs(batch, "padded", pad_id)
            computed = pairs.computed_tokens
            pairs = pairs.to(device)
        with record_function("bare.policy_logps"):
            chosen, rejected = split_pairs(bare_sequence_logps(model, pairs)[0])
            ref_chosen, ref_rejected = (torch.tensor(r, device=device) for r in reference)
            loss = -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        with record_function("bare.backward"):
            loss.backward()
        with record_function("bare.optimizer_step"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return computed

    return step


def _rayalign_step(job: Job, model, layout: str, deepspeed: bool):
    import torch
    from torch.profiler import record_function

    from rayalign.config import LossConfig, PackingConfig, TrainConfig
    from rayalign.logprobs import PolicyLogps
    from rayalign.models import load_tokenizer
    from rayalign.schema import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS
    from rayalign.train.step import PreferenceStep
    from rayalign.train.worker import adamw

    device = torch.device(job.device)
    batching = TrainConfig(
        micro_batch_size=len(job.batches[0]["prompt_ids"]),
        zero_stage=2,
        learning_rate=1e-5,
        weight_decay=0.0,
        packing=PackingConfig(layout=layout),
    )
    pad_id = load_tokenizer(job.model_dir).pad_token_id
    step = PreferenceStep(LossConfig(type="dpo", beta=0.1), batching, pad_id, device)
    policy = PolicyLogps(model, batching.packing.logps_chunk_tokens)
    optimizer = adamw(list(policy.parameters()), batching)  # the workers' own
    if deepspeed:
        import deepspeed as ds

        from rayalign.train.deepspeed_settings import deepspeed_config

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0")
        os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
        ds.init_distributed(dist_backend="gloo" if job.device == "cpu" else "nccl")
        engine, _, _, _ = ds.initialize(model=policy, optimizer=optimizer, config=deepspeed_config(batching, job.dtype))

        def ds_step(batch, reference) -> int:
            batch = {**batch, REF_CHOSEN_LOGPS: reference[0], REF_REJECTED_LOGPS: reference[1]}
            return sum(s.computed_tokens for s in step.optimizer_step(engine, batch, agree_count=lambda n: n))

        return ds_step

    params = [p for p in policy.parameters() if p.requires_grad]

    def plain_step(batch, reference) -> int:
        batch = {**batch, REF_CHOSEN_LOGPS: reference[0], REF_REJECTED_LOGPS: reference[1]}
        scored = step.score(policy, batch)
        with record_function("rayalign.backward"):
            (scored.terms.loss.sum() / len(batch["prompt_ids"])).backward()
        with record_function("rayalign.optimizer_step"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return scored.computed_tokens

    return plain_step


def run(job: Job) -> dict[str, Any]:
    """One contender in its own process: warm up, time, then profile the same steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rayalign.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(job.model_dir, job.dtype).to(job.device)
    model.train()
    if job.contender == "bare":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        step = _bare_step(job, model, optimizer)
    else:
        layout = job.contender.split("_", 1)[1]
        step = _rayalign_step(job, model, layout, deepspeed=job.contender.startswith("deepspeed"))
    work = list(zip(job.batches, job.references))

    def sync():
        if job.device == "cuda":
            torch.cuda.synchronize()

    for batch, reference in work[: job.warmup]:
        step(batch, reference)
    sync()
    started, computed = time.perf_counter(), 0
    for batch, reference in work[job.warmup : job.warmup + job.timed]:
        computed += step(batch, reference)
    sync()
    elapsed = time.perf_counter() - started
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if job.device == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled_start = time.perf_counter()
        for batch, reference in work[job.warmup : job.warmup + job.profiled]:
            step(batch, reference)
        sync()
        profiled_s = time.perf_counter() - profiled_start
    return {"contender": job.contender, **_rates(job, elapsed, computed), **_profile_tables(prof, job, profiled_s)}


def _rates(job: Job, elapsed: float, computed: int) -> dict[str, Any]:
    pairs = sum(len(b["prompt_ids"]) for b in job.batches[job.warmup : job.warmup + job.timed])
    return {
        "s_per_step": elapsed / job.timed,
        "pairs_per_s": pairs / elapsed,
        "computed_tokens_per_step": computed / job.timed,
        "computed_tokens_per_s": computed / elapsed,
    }


def _profile_tables(prof, job: Job, profiled_s: float) -> dict[str, Any]:
    time_of = "self_device_time_total" if job.device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    ranges = {
        e.key: e.cpu_time_total / 1e6 / profiled_s
        for e in events
        if e.key.startswith(("rayalign.", "bare.")) and e.key != "rayalign.policy_logps.inner"
    }
    ops = [e for e in events if not e.key.startswith(("rayalign.", "bare.", "ProfilerStep"))]
    total = sum(getattr(e, time_of) for e in ops) or 1
    kinds: dict[str, float] = {}
    for e in ops:
        kinds[_kind(e.key)] = kinds.get(_kind(e.key), 0.0) + getattr(e, time_of) / total
    top = sorted(ops, key=lambda e: getattr(e, time_of), reverse=True)[:12]
    return {
        "range_share_of_step": {k: round(v, 4) for k, v in sorted(ranges.items())},
        "op_time_by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "attention_ops": sorted({e.key for e in ops if _kind(e.key) == "attention"}),
        "top_ops": [{"op": e.key, "share": round(getattr(e, time_of) / total, 4), "calls": e.count} for e in top],
        "profiled_s_per_step": profiled_s / job.profiled,
    }


def _in_own_process(job: Job) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(run, (job,))


def table(results: dict[str, dict[str, Any]]) -> str:
    kinds = sorted({k for r in results.values() for k in r["op_time_by_kind"]})
    head = "| contender | s/step | computed tok/step | computed tok/s | ÷ bare | " + " | ".join(kinds) + " |"
    lines = [head, "|---" + "|---:" * (4 + len(kinds)) + "|"]
    bare = results["bare"]["computed_tokens_per_s"]
    for name, r in results.items():
        shares = " | ".join(f"{r['op_time_by_kind'].get(k, 0):.0%}" for k in kinds)
        lines.append(
            f"| {name} | {r['s_per_step']:.2f} | {r['computed_tokens_per_step']:.0f} | "
            f"{r['computed_tokens_per_s']:.0f} | {r['computed_tokens_per_s'] / bare:.2f} | {shares} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=4)
    parser.add_argument("--profiled", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default=None, help="default bench/results/profile-step-<device>[-quick].json")
    args = parser.parse_args(argv)
    steps = args.warmup + max(args.timed, args.profiled)
    inputs_args = packing_args(
        [*(["--quick"] if args.quick else []), "--device", args.device, "--micro-batch", str(args.micro_batch)]
        + ["--steps", str(steps)]
    )
    started = time.perf_counter()
    inputs = prepare_inputs(inputs_args, TINY if args.quick else SMOLLM2_135M)
    results = {}
    for name in args.contenders.split(","):
        job = Job(
            name,
            args.device,
            inputs_args.dtype,
            str(inputs.model_dir),
            inputs.batches,
            inputs.references,
            args.warmup,
            args.timed,
            args.profiled,
        )
        results[name] = _in_own_process(job)
        r = results[name]
        print(
            f"[profile] {name}: {r['s_per_step']:.2f} s/step, {r['computed_tokens_per_s']:.0f} computed tok/s, "
            f"ranges {r['range_share_of_step']}, kinds {r['op_time_by_kind']}",
            flush=True,
        )
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": vars(args) | {"max_length": inputs_args.max_length, "dtype": inputs_args.dtype},
        "model": inputs.model_dir.name,
        "results": results,
        "table": table(results) if "bare" in results else None,
        "machine": device_info(args.device),
        "versions": versions(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    suffix = f"{args.device}{'-quick' if args.quick else ''}"
    out = Path(args.out or REPO / "bench" / "results" / f"profile-step-{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["table"]:
        print(report["table"])
    print(f"[profile] wrote {out}", flush=True)
    print(json.dumps({name: round(r["computed_tokens_per_s"], 1) for name, r in results.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
