"""The reference store: per-pair scores on storage, appended by writers that never coordinate, read as one
de-duplicated union; a new pair is scored once, a corrupted segment is scored again, never used."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest
from conftest import make_config

from rayalign.data.records import prepare_pairs
from rayalign.models import publish_model, resolve_model_dir
from rayalign.reference.store import ROW_SCHEMA, ReferenceStore, scored_through_store, tokens_digests
from rayalign.storage import location


def _rows(start: int, stop: int, value: float = 0.0) -> pa.Table:
    keys = tokens_digests([[i] for i in range(start, stop)], [[1]] * (stop - start), [[2]] * (stop - start))
    n = stop - start
    return pa.table(
        {
            "tokens_digest": keys,
            "ref_chosen_logps": [value - i for i in range(start, stop)],
            "ref_rejected_logps": [value] * n,
            "chosen_tokens": [1] * n,
            "rejected_tokens": [1] * n,
        },
        schema=ROW_SCHEMA,
    )


def test_readers_take_the_union_of_committed_segments_one_row_per_key(tmp_path):
    store = ReferenceStore.for_scorer(location(str(tmp_path)), {"model": "m", "precision": "float32"})
    assert store.read().rows.num_rows == 0  # an empty store
    store.append(_rows(0, 10))
    store.append(_rows(5, 15))  # another writer scored five of the same pairs
    contents = store.read()
    assert contents.segments == 2 and contents.rows.num_rows == 15 and not contents.ignored
    assert len(set(contents.rows.column("tokens_digest").to_pylist())) == 15
    # A segment written but not (yet) committed is not read.
    (tmp_path / "refstore" / store.key / "segments" / "uncommitted.parquet").write_bytes(b"half")
    assert store.read().rows.num_rows == 15


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_a_damaged_segment_is_ignored_with_one_warning(tmp_path, caplog, damage):
    store = ReferenceStore.for_scorer(location(str(tmp_path)), {"model": "m", "precision": "float32"})
    store.append(_rows(0, 10))
    store.append(_rows(10, 20))
    [first, _] = sorted((tmp_path / "refstore" / store.key / "segments").glob("*.parquet"))
    data = first.read_bytes()
    if damage == "flip a byte":
        first.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        first.write_bytes(data[: len(data) // 2])
    else:
        first.unlink()
    with caplog.at_level(logging.WARNING, logger="rayalign.reference.store"):
        contents = store.read()
    assert contents.rows.num_rows == 10 and contents.ignored == (first.name,)
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        next(r.message for r in caplog.records if first.name in r.message)
    ]
    assert "scored again" in caplog.text


def _jsonl(path, count: int):
    """``count`` pairs, each with its own tokens; the first ``n`` of a longer file are the same pairs."""
    with path.open("w") as f:
        for i in range(count):
            a, b = divmod(i, 10)
            f.write(
                json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"})
                + "\n"
            )
    return path


@pytest.mark.e2e
def test_new_pairs_are_the_only_ones_scored_and_another_precision_scores_everything(ray_cluster, tmp_path):
    cache = str(tmp_path / "refcache")
    cfg = make_config(
        tmp_path,
        data={"paths": [str(_jsonl(tmp_path / "day1.jsonl", 60))], "synthetic": None},
        reference={"cache": True, "cache_root": cache},
    )
    model = publish_model(resolve_model_dir(cfg.model, tmp_path / "models"), None)
    (tmp_path / "run").mkdir()
    pairs, _, _ = prepare_pairs(cfg, list(cfg.data.paths), model, tmp_path / "run")
    first_scored, first = scored_through_store(pairs, cfg, model)
    assert (first.found, first.scored, first.store_rows, first.segments) == (0, 60, 60, 1)

    # A day of new pairs, 10% more, in another file (other name, same tokens for the first 60).
    grown = make_config(
        tmp_path,
        data={"paths": [str(_jsonl(tmp_path / "day2.jsonl", 66))], "synthetic": None},
        reference={"cache": True, "cache_root": cache},
    )
    grown_pairs, _, _ = prepare_pairs(grown, list(grown.data.paths), model, tmp_path / "run")
    scored, second = scored_through_store(grown_pairs, grown, model)
    assert (second.found, second.scored, second.store_rows, second.segments) == (60, 6, 66, 2)
    assert second.key == first.key and not second.hit
    rows = scored.take_all()
    assert sorted(r["row"] for r in rows) == list(range(1, 67))  # every pair once (rows are line numbers)
    # Found and freshly scored pairs in blocks of one schema: training's shuffle concatenates them.
    assert scored.random_shuffle(seed=0).repartition(1).count() == 66
    before = {r["row"]: r["ref_chosen_logps"] for r in first_scored.take_all()}
    assert all(r["ref_chosen_logps"] == before[r["row"]] for r in rows if r["row"] <= 60)  # read, not rescored

    # The same pairs under another precision are another reference: everything is scored again.
    bf16 = make_config(
        tmp_path,
        data={"paths": [str(tmp_path / "day2.jsonl")], "synthetic": None},
        reference={"cache": True, "cache_root": cache},
        model={"dtype": "bfloat16"},
    )
    _, third = scored_through_store(grown_pairs, bf16, model)
    assert third.key != first.key and (third.found, third.scored) == (0, 66)

    # A shorter max_length changes the ids of the pairs it truncates: only those are scored again.
    short = make_config(
        tmp_path,
        data={"paths": [str(tmp_path / "day2.jsonl")], "synthetic": None, "max_length": 20, "max_prompt_length": 19},
        reference={"cache": True, "cache_root": cache},
    )
    short_pairs, short_report, _ = prepare_pairs(short, list(short.data.paths), model, tmp_path / "run")
    _, fourth = scored_through_store(short_pairs, short, model)
    assert fourth.key == first.key and 0 < fourth.scored == short_report.truncated < short_report.ok
    assert fourth.found == short_report.ok - short_report.truncated

    # A corrupted segment: its rows are scored again, with a warning, never used.
    store = tmp_path / "refcache" / "refstore" / first.key / "segments"
    oldest = sorted(store.glob("*.parquet"))[0]
    oldest.write_bytes(oldest.read_bytes()[:-10])
    _, repaired = scored_through_store(grown_pairs, grown, model)
    assert (repaired.found, repaired.scored, repaired.ignored_segments) == (6, 60, 1)


def _writer(root: str, start: int, stop: int, rounds: int, barrier) -> list[bytes]:
    """One process as a run does it: read the store, score the pairs it lacks, append them; ``rounds`` times over
    overlapping slices of ``[start, stop)``. Returns the keys it saw in the end."""
    store = ReferenceStore.for_scorer(location(root), {"model": "m", "precision": "float32"})
    barrier.wait()  # both writers start on the empty store together, as two first runs do
    for i in range(rounds):
        wanted = _rows(start + i, stop)
        known = set(store.read().rows.column("tokens_digest").to_pylist())
        missing = [k not in known for k in wanted.column("tokens_digest").to_pylist()]
        if any(missing):
            store.append(wanted.filter(pa.array(missing)))
    return store.read().rows.column("tokens_digest").to_pylist()


def test_two_processes_appending_to_one_local_store_at_once_lose_nothing(tmp_path):
    """Two writers that never coordinate, on a local filesystem (tests/isolated runs two whole reference passes
    at once against the S3 server): each reads back every pair, the store holds each pair once."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        jobs = [pool.apply_async(_writer, (str(tmp_path), a, b, 6, barrier)) for a, b in ((0, 300), (100, 400))]
        seen = [job.get(timeout=120) for job in jobs]
    everything = set(_rows(0, 400).column("tokens_digest").to_pylist())
    store = ReferenceStore.for_scorer(location(str(tmp_path)), {"model": "m", "precision": "float32"})
    contents = store.read()
    assert set(contents.rows.column("tokens_digest").to_pylist()) == everything
    assert contents.rows.num_rows == 400 and not contents.ignored  # complete, one row per pair, nothing torn
    assert set(seen[0]) >= set(_rows(0, 300).column("tokens_digest").to_pylist())
    assert set(seen[1]) >= set(_rows(100, 400).column("tokens_digest").to_pylist())
    # Rows both scored were appended twice, read once, with one value.
    assert contents.segments >= 2
    values = dict(zip(contents.rows.column("tokens_digest").to_pylist(), contents.rows.column("ref_chosen_logps")))
    assert values == dict(
        zip(_rows(0, 400).column("tokens_digest").to_pylist(), _rows(0, 400).column("ref_chosen_logps"))
    )
