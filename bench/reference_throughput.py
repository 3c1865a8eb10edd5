"""Reference scoring throughput: vLLM backend vs transformers backend, same model and data, one run.

    .venv/bin/python bench/reference_throughput.py [--model-dir DIR] [--pairs 128] [--batch-size 32]

Both scorers are the classes the Ray Data reference actors run
(rayalign.reference.actors), called in this process on identical batches of
token ids. Engine start-up is reported separately from steady-state
throughput (tokens scored per second, prompt + response of both sequences,
after one warm-up batch). Data: the real HH-RLHF pairs in ../shared/data when
present, else the synthetic task. Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host  # the stdlib module (our package folder is never importable as `platform`)
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="HF model directory (default: the tiny Llama)")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reference_throughput.json"))
    args = parser.parse_args()

    # In-process engine core: this script is the only vLLM client.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import numpy as np

    from rayalign.config import config_from_dict
    from rayalign.data.parsing import RecordError, parse_record
    from rayalign.data.synthetic import arithmetic_pairs
    from rayalign.data.tokenizing import tokenize_pair
    from rayalign.models import load_tokenizer, publish_model, resolve_model_dir
    from rayalign.reference.actors import scorer_for
    from rayalign.schema import REF_CHOSEN_LOGPS, TOKEN_COLUMNS

    tree = {
        "model": {"path": args.model_dir} if args.model_dir else {"tiny": {}},
        "data": {"synthetic": {}, "max_length": args.max_length, "max_prompt_length": args.max_length // 2},
        "reference": {"vllm": {"max_model_len": args.max_length + 1}},
        "output": {"root": str(REPO / "runs")},
    }
    cfg = config_from_dict(tree)
    model_dir = resolve_model_dir(cfg.model, REPO / "runs" / "_models")
    tokenizer = load_tokenizer(model_dir)

    if HH.exists():
        import gzip

        records, source = gzip.open(HH, "rt").read().splitlines(), str(HH)
        fmt = "hh"
    else:
        records, source, fmt = [json.dumps(p) for p in arithmetic_pairs(args.pairs, 0)], "synthetic", "pairs"
    tokenized = []
    for record in records:
        try:
            tokenized.append(tokenize_pair(parse_record(record, fmt), tokenizer, cfg.data))
        except RecordError:
            continue
        if len(tokenized) == args.pairs:
            break
    batches = []
    for i in range(0, len(tokenized), args.batch_size):
        chunk = tokenized[i : i + args.batch_size]
        batches.append({k: np.array([t[j] for t in chunk], dtype=object) for j, k in enumerate(TOKEN_COLUMNS)})
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r, _ in tokenized)

    results = {}
    scored = {}
    for backend in ("transformers", "vllm"):
        start = time.perf_counter()
        scorer_class, scorer_kwargs = scorer_for(cfg, publish_model(model_dir, None), backend)
        scorer = scorer_class(**scorer_kwargs)
        startup = time.perf_counter() - start
        scorer(dict(batches[0]))  # warm-up
        start = time.perf_counter()
        outputs = [scorer(dict(b)) for b in batches]
        elapsed = time.perf_counter() - start
        scored[backend] = np.concatenate([o[REF_CHOSEN_LOGPS] for o in outputs])
        results[backend] = {
            "startup_s": round(startup, 2),
            "score_s": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1),
        }
        print(f"{backend:>12}: start-up {startup:6.1f} s, {tokens / elapsed:10.1f} tokens/s", flush=True)
        del scorer

    report = {
        "model_dir": str(model_dir),
        "data": source,
        "pairs": len(tokenized),
        "tokens": tokens,
        "batch_size": args.batch_size,
        "vllm_dtype": cfg.reference.vllm.dtype,
        "machine": f"{host.machine()}, {os.cpu_count()} CPUs, {host.system()}",
        "results": results,
        "vllm_over_transformers": round(results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"], 3),
        "max_abs_diff_summed_logps": float(np.max(np.abs(scored["vllm"] - scored["transformers"]))),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
