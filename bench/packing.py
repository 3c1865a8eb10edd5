"""What each layout pays: padded vs packed vs shared-prompt, same model, data and settings, one run.

    python bench/packing.py                        # CPU: a SmolLM2-135M-shaped model, HH-RLHF at max_length 512
    python bench/packing.py --quick                # CI-sized: the tiny model, a few steps
    python bench/packing.py --device cuda          # on a GPU (bf16)
    python bench/packing.py --tokens-per-batch 4096   # the token-budget contender's budget
    python bench/packing.py --device cuda --attention flex_attention   # block masks, one row per pass

Contenders: ``padded``, ``packed`` and ``shared_prompt`` take each step's pairs in one pass;
``shared_prompt_budget`` takes the same pairs in passes of at most ``--tokens-per-batch`` tokens
(``train.tokens_per_batch``, :mod:`rayalign.train.batching`), accumulating the gradient: the same step,
in less memory per pass, with similar-sized pairs sharing rows (less padding).

Each layout (``rayalign.packing``) trains the same fresh model for the same optimizer steps on the same
pairs in the same order with the same code as a rayalign worker's step (``PolicyLogps``: chunked output
head over response tokens only; ``rayalign.losses.objective``, DPO; AdamW; gradient clipping), in a
process of its own so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the
process's peak resident set on a CPU (model load included). Packing the batch is inside the timed step,
as in training. The reference log-probs are scored once beforehand (padded layout) and shared.

Exactness, in the same run: before training, each layout scores the first batches without gradients;
``max_abs_logp_diff`` is the largest difference of a sequence's summed log-prob from the padded
layout's, and ``max_abs_loss_diff`` the largest difference of a training step's loss (the curves).

Pairs/s counts pairs; ``pair_tokens/s`` counts each pair's tokens as a padded trainer sees them without
padding (prompt twice, plus both responses: the same number for every layout); ``computed_tokens/s``
counts the positions the layout actually computes, padding included. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers of bench/gpu_throughput.py
from gpu_throughput import (  # noqa: E402
    HH,
    TINY,
    ModelSpec,
    Pairs,
    build_model_dir,
    device_info,
    parameter_counts,
    read_records,
    select_pairs,
    versions,
)

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("padded", "packed", "shared_prompt")
BUDGETED = "shared_prompt_budget"  # the shared-prompt layout in passes of --tokens-per-batch
# SmolLM2-135M's shape (30 layers, 576 wide, 9 heads over 3 KV heads, MLP 1536), random weights; the
# vocabulary is the BPE trained here on the HH text (SmolLM2's own is 49,152).
SMALL = ModelSpec(layers=30, hidden=576, heads=9, kv_heads=3, mlp=1536, vocab=32_000, tokenizer_records=None)


@dataclass(frozen=True)
class Job:
    layout: str
    device: str
    dtype: str
    model_dir: str
    batches: list[dict[str, list[list[int]]]]
    references: list[tuple[list[float], list[float]]]
    check_batches: int
    lr: float
    beta: float
    row_tokens: int | None
    chunk_tokens: int
    warmup: int
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of every weight
    reference_in_step: bool = False  # with LoRA: score the reference each step with the adapters off
    tokens_per_batch: int | None = None  # split each step's pairs into passes of at most this many tokens
    attention: str = "sdpa"  # model.attn_implementation


def _peak_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train_layout(job: Job) -> dict[str, Any]:
    """One layout, in its own process: score the check batches, then train and time every step."""
    import torch

    from rayalign.config import LoraConfig, LossConfig, PackingConfig, TrainConfig
    from rayalign.logprobs import PolicyLogps
    from rayalign.models import load_causal_lm, load_tokenizer, with_adapters
    from rayalign.packing import pack_pairs, row_width
    from rayalign.schema import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS
    from rayalign.train.step import PreferenceStep

    torch.manual_seed(0)
    device = torch.device(job.device)
    pad_id = load_tokenizer(job.model_dir).pad_token_id
    model = load_causal_lm(job.model_dir, job.dtype, job.attention)
    row_tokens = row_width(job.row_tokens, job.attention)
    if job.lora_rank:
        model = with_adapters(model, LoraConfig(rank=job.lora_rank, alpha=2 * job.lora_rank))
    policy = PolicyLogps(model.to(device), job.chunk_tokens)
    # The training step itself (rayalign.train.step), one pass per step's pairs unless a token budget splits them.
    batching = TrainConfig(
        micro_batch_size=len(job.batches[0]["prompt_ids"]),
        tokens_per_batch=job.tokens_per_batch,
        packing=PackingConfig(layout=job.layout, row_tokens=job.row_tokens, logps_chunk_tokens=job.chunk_tokens),
    )
    step = PreferenceStep(
        LossConfig(type="dpo", beta=job.beta),
        batching,
        pad_id,
        device,
        job.attention,
        reference_in_worker=job.reference_in_step,
    )

    policy.eval()
    with torch.no_grad():
        checked = [
            policy(pack_pairs(b, job.layout, pad_id, row_tokens).to(device))[0].double().cpu().tolist()
            for b in job.batches[: job.check_batches]
        ]
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job.lr, weight_decay=0.0)
    losses, ends, computed, real = [], [], [], []
    _sync(job.device)
    start = time.perf_counter()
    passes = []
    for batch, (ref_chosen, ref_rejected) in zip(job.batches, job.references):
        num_pairs = len(batch["prompt_ids"])
        if not job.reference_in_step:  # with it, the step scores the reference with the adapters off
            batch = {**batch, REF_CHOSEN_LOGPS: ref_chosen, REF_REJECTED_LOGPS: ref_rejected}
        parts = step.micro_batches(batch, agree_count=lambda count: count)
        passes.append(len(parts))
        loss = torch.zeros((), device=device)
        for part in parts:  # one pass each, the gradient accumulated: the step's loss is the pair mean
            scored = step.score(policy, part)
            computed.append(scored.computed_tokens)
            real.append(scored.real_tokens)
            part_loss = scored.terms.loss.sum() / num_pairs
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # also the step's synchronisation point
        ends.append(time.perf_counter())
    timed = slice(job.warmup, None)
    elapsed = ends[-1] - (ends[job.warmup - 1] if job.warmup else start)
    pairs_timed = sum(len(b["prompt_ids"]) for b in job.batches[timed])
    pair_tokens = sum(
        2 * len(p) + len(c) + len(r)
        for b in job.batches[timed]
        for p, c, r in zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"])
    )
    optimizer_state = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    return {
        "layout": job.layout,
        "tokens_per_batch": job.tokens_per_batch,
        "passes_per_step": sum(passes) / len(passes),
        "lora_rank": job.lora_rank,
        "reference_in_step": job.reference_in_step,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "optimizer_state_gib": optimizer_state / 2**30,
        "pairs_per_s": pairs_timed / elapsed,
        "pair_tokens_per_s": pair_tokens / elapsed,
        "computed_tokens_per_s": sum(computed[sum(passes[: job.warmup]) :]) / elapsed,
        "padding_share": 1 - sum(real) / sum(computed),
        "computed_tokens_per_pair": sum(computed) / sum(len(b["prompt_ids"]) for b in job.batches),
        "peak_memory_gib": _peak_memory_gib(job.device),
        "step_s": [round(b - a, 4) for a, b in zip([start, *ends[:-1]], ends)],
        "losses": losses,
        "checked_logps": checked,
    }


def _in_own_process(job: Job) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(train_layout, (job,))


def reference_logps(model_dir: Path, dtype: str, device: str, batches, row_tokens: int, chunk_tokens: int):
    """Σ log π_ref per sequence of every batch (padded layout, no gradients): the same for every layout."""
    import torch

    from rayalign.logprobs import sequence_logps, split_pairs
    from rayalign.models import load_causal_lm, load_tokenizer
    from rayalign.packing import pack_pairs

    pad_id = load_tokenizer(model_dir).pad_token_id
    model = load_causal_lm(model_dir, dtype).to(device).eval()
    out = []
    with torch.no_grad():
        for b in batches:
            chosen, rejected = split_pairs(
                sequence_logps(model, pack_pairs(b, "padded", pad_id, row_tokens).to(device), chunk_tokens)[0]
            )
            out.append((chosen.cpu().tolist(), rejected.cpu().tolist()))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: tiny model, max_length 256, 5 steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="pairs per step (default 8; GPU 64)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per layout (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    parser.add_argument("--max-length", type=int, default=None, help="data.max_length (default 512)")
    parser.add_argument("--row-tokens", type=int, default=None, help="train.packing.row_tokens (default: None)")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="train.packing.logps_chunk_tokens")
    parser.add_argument(
        "--attention",
        choices=("sdpa", "eager", "flex_attention"),
        default="sdpa",
        help="model.attn_implementation of every contender (flex_attention: GPU only)",
    )
    parser.add_argument(
        "--tokens-per-batch",
        type=int,
        default=None,
        help="train.tokens_per_batch of the shared_prompt_budget contender (default: a quarter of "
        "the shared-prompt step's tokens, so a step takes about four passes)",
    )
    parser.add_argument("--data", default=str(HH))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-packing"))
    parser.add_argument("--out", default=None, help="JSON result (default bench/results/packing-<device>[-quick].json)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.attention == "flex_attention" and args.device == "cpu":
        parser.error("--attention flex_attention needs --device cuda: torch has no flex-attention backward on CPU")
    args.micro_batch = args.micro_batch or (4 if args.quick else 64 if args.device == "cuda" else 8)
    args.steps = args.steps or (5 if args.quick else 12)
    args.warmup = min(args.warmup, 1 if args.quick else args.warmup)
    args.max_length = args.max_length or (256 if args.quick else 512)
    suffix = f"{args.device}{'-quick' if args.quick else ''}"
    args.out = Path(args.out or REPO / "bench" / "results" / f"packing-{suffix}.json")
    return args


@dataclass(frozen=True)
class Inputs:
    """What every variant of a bench trains on: the model, the pairs, their batches and reference log-probs."""

    model_dir: Path
    pairs: Pairs
    batches: list[dict[str, list[list[int]]]]
    references: list[tuple[list[float], list[float]]]


def prepare_inputs(args: argparse.Namespace, spec: ModelSpec | None = None) -> Inputs:
    """The model (built once, reused; ``spec``, else the tiny or the small shape), the first HH pairs in
    micro-batches, and their reference log-probs."""
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"data file not found: {data} (see ../shared/data/README.md)")
    from rayalign.config import DataConfig
    from rayalign.models import load_tokenizer

    spec = spec or (TINY if args.quick else SMALL)
    model_dir = build_model_dir(spec, args.dtype, data, max(1024, 2 * args.max_length), Path(args.work_dir) / "models")
    data_cfg = DataConfig(
        paths=[str(data)], format="hh", max_length=args.max_length, max_prompt_length=args.max_length // 2
    )
    pairs: Pairs = select_pairs(read_records(data), args.micro_batch * args.steps, load_tokenizer(model_dir), data_cfg)
    batches = [pairs.columns(i * args.micro_batch, (i + 1) * args.micro_batch) for i in range(args.steps)]
    print(
        f"[bench] {model_dir.name}: {parameter_counts(model_dir)['total'] / 1e6:.1f} M parameters; "
        f"{len(pairs)} HH pairs, {args.steps} steps × {args.micro_batch} pairs, {args.device} {args.dtype}",
        flush=True,
    )
    references = reference_logps(model_dir, args.dtype, args.device, batches, args.row_tokens, args.chunk_tokens)
    return Inputs(model_dir, pairs, batches, references)


def main(argv: list[str] | None = None) -> int:
    from rayalign.train.batching import pair_tokens

    args = parse_args(argv)
    started = time.perf_counter()
    inputs = prepare_inputs(args)
    model_dir, pairs, batches, references = inputs.model_dir, inputs.pairs, inputs.batches, inputs.references
    budget = args.tokens_per_batch or max(
        64, sum(sum(pair_tokens(b, "shared_prompt")) for b in batches) // (4 * len(batches))
    )
    contenders = {layout: (layout, None) for layout in LAYOUTS} | {BUDGETED: ("shared_prompt", budget)}
    results = {}
    for name, (layout, tokens_per_batch) in contenders.items():
        job = Job(
            layout,
            args.device,
            args.dtype,
            str(model_dir),
            batches,
            references,
            min(2, args.steps),
            1e-5,
            0.1,
            args.row_tokens,
            args.chunk_tokens,
            args.warmup,
            tokens_per_batch=tokens_per_batch,
            attention=args.attention if layout != "padded" else "sdpa",
        )
        results[name] = _in_own_process(job)
        r = results[name]
        print(
            f"[bench] {name:>20}: {r['pairs_per_s']:7.2f} pairs/s  {r['pair_tokens_per_s']:8.0f} pair tokens/s  "
            f"{r['computed_tokens_per_pair']:6.0f} computed tokens/pair  padding {r['padding_share']:.0%}  "
            f"{r['passes_per_step']:.1f} passes/step  peak {r['peak_memory_gib']:.2f} GiB",
            flush=True,
        )

    padded = results["padded"]
    logp_diff = max(
        abs(a - b)
        for layout in LAYOUTS
        for batch_a, batch_b in zip(results[layout]["checked_logps"], padded["checked_logps"])
        for a, b in zip(batch_a, batch_b)
    )
    loss_diff = max(abs(a - b) for r in results.values() for a, b in zip(r["losses"], padded["losses"]))
    summary = {
        "padded_pairs_per_s": round(padded["pairs_per_s"], 3),
        "packed_pairs_per_s": round(results["packed"]["pairs_per_s"], 3),
        "shared_prompt_pairs_per_s": round(results["shared_prompt"]["pairs_per_s"], 3),
        "shared_prompt_budget_pairs_per_s": round(results[BUDGETED]["pairs_per_s"], 3),
        "shared_prompt_vs_padded": round(results["shared_prompt"]["pairs_per_s"] / padded["pairs_per_s"], 2),
        "packed_vs_padded": round(results["packed"]["pairs_per_s"] / padded["pairs_per_s"], 2),
        "tokens_per_batch": budget,
        "passes_per_step": {k: round(v["passes_per_step"], 2) for k, v in results.items()},
        "padding_share": {k: round(v["padding_share"], 4) for k, v in results.items()},
        "peak_memory_gib": {k: round(v["peak_memory_gib"], 3) for k, v in results.items()},
        "max_abs_logp_diff": logp_diff,
        "max_abs_loss_diff": loss_diff,
        "device": args.device,
        "attention": args.attention,
        "dtype": args.dtype,
    }
    results = {k: {key: v for key, v in r.items() if key != "checked_logps"} for k, r in results.items()}
    return write_report(args, summary, model_dir, pairs, {"layouts": results}, started)


def write_report(
    args: argparse.Namespace,
    summary: dict[str, Any],
    model_dir: Path,
    pairs: Pairs,
    results: dict[str, Any],
    started: float,
) -> int:
    """The JSON result file (summary, settings, model, data, ``results``, machine, versions), then the
    summary as the last stdout line."""
    report = {
        "summary": summary,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"dir": model_dir.name, **parameter_counts(model_dir)},
        "data": {
            "file": Path(args.data).name,
            "pairs": len(pairs),
            "records_read": pairs.records_read,
            "quarantined": pairs.quarantined,
            "truncated": pairs.truncated,
        },
        **results,
        "machine": device_info(args.device),
        "versions": versions(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {args.out}", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
