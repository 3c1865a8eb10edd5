"""Host memory of a ZeRO-3 training worker: this checkout against an earlier commit, same model, data and settings.

    python bench/zero3_memory.py --before 893d4c2     # CPU, SmolLM2-360M's shape (362 M parameters, fp32), 2 workers
    python bench/zero3_memory.py --quick               # the tiny model, this checkout only

Each side runs ``rayalign train`` in a process of its own (the earlier commit from a ``git worktree``, its package
first on ``PYTHONPATH``): 2 Ray Train workers, DeepSpeed ZeRO-3, 2 optimizer steps on a few synthetic pairs
(the model's own tokenizer). Every half second it reads each Ray Train worker process's peak resident set
(``VmHWM`` in ``/proc/<pid>/status``, whichever commit runs), and reports the largest per worker. What it shows:
whether a worker ever held the whole model (fp32 weights of the 360M shape: 1.45 GB) before ZeRO-3 partitioned
it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import HH, TINY, ModelSpec, build_model_dir, device_info, parameter_counts, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# SmolLM2-360M-Instruct's shape (its config.json), random init, with an untied output head: with the h²-sized buckets
# below, a head tied to the input embedding fails DeepSpeed 0.19.8's ZeRO-3 zero_grad on CPU ("unknown parameter
# type"), and DeepSpeed's default buckets (2 GB buffers) do not fit two workers in 24 GiB.
SMOLLM2_360M = ModelSpec(
    layers=32, hidden=960, heads=15, kv_heads=5, mlp=2560, vocab=49_152, tokenizer_records=None, tie_embeddings=False
)
RUN = """
import json, sys
from rayalign.config import config_from_dict
from rayalign.pipeline import run_train
from rayalign.storage import read_jsonl
cfg = config_from_dict(json.loads(sys.argv[1]))
run_train(cfg)
rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
print("RESULT", json.dumps({"steps": len(rows), "loss": [r["loss"] for r in rows]}))
"""


def train_worker_peaks() -> dict[int, float]:
    """Each live Ray Train worker process's peak resident set so far, GiB, by pid."""
    peaks = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                kib = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:"))
                peaks[int(proc.name)] = kib / 2**20
        except (OSError, StopIteration, ValueError):
            continue  # a process that ended while it was read
    return peaks


def side(package: Path, model_dir: Path, work: Path, name: str, hidden: int) -> dict:
    """One ``rayalign train`` with the package at ``package`` first on the path; its workers' peak RSS."""
    # ZeRO's buckets as this checkout sizes them by the hidden size h, given to both sides (an earlier commit
    # left DeepSpeed's 2 GB defaults): what differs is how the model is built.
    buckets = {
        "reduce_bucket_size": 50_000_000,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    tree = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"synthetic": {"num_pairs": 16}, "max_length": 64, "max_prompt_length": 32, "shuffle": False},
        "reference": {"backend": "transformers", "cpus_per_actor": 0.5},
        "train": {
            "micro_batch_size": 4,
            "zero_stage": 3,
            "log_every": 1,
            "max_steps": 2,
            "deepspeed": {"zero_optimization": buckets},
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "output": {"root": str(work / "runs"), "name": name, "if_exists": "replace"},
    }
    env = {**os.environ, "PYTHONPATH": str(package), "RAY_TMPDIR": f"/tmp/rz3-{name}"}
    started = time.perf_counter()
    peaks: dict[int, float] = {}
    with tempfile.TemporaryFile("w+") as out:
        argv = [sys.executable, "-c", RUN, json.dumps(tree)]
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, text=True)
        while proc.poll() is None:
            for pid, peak in train_worker_peaks().items():
                peaks[pid] = max(peak, peaks.get(pid, 0.0))
            time.sleep(0.5)
        out.seek(0)
        log = out.read()
    line = next((ln for ln in log.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None or not peaks:
        raise SystemExit(f"{name} failed ({proc.returncode}, {len(peaks)} workers seen):\n{log[-4000:]}")
    return {
        **json.loads(line[len("RESULT ") :]),
        "worker_peak_rss_gib": sorted(round(p, 3) for p in peaks.values()),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    parser.add_argument("--before", default=None, help="a commit to measure beside this checkout")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-zero3-memory"))
    parser.add_argument("--out", default=None, help="default bench/results/zero3-memory-cpu[-quick].json")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    spec = TINY if args.quick else SMOLLM2_360M
    model_dir = build_model_dir(spec, "float32", HH, 1024, work / "models")
    results = {"this checkout": side(REPO / "platform", model_dir, work, "after", spec.hidden)}
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before], check=True)
            try:
                results[f"commit {args.before}"] = side(tree / "platform", model_dir, work, "before", spec.hidden)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    counts = parameter_counts(model_dir)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"dir": model_dir.name, **counts, "fp32_weights_gib": round(counts["total"] * 4 / 2**30, 3)},
        "settings": "2 workers, ZeRO-3 (buckets h², 0.9·h², persistence 10·h), fp32, 2 steps of 4 pairs per worker, "
        "synthetic pairs, max_length 64",
        "largest_worker_peak_rss_gib": {k: max(v["worker_peak_rss_gib"]) for k, v in results.items()},
        "results": results,
        "machine": device_info("cpu"),
        "versions": versions(),
    }
    out = Path(args.out or REPO / "bench" / "results" / f"zero3-memory-cpu{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[zero3-memory] wrote {out}", flush=True)
    print(json.dumps(report["largest_worker_peak_rss_gib"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
