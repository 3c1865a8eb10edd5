"""Wall time of an N-trial `rayalign sweep` (reference scored once, shared) against N independent
`rayalign train` runs that each score the reference, same machine, one run.

    .venv/bin/python bench/sweep_vs_independent.py [--gammas 0 1 2 4] [--pairs 256] [--backend transformers]

Every variant trains the same N configs of jobs/configs/sweep-gamma.yaml (one γ each, the
tiny model, no early stopping, so all variants do the same training steps):

* ``sweep``: `rayalign sweep`, trials two at a time (the config's max_concurrent_trials);
* ``sweep_sequential``: the same sweep with one trial at a time, which isolates what sharing
  the reference pass saves from what running trials side by side saves;
* ``independent``: N `rayalign train` commands one after another, each with
  reference.cache=false, so each scores the reference itself (a fresh Ray cluster each time,
  as a user running them by hand gets).

Results: bench/results/sweep_vs_independent.json (and a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import platform as host  # the stdlib module (our package folder is never importable as `platform`)
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "sweep-gamma.yaml"


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sweep_vs_independent.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rayalign-bench-"))
    rayalign = [sys.executable, "-m", "rayalign.cli"]
    common = [
        "--config",
        str(CONFIG),
        "--set",
        f"data.synthetic.num_pairs={args.pairs}",
        "--set",
        f"reference.backend={args.backend}",
        "--set",
        f"output.root={work / 'runs'}",
        "--set",
        "ray.num_cpus=2",
    ]
    space = "{loss.gamma: {values: [" + ", ".join(str(g) for g in args.gammas) + "]}}"
    sweep_args = ["--set", f"sweep.space={space}", "--set", "sweep.early_stopping=none"]
    walls: dict[str, float] = {}
    try:
        for name, concurrent in (("sweep", 2), ("sweep_sequential", 1)):
            # A fresh cache root per sweep, so each one scores the reference once itself.
            walls[name] = timed(
                rayalign
                + [
                    "sweep",
                    *common,
                    *sweep_args,
                    "--set",
                    f"sweep.max_concurrent_trials={concurrent}",
                    "--set",
                    f"reference.cache_root={work / name / 'refcache'}",
                    "--set",
                    f"output.name={name}",
                ],
                work / f"{name}.log",
            )
            print(f"{name}: {walls[name]:.1f} s", flush=True)
        start = time.perf_counter()
        for gamma in args.gammas:
            timed(
                rayalign
                + [
                    "train",
                    *common,
                    "--set",
                    "reference.cache=false",
                    "--set",
                    f"loss.gamma={gamma}",
                    "--set",
                    f"output.name=train-gamma{gamma}",
                ],
                work / f"train-{gamma}.log",
            )
        walls["independent"] = time.perf_counter() - start
        print(f"independent: {walls['independent']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)

    result = {
        "trials": len(args.gammas),
        "gammas": args.gammas,
        "pairs": args.pairs,
        "reference_backend": args.backend,
        "wall_seconds": {k: round(v, 1) for k, v in walls.items()},
        "independent_over_sweep": round(walls["independent"] / walls["sweep"], 2),
        "independent_over_sweep_sequential": round(walls["independent"] / walls["sweep_sequential"], 2),
        "machine": {"cpus": __import__("os").cpu_count(), "python": host.python_version(), "system": host.platform()},
        "logs": str(work),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    n = len(args.gammas)
    print(
        f"\n| variant | wall (s) | independent / variant |\n|---|---:|---:|\n"
        f"| `rayalign sweep`, {n} trials, 2 at a time, reference once | {walls['sweep']:.0f} | "
        f"{result['independent_over_sweep']:.2f}× |\n"
        f"| `rayalign sweep`, {n} trials, 1 at a time, reference once | {walls['sweep_sequential']:.0f} | "
        f"{result['independent_over_sweep_sequential']:.2f}× |\n"
        f"| {n} × `rayalign train`, each scoring the reference | {walls['independent']:.0f} | 1.00× |"
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
