"""The memory plan per training rank of the large-model recipes in jobs/configs, from the models' public shapes.

Llama 3.1 8B and 70B are built on PyTorch's meta device from their published config values (no weight is read or
downloaded), and each recipe's plan is computed as `rayalign validate` computes it (rayalign.memory_plan), held
against an 80 GiB GPU. Writes a JSON and prints a Markdown table.

    python bench/memory_plans.py --out bench/results/memory-plans.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Published shapes (Hugging Face config.json of meta-llama/Llama-3.1-8B and -70B).
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
COMMON = dict(num_key_value_heads=8, vocab_size=128_256, tie_word_embeddings=False, max_position_embeddings=131_072)
RECIPES = {
    "jobs/configs/llama-8b-dpo-8xh100.yaml": "llama-3.1-8b",
    "jobs/configs/llama-70b-lora-dpo-2x8xh100.yaml": "llama-3.1-70b",
}
GPU_GIB = 80.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench/results/memory-plans.json"))
    args = parser.parse_args()
    from transformers import LlamaConfig

    from rayalign.config import load_config
    from rayalign.memory_plan import memory_plan, model_size

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, shape in RECIPES.items():
            model_dir = Path(tmp) / shape
            LlamaConfig(**SHAPES[shape], **COMMON).save_pretrained(model_dir)
            cfg = load_config(REPO / recipe)
            size = model_size(model_dir, cfg.model.lora)
            plan = memory_plan(cfg, size, GPU_GIB)
            results.append(
                {"recipe": recipe, "model": shape, "params": size.total, "trainable": size.trainable, **plan.as_dict()}
            )
            print(f"{recipe}: {plan.line()}")
    report = {"date": datetime.date.today().isoformat(), "gpu_gib": GPU_GIB, "plans": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    columns = "recipe | model | ranks | ZeRO | weights | grads | Adam states | buffers | activations | total GiB | fits"
    print(f"\n| {columns} 80 GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        d = r["device"]
        print(
            f"| `{Path(r['recipe']).name}` | {r['model']} | {r['num_workers']} | {r['zero_stage']} | "
            f"{d['weights']:.1f} | "
            f"{d['gradients']:.1f} | {d['optimizer_states']:.1f} | {d['buffers']:.1f} | {d['activations']:.1f} | "
            f"{r['device_total']:.1f} | {'yes' if r['fits'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
