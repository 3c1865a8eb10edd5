"""Full fine-tuning vs LoRA, same model, data and settings, one run: trainable parameters, optimizer state,
peak memory, pairs/s.

    python bench/lora.py                  # CPU: the SmolLM2-135M-shaped model of bench/packing.py, HH-RLHF
    python bench/lora.py --quick          # CI-sized: the tiny model
    python bench/lora.py --device cuda    # on a GPU (bf16)

Both variants run the training step of ``bench/packing.py`` (shared-prompt layout, chunked head, DPO, AdamW)
in a process of their own; LoRA adapts every linear layer but the head (rank ``--rank``, alpha 2 × rank).
Writes ``bench/results/lora-<device>[-quick].json``; the last line is one JSON object.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import REPO, Job, _in_own_process, parse_args, prepare_inputs, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    rank = 16
    if argv is None:
        argv = sys.argv[1:]
    if "--rank" in argv:
        i = argv.index("--rank")
        rank, argv = int(argv[i + 1]), argv[:i] + argv[i + 2 :]
    args = parse_args(argv)
    suffix = f"{args.device}{'-quick' if args.quick else ''}"
    if args.out.name.startswith("packing-"):
        args.out = REPO / "bench" / "results" / f"lora-{suffix}.json"
    started = time.perf_counter()
    inputs = prepare_inputs(args)
    model_dir, pairs, batches, references = inputs.model_dir, inputs.pairs, inputs.batches, inputs.references
    results = {}
    # lora_adapters_off: reference.backend adapters_off, the reference scored in the step (one more
    # forward, no backward) instead of read from the actors' column.
    for name, lora_rank, in_step in (("full", None, False), ("lora", rank, False), ("lora_adapters_off", rank, True)):
        job = Job(
            "shared_prompt",
            args.device,
            args.dtype,
            str(model_dir),
            batches,
            references,
            0,
            1e-4 if lora_rank is None else 1e-3,
            0.1,
            args.row_tokens,
            args.chunk_tokens,
            args.warmup,
            lora_rank,
            in_step,
        )
        r = _in_own_process(job)
        results[name] = {k: v for k, v in r.items() if k != "checked_logps"}
        print(
            f"[bench] {name:>17}: {r['trainable_parameters'] / 1e6:8.3f} M trainable, optimizer state "
            f"{r['optimizer_state_gib']:.3f} GiB, peak {r['peak_memory_gib']:.2f} GiB, {r['pairs_per_s']:.3f} pairs/s",
            flush=True,
        )
    full, lora = results["full"], results["lora"]
    summary = {
        "full_trainable_parameters": full["trainable_parameters"],
        "lora_trainable_parameters": lora["trainable_parameters"],
        "full_optimizer_state_gib": round(full["optimizer_state_gib"], 4),
        "lora_optimizer_state_gib": round(lora["optimizer_state_gib"], 4),
        "full_peak_memory_gib": round(full["peak_memory_gib"], 3),
        "lora_peak_memory_gib": round(lora["peak_memory_gib"], 3),
        "full_pairs_per_s": round(full["pairs_per_s"], 3),
        "lora_pairs_per_s": round(lora["pairs_per_s"], 3),
        "lora_adapters_off_pairs_per_s": round(results["lora_adapters_off"]["pairs_per_s"], 3),
        "lora_adapters_off_peak_memory_gib": round(results["lora_adapters_off"]["peak_memory_gib"], 3),
        "lora_rank": rank,
        "device": args.device,
        "dtype": args.dtype,
    }
    return write_report(args, summary, model_dir, pairs, {"variants": results}, started)


if __name__ == "__main__":
    sys.exit(main())
