"""Tokenizing speed: records/s through the data stage (read + parse + tokenize, Ray Data), one tokenizing task at a
time against one per CPU, and the tokenizing itself one pair at a time against batched, in one run.

    python bench/tokenizing.py                                   # 20,000 HH pairs, tiny byte-level tokenizer
    python bench/tokenizing.py --tokenizer-dir /path/to/smollm2  # a real BPE tokenizer (HF files)
    python bench/tokenizing.py --records 2000 --out /tmp/tok.json

The records are the shared HH-RLHF test file, repeated to ``--records``. Parts:

* ``function``: :func:`rayalign.data.tokenizing.tokenize_pair` in a loop against ``tokenize_pairs`` over the same
  parsed pairs, in batches of 1024 (one thread, no Ray): records/s and their ratio; the ids are checked equal;
* ``stage``: :func:`rayalign.data.records.prepare_pairs` on a local Ray cluster of all this machine's CPUs, with
  ``data.tokenizing_tasks: 1`` and unset (up to one task per CPU), then unset again on the same cluster (its
  task workers kept their tokenizer): records/s and records/s per core.

The model's weights are never loaded (tokenizing reads the tokenizer only); ``--tokenizer-dir`` puts another
tokenizer beside the tiny model's config.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def repeated_records(source: Path, count: int, dest: Path) -> Path:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    with dest.open("w") as out:
        for i in range(count):
            out.write(lines[i % len(lines)] + "\n")
    return dest


def model_dir(work: Path, tokenizer_dir: Path | None) -> Path:
    from rayalign.config import ModelConfig, TinyModelConfig
    from rayalign.models import resolve_model_dir

    tiny = resolve_model_dir(ModelConfig(tiny=TinyModelConfig()), work / "models")
    if tokenizer_dir is None:
        return tiny
    swapped = work / "model-with-tokenizer"
    shutil.copytree(tiny, swapped)
    for name in TOKENIZER_FILES:
        (swapped / name).unlink(missing_ok=True)
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, swapped / name)
    return swapped


def function_part(data: Path, model: Path, cfg) -> dict:
    from rayalign.data.parsing import RecordError, parse_record
    from rayalign.data.tokenizing import tokenize_pair, tokenize_pairs
    from rayalign.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    pairs = []
    for line in data.read_text().splitlines():
        try:
            pairs.append(parse_record(line, "hh"))
        except RecordError:
            pass
    started = time.perf_counter()
    alone = []
    for pair in pairs:
        try:
            alone.append(tokenize_pair(pair, tokenizer, cfg.data))
        except RecordError as err:
            alone.append(err.reason)
    one_s = time.perf_counter() - started
    started = time.perf_counter()
    batched = [r for i in range(0, len(pairs), 1024) for r in tokenize_pairs(pairs[i : i + 1024], tokenizer, cfg.data)]
    batched_s = time.perf_counter() - started
    assert [r if not isinstance(r, RecordError) else r.reason for r in batched] == alone, "batched ids differ"
    return {
        "pairs": len(pairs),
        "one_at_a_time_records_per_s": round(len(pairs) / one_s, 1),
        "batched_records_per_s": round(len(pairs) / batched_s, 1),
        "batched_vs_one_at_a_time": round(one_s / batched_s, 2),
    }


def stage_part(work: Path, data: Path, model: Path, cfg) -> dict:
    import ray

    from rayalign.data.records import prepare_pairs
    from rayalign.models import publish_model

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, log_to_driver=False, include_dashboard=False)
    try:
        source = publish_model(model, None)
        results = {}
        # The last one again on the same cluster: its task workers kept their tokenizer.
        for name, tasks in (("one_task", 1), ("one_per_cpu", None), ("one_per_cpu_again", None)):
            run = cfg.model_copy(deep=True)
            run.data.tokenizing_tasks = tasks
            run_dir = work / f"run-{name}"
            run_dir.mkdir()
            started = time.perf_counter()
            pairs, report, _ = prepare_pairs(run, [str(data)], source, run_dir)
            pairs.materialize()
            seconds = time.perf_counter() - started
            results[name] = {
                "records": report.total,
                "usable": report.ok,
                "seconds": round(seconds, 2),
                "records_per_s": round(report.total / seconds, 1),
                "records_per_s_per_core": round(report.total / seconds / cpus, 1),
            }
            say(f"stage, {name}: {report.total} records in {seconds:.1f} s ({report.total / seconds:.0f}/s)")
        results["one_per_cpu_vs_one_task"] = round(
            results["one_task"]["seconds"] / results["one_per_cpu"]["seconds"], 2
        )
        return results
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="HF tokenizer files to tokenize with")
    parser.add_argument("--data", type=Path, default=HH)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenizing-cpu.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="tokenizing-bench-"))
    try:
        import ray
        import tokenizers
        import transformers

        from rayalign.config import config_from_dict

        data = repeated_records(args.data, args.records, work / "hh.jsonl")
        model = model_dir(work, args.tokenizer_dir)
        cfg = config_from_dict(
            {
                "model": {"path": str(model)},
                "data": {"paths": [str(data)], "format": "hh", "max_length": 512, "max_prompt_length": 256},
                "output": {"root": str(work / "runs"), "name": "tokenizing-bench"},
            }
        )
        function = function_part(data, model, cfg)
        say(
            f"function: {function['one_at_a_time_records_per_s']:.0f}/s one at a time, "
            f"{function['batched_records_per_s']:.0f}/s batched ({function['batched_vs_one_at_a_time']}x)"
        )
        stage = stage_part(work, data, model, cfg)
        report = {
            "benchmark": "bench/tokenizing.py",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable, "bench/tokenizing.py", *(argv if argv is not None else sys.argv[1:])],
            "device": {"type": "cpu", "cpu_count": os.cpu_count()},
            "versions": {
                "ray": ray.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "settings": {
                "data": f"{args.data.name} repeated to {args.records} records, format hh",
                "tokenizer": str(args.tokenizer_dir or "tiny byte-level (rayalign.models.build_byte_tokenizer)"),
                "max_length": 512,
            },
            "function": function,
            "stage": stage,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {out}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
