"""The reference store: a full reference pass, +10% new pairs, and a warm hit, in one run; and the store's own
cost per million rows (reading and checking its segments, looking pairs up).

    python bench/reference_store.py                      # HH-RLHF file, tiny model, CPU; writes bench/results/
    python bench/reference_store.py --records 400 --lookup-rows 100000 --out /tmp/store.json   # smaller

Passes (one local Ray cluster, the transformers reference on the CPU, ``rayalign.reference.store``):

* ``full``: the first ``--records`` records of the HH-RLHF file into an empty store;
* ``plus_10pct``: the same records and 10% more, in another file: only the new pairs are scored;
* ``warm``: the grown file again: nothing is scored.

Each pass is timed from the tokenized pairs to the scored dataset in the object store (the data stage is not
timed; it is the same in every pass). Overhead per million rows, without Ray and without a model: writing a
store of ``--lookup-rows`` rows in 10 segments, reading it back (checksums, de-duplication), and the lookup
that each Ray Data task runs over its pairs (digesting token ids and finding them), scaled to 10^6 rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def write_records(source: Path, count: int, dest: Path) -> Path:
    import gzip

    with gzip.open(source, "rt", encoding="utf-8") as f, dest.open("w") as out:
        written = 0
        for line in f:
            if line.strip():
                out.write(line)
                written += 1
                if written == count:
                    break
    return dest


def passes(work: Path, records: int, data: Path) -> list[dict]:
    import ray

    from rayalign.config import config_from_dict
    from rayalign.data.records import prepare_pairs
    from rayalign.models import publish_model, resolve_model_dir
    from rayalign.reference.store import scored_through_store

    base = write_records(data, records, work / "day1.jsonl")
    grown = write_records(data, records + records // 10, work / "day2.jsonl")

    def config(path: Path):
        return config_from_dict(
            {
                "model": {"tiny": {}},
                "data": {"paths": [str(path)], "format": "hh", "max_length": 256, "max_prompt_length": 128},
                "reference": {"cache": True, "cache_root": str(work / "refcache"), "batch_size": 32},
                "output": {"root": str(work / "runs"), "name": "store-bench"},
            }
        )

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
    try:
        model = publish_model(resolve_model_dir(config(base).model, work / "models"), None)
        results = []
        for name, path in (("full", base), ("plus_10pct", grown), ("warm", grown)):
            cfg = config(path)
            cfg.output.run_dir.mkdir(parents=True, exist_ok=True)
            pairs, report, _ = prepare_pairs(cfg, [str(path)], model, cfg.output.run_dir)
            pairs = pairs.materialize()
            started = time.perf_counter()
            scored, store = scored_through_store(pairs, cfg, model)
            scored = scored.materialize()
            elapsed = time.perf_counter() - started
            assert scored.count() == report.ok
            results.append(
                {
                    "pass": name,
                    "pairs": report.ok,
                    "found": store.found,
                    "scored": store.scored,
                    "seconds": round(elapsed, 2),
                    "store_rows": store.store_rows,
                    "store_bytes": store.store_bytes,
                    "segments": store.segments,
                }
            )
            say(f"{name}: {report.ok} pairs, {store.scored} scored, {store.found} found, {elapsed:.1f} s")
        return results
    finally:
        ray.shutdown()


def overhead(work: Path, rows: int) -> dict:
    """The store's cost without a model: write, read back and look up ``rows`` rows; per million rows."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)

    from rayalign.reference.store import ROW_SCHEMA, ReferenceStore, _look_up, tokens_digests
    from rayalign.schema import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
    from rayalign.storage import location

    rng = np.random.default_rng(0)

    def id_lists(length: int) -> pa.ListArray:  # ``rows`` lists of ``length`` int32 ids, built without Python lists
        values = pa.array(rng.integers(0, 32_000, rows * length, dtype=np.int32))
        return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * length), values)

    # Pairs of HH-like length (a 120-token prompt, 60-token responses), as Ray Data hands a batch over.
    batch = pa.table({PROMPT_IDS: id_lists(120), CHOSEN_IDS: id_lists(60), REJECTED_IDS: id_lists(60)})
    started = time.perf_counter()
    digests = tokens_digests(batch.column(PROMPT_IDS), batch.column(CHOSEN_IDS), batch.column(REJECTED_IDS))
    digest_s = time.perf_counter() - started
    table = pa.table(
        {
            "tokens_digest": digests,
            "ref_chosen_logps": rng.normal(size=rows),
            "ref_rejected_logps": rng.normal(size=rows),
            "chosen_tokens": np.full(rows, 60, np.int32),
            "rejected_tokens": np.full(rows, 60, np.int32),
        },
        schema=ROW_SCHEMA,
    )
    store = ReferenceStore.for_scorer(location(str(work / "overhead")), {"model": "bench", "precision": "float32"})
    started = time.perf_counter()
    for part in np.array_split(np.arange(rows), 10):
        store.append(table.take(pa.array(part)))
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    contents = store.read()
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    looked = _look_up(batch, contents.rows)
    lookup_s = time.perf_counter() - started
    assert looked.num_rows == rows and pa.compute.sum(looked.column("_found_in_store")).as_py() == rows
    per_million = 1e6 / rows
    return {
        "rows": rows,
        "segments": contents.segments,
        "store_bytes": contents.bytes,
        "bytes_per_row": round(contents.bytes / rows, 1),
        "per_million_rows_s": {
            "write": round(write_s * per_million, 2),
            "read_and_check": round(read_s * per_million, 2),
            "lookup_incl_digest": round(lookup_s * per_million, 2),
            "digest_only": round(digest_s * per_million, 2),
        },
        "tokens_per_pair": 240,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="HH records in the first pass (default 2000)")
    parser.add_argument("--lookup-rows", type=int, default=1_000_000, help="rows for the overhead measure")
    parser.add_argument("--data", default=str(HH))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reference-store-cpu.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        import ray
        import torch

        results = passes(work, args.records, Path(args.data))
        cost = overhead(work, args.lookup_rows)
        report = {
            "benchmark": "bench/reference_store.py",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": [sys.executable, "bench/reference_store.py", *(argv if argv is not None else sys.argv[1:])],
            "device": {"type": "cpu", "cpu_count": os.cpu_count()},
            "versions": {"ray": ray.__version__, "torch": torch.__version__},
            "settings": {
                "model": "tiny Llama (2 layers, hidden 64), float32, transformers reference",
                "data": str(args.data),
                "max_length": 256,
                "records": args.records,
            },
            "passes": results,
            "overhead": cost,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        say(f"overhead per million rows: {cost['per_million_rows_s']}")
        say(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
