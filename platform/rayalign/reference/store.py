"""Reference store: each pair's reference log-probs, kept per row on the run's storage and reused.

The reference pass is a forward of the reference on every pair; the store keeps its result per pair so
that a run scores only the pairs no earlier run scored with the same reference (TRL #3985 and NeMo-RL #2484
ask for this). Under the reference cache root (``reference.cache_root``, by default ``<storage>/_refcache``,
a local path or a URI; :func:`rayalign.storage.cache_location`)::

    refstore/<scorer>/scorer.json            what <scorer> digests (for a person; never read back)
    refstore/<scorer>/segments/<id>.parquet  scored rows; immutable, each written once under a new id
    refstore/<scorer>/commits/<id>.json      {"segment", "rows", "bytes", "sha256"}, written last: the commit

``<scorer>`` digests everything besides the tokens that changes a log-prob (:func:`scorer_identity`): the
reference's content key (weights, config and tokenizer files; digested once per node and remembered,
:class:`rayalign.models.ModelSource`), the scoring precision and the rule for which positions are scored.
A row's key is a digest of its token ids (prompt, chosen, rejected; :func:`tokens_digests`), so any file,
order or format that yields the same tokens reuses the same scores; ``max_length`` and truncation are in the
ids as applied. The backend is not part of the key: vLLM and transformers agree to ~1e-6 per token in
float32 (``rayalign refcheck``).

Writers never coordinate. A reader takes the union of the committed segments and keeps one row per key;
a segment that is missing, truncated or fails its recorded checksum is ignored with one warning, so its
rows are scored again (never used). Two runs that miss the same rows at once each append a segment of their
own and each train on every pair once; later readers see one row per key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.models import ModelSource
from rayalign.schema import (
    CHOSEN_IDS,
    CHOSEN_TOKENS,
    PROMPT_IDS,
    REF_CHOSEN_LOGPS,
    REF_REJECTED_LOGPS,
    REFERENCE_COLUMNS,
    REJECTED_IDS,
    REJECTED_TOKENS,
    TOKENS_DIGEST,
)
from rayalign.storage import Location, cache_location, read_bytes, write_bytes, write_text

log = logging.getLogger(__name__)

STORE_DIR = "refstore"
# Which positions a reference log-prob sums over (rayalign.packing.response_start): every response token,
# each predicted from the prompt and the response before it. A change of this rule must change this name.
SCORED_POSITIONS = "response tokens, each given the prompt and the response before it (v1)"
DIGEST_BYTES = 16
ROW_SCHEMA = pa.schema(
    [
        pa.field(TOKENS_DIGEST, pa.binary(DIGEST_BYTES)),
        pa.field(REF_CHOSEN_LOGPS, pa.float64()),
        pa.field(REF_REJECTED_LOGPS, pa.float64()),
        pa.field(CHOSEN_TOKENS, pa.int32()),
        pa.field(REJECTED_TOKENS, pa.int32()),
    ]
)
_FOUND = "_found_in_store"  # a working column of the lookup, never leaves this module


def scorer_identity(cfg: RunConfig, model: ModelSource) -> dict[str, str]:
    """Everything besides a pair's tokens that changes its reference log-probs."""
    precision = cfg.reference.vllm.dtype if cfg.reference.backend == "vllm" else cfg.model.dtype
    return {"model": model.key, "precision": precision, "scored_positions": SCORED_POSITIONS}


def tokens_digests(prompts, chosens, rejecteds) -> list[bytes]:
    """Per pair, a 16-byte BLAKE2b digest of its token ids: for each of prompt, chosen and rejected, its length
    and then its ids, as little-endian int64. Each argument: Arrow list arrays (a Ray Data batch's columns) or
    sequences of id sequences."""
    sequences = []
    for column in (prompts, chosens, rejecteds):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not isinstance(column, pa.Array):
            column = pa.array([np.asarray(ids, dtype=np.int64) for ids in column], pa.list_(pa.int64()))
        offsets = np.asarray(column.offsets, dtype=np.int64)
        values = np.asarray(column.values, dtype="<i8").tobytes()  # the whole child buffer; offsets index it
        sequences.append((offsets, memoryview(values)))
    digests = []
    for row in range(len(sequences[0][0]) - 1):
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for offsets, values in sequences:
            start, stop = offsets[row], offsets[row + 1]
            h.update(int(stop - start).to_bytes(8, "little"))
            h.update(values[8 * start : 8 * stop])
        digests.append(h.digest())
    return digests


@dataclass(frozen=True)
class StoreContents:
    """The committed rows (one per key, :data:`ROW_SCHEMA`) and what was read to get them."""

    rows: pa.Table
    segments: int  # committed segments read whole
    bytes: int  # their size in storage
    ignored: tuple[str, ...]  # segments not used: missing, truncated or failing their checksum


@dataclass(frozen=True)
class StoreReport:
    """What one pass through the store did (``summary.json``'s ``reference.cache``)."""

    key: str  # the scorer digest: one namespace of the store
    path: str
    hit: bool  # every pair was found
    found: int  # pairs whose scores were read from the store
    scored: int  # pairs scored now (and appended)
    store_rows: int  # distinct rows in the store after this pass
    store_bytes: int
    segments: int
    ignored_segments: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReferenceStore:
    """One scorer's namespace of the store under ``root`` (see the module's docstring); ``key`` names it."""

    def __init__(self, root: Location, key: str, identity: dict[str, str] | None = None):
        self.key, self.identity = key, identity
        self.where = root / STORE_DIR / key

    @classmethod
    def for_scorer(cls, root: Location, identity: dict[str, str]) -> ReferenceStore:
        """The namespace of the scorer ``identity`` describes (:func:`scorer_identity`)."""
        return cls(root, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20], identity)

    def read(self) -> StoreContents:
        """The union of the committed segments, one row per key (the first segment's, by commit name)."""
        tables, size, ignored = [], 0, []
        for commit in self._commits():
            try:
                record = json.loads(read_bytes(commit) or b"null")
                name, rows, length, digest = record["segment"], record["rows"], record["bytes"], record["sha256"]
            except (ValueError, KeyError, TypeError):
                ignored.append(commit.name)
                log.warning(
                    "reference store: ignoring %s (not a commit record); its rows will be scored again", commit.uri
                )
                continue
            data = read_bytes(self.where / "segments" / name)
            problem = None
            if data is None:
                problem = "missing"
            elif len(data) != length:
                problem = f"{len(data)} bytes, {length} committed"
            elif hashlib.sha256(data).hexdigest() != digest:
                problem = "checksum mismatch"
            else:
                try:
                    table = pq.read_table(io.BytesIO(data), schema=ROW_SCHEMA)
                    problem = None if table.num_rows == rows else f"{table.num_rows} rows, {rows} committed"
                except (pa.ArrowException, OSError) as err:
                    problem = f"unreadable: {err}"
            if problem:
                ignored.append(name)
                log.warning(
                    "reference store: ignoring segment %s (%s); its rows will be scored again",
                    (self.where / "segments" / name).uri,
                    problem,
                )
                continue
            tables.append(table)
            size += length
        rows = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
        return StoreContents(_first_per_key(rows), len(tables), size, tuple(ignored))

    def append(self, rows: pa.Table) -> int:
        """Write ``rows`` (:data:`ROW_SCHEMA`) as a new segment, then its commit; returns the segment's bytes."""
        if self.identity is not None and not (self.where / "scorer.json").is_file():
            write_text(self.where / "scorer.json", json.dumps({"key": self.key, **self.identity}, indent=2))
        segment_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        buffer = io.BytesIO()
        pq.write_table(rows.select(ROW_SCHEMA.names).cast(ROW_SCHEMA), buffer)
        data = buffer.getvalue()
        name = f"{segment_id}.parquet"
        write_bytes(self.where / "segments" / name, data)
        write_text(
            self.where / "commits" / f"{segment_id}.json",
            json.dumps(
                {"segment": name, "rows": rows.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            ),
        )
        return len(data)

    def _commits(self) -> list[Location]:
        folder = self.where / "commits"
        infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
        names = sorted(
            info.base_name for info in infos if info.type == pafs.FileType.File and info.base_name.endswith(".json")
        )
        return [folder / name for name in names]


def _first_per_key(rows: pa.Table) -> pa.Table:
    if rows.num_rows == 0:
        return rows
    digests = rows.column(TOKENS_DIGEST).combine_chunks()  # fixed-size binary: one buffer of 16-byte keys
    keys = np.frombuffer(
        digests.buffers()[1], dtype=f"S{DIGEST_BYTES}", count=len(digests), offset=digests.offset * DIGEST_BYTES
    )
    _, first = np.unique(keys, return_index=True)
    return rows.take(pa.array(np.sort(first)))


def _look_up(batch: pa.Table, known: ray.ObjectRef | pa.Table) -> pa.Table:
    """Add each pair's key, the stored reference columns where the store has it, and whether it had it."""
    rows = ray.get(known) if isinstance(known, ray.ObjectRef) else known
    digests = pa.array(
        tokens_digests(batch.column(PROMPT_IDS), batch.column(CHOSEN_IDS), batch.column(REJECTED_IDS)),
        pa.binary(DIGEST_BYTES),
    )
    at = pc.index_in(digests, value_set=rows.column(TOKENS_DIGEST))
    found = pc.is_valid(at)
    batch = batch.append_column(TOKENS_DIGEST, digests).append_column(_FOUND, found)
    for name in REFERENCE_COLUMNS:
        batch = batch.append_column(name, rows.column(name).take(at))  # null where not found
    return batch


def _keep(found: bool):
    def select(batch: pa.Table) -> pa.Table:
        mask = batch.column(_FOUND)
        return batch.filter(mask if found else pc.invert(mask))

    return select


def scored_through_store(pairs: Dataset, cfg: RunConfig, model: ModelSource) -> tuple[Dataset, StoreReport]:
    """``pairs`` with the reference columns: read from the store where it has them, scored (by the reference
    actors) and appended where it does not. Every pair is returned once, with the token columns it came with."""
    store = ReferenceStore.for_scorer(cache_location(cfg), scorer_identity(cfg, model))
    known = store.read()
    num_cpus = cfg.ray.data_cpus_per_task
    looked = _with_scores(pairs, known.rows, num_cpus).materialize()
    # Every task with the run's fractional CPUs (select/drop default to a whole CPU, which training's workers
    # may hold: such a task would never be scheduled).
    misses = looked.map_batches(_keep(False), batch_format="pyarrow", num_cpus=num_cpus).drop_columns(
        [_FOUND, *REFERENCE_COLUMNS], num_cpus=num_cpus
    )
    num_missing = misses.count()
    found = looked.count() - num_missing
    rows, appended_bytes = known.rows, 0
    if num_missing:
        # Imported here, on the driver: the look-up tasks unpickle this module on every Ray worker they
        # start, and the actors' module brings in torch (a second or more per process, for a pure-Arrow job).
        from rayalign.reference.actors import add_reference_logps

        fresh = add_reference_logps(misses, cfg, model).select_columns(ROW_SCHEMA.names, num_cpus=num_cpus)
        new_rows = pa.concat_tables([ray.get(ref) for ref in fresh.to_arrow_refs()]).cast(ROW_SCHEMA)
        appended_bytes = store.append(new_rows)
        rows = _first_per_key(pa.concat_tables([known.rows, new_rows]))
        # Every pair through the same look-up, now that the store has them all: one schema for every block
        # (the actors' output types differ from the input's), so training can shuffle and concatenate them.
        looked = _with_scores(pairs, rows, num_cpus)
    scored = looked.drop_columns([_FOUND, TOKENS_DIGEST], num_cpus=num_cpus)
    report = StoreReport(
        key=store.key,
        path=store.where.uri,
        hit=num_missing == 0,
        found=found,
        scored=num_missing,
        store_rows=rows.num_rows,
        store_bytes=known.bytes + appended_bytes,
        segments=known.segments + bool(num_missing),
        ignored_segments=len(known.ignored),
    )
    return scored.materialize(), report  # all scored before training starts; nothing left to schedule then


def _with_scores(pairs: Dataset, rows: pa.Table, num_cpus: float) -> Dataset:
    """``pairs`` with their key, the stored reference columns (null where the store lacks the pair) and a flag."""
    return pairs.map_batches(_look_up, fn_args=(ray.put(rows),), batch_format="pyarrow", num_cpus=num_cpus)
