"""Generation throughput: vLLM backend vs transformers backend, same model, prompts and settings, one run.

    .venv/bin/python bench/generation.py [--model-dir DIR] [--prompts 64] [--batch-size 16] [--max-new-tokens 64]

Both generators are the classes `rayalign evaluate`'s Ray Data actors run (rayalign.evaluation.generate), called
in this process on identical batches of prompt token ids, greedy. Engine start-up is reported apart from
steady-state throughput (response tokens generated per second, after one warm-up batch). Also reported: the share
of prompts whose greedy responses are token for token the same in both backends. Prompts: the real HH-RLHF
prompts in ../shared/data when present, else the synthetic task. Results go to bench/results/.
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
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generation-cpu.json"))
    args = parser.parse_args()

    # In-process engine core: this script is the only vLLM client.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import numpy as np
    import torch
    import transformers
    import vllm

    from rayalign.config import GenerationConfig, ModelConfig, TinyModelConfig
    from rayalign.data.parsing import RecordError, parse_record
    from rayalign.data.synthetic import arithmetic_pairs
    from rayalign.data.tokenizing import tokenize_prompt
    from rayalign.evaluation.generate import RESPONSE_IDS, TransformersGenerator, VllmGenerator
    from rayalign.models import load_tokenizer, publish_model, resolve_model_dir
    from rayalign.schema import PROMPT_IDS

    model_cfg = ModelConfig(path=args.model_dir) if args.model_dir else ModelConfig(tiny=TinyModelConfig())
    model_dir = resolve_model_dir(model_cfg, REPO / "runs" / "_models")
    tokenizer = load_tokenizer(model_dir)
    if HH.exists():
        import gzip

        records, source, fmt = gzip.open(HH, "rt").read().splitlines(), str(HH), "hh"
    else:
        records, source, fmt = [json.dumps(p) for p in arithmetic_pairs(args.prompts, 0)], "synthetic", "pairs"
    prompts = []
    for record in records:
        try:
            ids = tokenize_prompt(parse_record(record, fmt).prompt, tokenizer)
        except RecordError:
            continue
        if len(ids) <= args.max_prompt_length:
            prompts.append(ids)
        if len(prompts) == args.prompts:
            break
    batches = [
        {PROMPT_IDS: np.array(prompts[i : i + args.batch_size] + [[]], dtype=object)[:-1]}
        for i in range(0, len(prompts), args.batch_size)
    ]
    settings = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    settings.vllm.dtype = "float32"
    max_model_len = max(map(len, prompts)) + args.max_new_tokens
    model = publish_model(model_dir, None)

    results, responses = {}, {}
    for backend in ("transformers", "vllm"):
        start = time.perf_counter()
        if backend == "vllm":
            generator = VllmGenerator(model, settings, max_model_len)
        else:
            generator = TransformersGenerator(model, "float32", False, settings)
        startup = time.perf_counter() - start
        generator(dict(batches[0]))  # warm-up
        start = time.perf_counter()
        outputs = [generator(dict(b)) for b in batches]
        elapsed = time.perf_counter() - start
        responses[backend] = [list(ids[0]) for out in outputs for ids in out[RESPONSE_IDS]]
        tokens = sum(map(len, responses[backend]))
        results[backend] = {
            "startup_s": round(startup, 2),
            "generate_s": round(elapsed, 2),
            "response_tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1),
        }
        print(f"{backend:>12}: start-up {startup:6.1f} s, {tokens} tokens in {elapsed:6.1f} s, "
              f"{tokens / elapsed:8.1f} tokens/s", flush=True)  # fmt: skip
        del generator

    same = sum(a == b for a, b in zip(responses["transformers"], responses["vllm"]))
    report = {
        "model_dir": str(model_dir),
        "data": source,
        "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "decoding": "greedy",
        "dtype": "float32",
        "machine": f"{host.machine()}, {os.cpu_count()} CPUs, {host.system()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__},
        "results": results,
        "vllm_over_transformers": round(results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"], 3),
        "greedy_identical_share": round(same / len(prompts), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
