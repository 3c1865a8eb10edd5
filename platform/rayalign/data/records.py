"""Data stage: read preference pairs with Ray Data, validate, tokenize, quarantine; the parts are
:mod:`~rayalign.data.reading` (files to records), :mod:`~rayalign.data.parsing` (a record to a pair of texts),
:mod:`~rayalign.data.tokenizing` (texts to token ids) and :mod:`~rayalign.data.report` (the counts); this module
runs them and writes the quarantine.

Flow::

    files ──PreferenceFileDatasource──▶ {source, row, record}
          ──map_batches(tokenize_records)──▶ {status, reason, ..., prompt_ids, chosen_ids, rejected_ids}
          ──materialize──▶ counts + quarantine.jsonl  (driver sees only rejected rows)
          ──keep status == "ok"──▶ tokenized pairs for the reference stage

Supported record formats (``data.format``, or detected per record with ``auto``):

* ``pairs``: ``{"prompt": str, "chosen": str, "rejected": str}`` (JSONL or Parquet);
  tokenized as raw text, like TRL's "standard" format.
* ``conversational``: TRL-style ``chosen``/``rejected`` as lists of ``{role, content}``
  messages, with an optional ``prompt`` list; without one, the prompt is the shared
  dialogue before the final assistant turn. Rendered with the tokenizer's chat template.
* ``hh``: Anthropic HH-RLHF transcripts; the prompt is everything up to and including
  the last ``"\\n\\nAssistant:"``, the response is the rest.
* ``unpaired`` (a loss that takes unpaired data, KTO): ``{"prompt", "completion", "label"}``;
  each row also gets its KL completion (:func:`~rayalign.data.tokenizing.with_kl_completions`).

A record that cannot be used is never dropped silently: it is written to
``quarantine.jsonl`` with its file, line/row and the reason, and the run fails
when the quarantined fraction exceeds ``data.max_quarantine_fraction``.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Dataset, TaskPoolStrategy

from rayalign.config import RunConfig
from rayalign.cpus import cluster_nodes
from rayalign.data.reading import QUARANTINE_RECORD_CHARS, InputFiles, input_files, read_preference_files
from rayalign.data.report import DataReport
from rayalign.data.tokenizing import tokenize_records, with_kl_completions
from rayalign.errors import DataQualityError
from rayalign.loss_specs import takes_unpaired
from rayalign.models import ModelSource
from rayalign.schema import (
    DESIRABLE,
    DETAIL,
    FIELD,
    OK,
    PAIR_KEY,
    RECORD,
    ROW,
    SOURCE,
    STATUS,
    TOKEN_COLUMNS,
    TRUNCATED,
)
from rayalign.storage import QUARANTINE_FILE, publish, replaced_whole, stored_twin


def _tokenizing_tasks(cfg: RunConfig) -> int:
    """``data.tokenizing_tasks``, else one per CPU of the cluster (at least one)."""
    return cfg.data.tokenizing_tasks or max(1, int(sum(node.cpus for node in cluster_nodes())))


def _only(status_is_ok: bool):
    def keep(batch: pa.Table) -> pa.Table:
        is_ok = pc.equal(batch.column(STATUS), OK)
        return batch.filter(is_ok if status_is_ok else pc.invert(is_ok))

    return keep


def capped_record(text: str | None) -> str | None:
    """A rejected record's text as kept in the quarantine: at most QUARANTINE_RECORD_CHARS characters."""
    if text is None or len(text) <= QUARANTINE_RECORD_CHARS:
        return text
    return text[:QUARANTINE_RECORD_CHARS] + f"…[{len(text) - QUARANTINE_RECORD_CHARS} more characters]"


def _write_quarantine(rejected: Dataset, path: Path, report: DataReport) -> None:
    """Write every rejected record to ``path``; count them by reason into ``report``, and name the first."""
    counts: Counter = Counter()
    with replaced_whole(path) as f:
        for row in rejected.iter_rows():
            counts[row[STATUS]] += 1
            if not report.first_quarantined:
                where = "row" if row[SOURCE].endswith(".parquet") else "line"
                report.first_quarantined = f"{row[SOURCE]} {where} {row[ROW]}: {row[STATUS]}: {row[DETAIL]}"
            f.write(
                json.dumps(
                    {
                        SOURCE: row[SOURCE],
                        ROW: int(row[ROW]),
                        "reason": row[STATUS],
                        "field": row[FIELD],
                        "detail": row[DETAIL],
                        "record": capped_record(row[RECORD]),
                    }
                )
                + "\n"
            )
    report.quarantined = dict(counts)


def prepare_pairs(
    cfg: RunConfig, paths: list[str], model: ModelSource, run_dir: Path
) -> tuple[Dataset, DataReport, InputFiles]:
    """Read, validate and tokenize; write the quarantine (kept in the run's storage too); return usable
    pairs (in file order), counts and the files read.

    The tokenized pairs are materialized in Ray's object store (not on the
    driver) so that counts, quarantine and training all see one pass.
    Raises DataQualityError when too much was quarantined.
    """
    num_cpus = cfg.ray.data_cpus_per_task
    inputs = input_files(paths, cfg.data.format, cfg.output.s3, cfg.data.columns)
    records = read_preference_files(inputs, num_cpus, cfg.data.max_record_bytes)
    if cfg.data.limit is not None:
        records = records.limit(cfg.data.limit)
    unpaired = takes_unpaired(cfg.loss.type)
    prepared = records.map_batches(
        tokenize_records,
        fn_kwargs={"model": model, "data_cfg": cfg.data, "unpaired": unpaired},
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=_tokenizing_tasks(cfg)),
        num_cpus=num_cpus,
    ).materialize()
    quarantine = run_dir / QUARANTINE_FILE
    report = DataReport(
        quarantine_path=str(stored_twin(cfg.output, quarantine)), files=inputs.files, skipped_files=inputs.skipped
    )
    for batch in prepared.select_columns([STATUS, TRUNCATED], num_cpus=num_cpus).iter_batches(batch_format="pyarrow"):
        report.total += batch.num_rows
        report.ok += pc.sum(pc.equal(batch.column(STATUS), OK)).as_py() or 0
        report.truncated += pc.sum(batch.column(TRUNCATED)).as_py() or 0
    rejected = prepared.map_batches(_only(status_is_ok=False), batch_format="pyarrow", num_cpus=num_cpus)
    _write_quarantine(rejected, quarantine, report)
    publish(cfg.output, quarantine)  # before any refusal below: a refused run's quarantine is kept too

    if report.total == 0:
        raise DataQualityError(f"no records found in {', '.join(paths)}", report)
    if report.quarantined_fraction > cfg.data.max_quarantine_fraction:
        raise DataQualityError(
            f"{report.num_quarantined} of {report.total} records ({report.quarantined_fraction:.1%}) were "
            f"quarantined, above data.max_quarantine_fraction={cfg.data.max_quarantine_fraction:.1%}. "
            f"Reasons: {report.as_dict()['quarantined_by_reason']}. First: {report.first_quarantined}. "
            f"See {report.quarantine_path}",
            report,
        )
    if report.ok == 0:
        raise DataQualityError(
            f"none of the {report.total} records is usable (reasons: {report.as_dict()['quarantined_by_reason']}); "
            f"first: {report.first_quarantined}; see {report.quarantine_path}",
            report,
        )
    usable = prepared.map_batches(_only(status_is_ok=True), batch_format="pyarrow", num_cpus=num_cpus)
    columns = [*PAIR_KEY, *TOKEN_COLUMNS]
    if unpaired:
        usable = usable.map_batches(
            with_kl_completions,
            fn_args=(cfg.data.max_length,),
            batch_size=max(2, cfg.train.micro_batch_size),  # TRL's: the per-device batch
            batch_format="pyarrow",
            num_cpus=num_cpus,
        )
        columns.append(DESIRABLE)
    return usable.select_columns(columns, num_cpus=num_cpus), report, inputs


def shuffled(pairs: Dataset, cfg: RunConfig) -> Dataset:
    """Shuffle rows with the data seed (when ``data.shuffle``); fractional CPUs as elsewhere."""
    if not cfg.data.shuffle:
        return pairs
    return pairs.random_shuffle(seed=cfg.data.seed, num_cpus=cfg.ray.data_cpus_per_task)


def count_training_pairs(pairs: Dataset, cfg: RunConfig, num_pairs: int) -> int:
    """The pairs of ``pairs`` (``num_pairs`` in all) that train: all but the held-out split (:func:`split_heldout`).
    The optimizer steps a run takes follow from this count, never from every usable pair."""
    if cfg.data.eval_fraction == 0:
        return num_pairs
    return split_heldout(pairs, cfg)[0].count()


def split_heldout(pairs: Dataset, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) by a hash of each pair's file name and row: a pair lands in the same split in
    every run and at every stage (tokenized or scored), so splitting never needs a materialization.
    The name, not the path: a sweep and the retraining of its best config write the synthetic task
    to different directories and must still split it the same way."""
    seed, fraction = cfg.data.seed, cfg.data.eval_fraction  # what the Ray Data tasks need, not the run
    if fraction == 0:
        return pairs, None

    def keep(heldout: bool):
        def select(batch: pa.Table) -> pa.Table:
            names = [PurePath(src).name for src in batch.column(SOURCE).to_pylist()]
            keys = zip(names, batch.column(ROW).to_pylist())
            is_heldout = [zlib.crc32(f"{seed}:{src}:{row}".encode()) / 2**32 < fraction for src, row in keys]
            return batch.filter(pa.array([h == heldout for h in is_heldout]))

        return select

    num_cpus = cfg.ray.data_cpus_per_task
    return (
        pairs.map_batches(keep(False), batch_format="pyarrow", num_cpus=num_cpus),
        pairs.map_batches(keep(True), batch_format="pyarrow", num_cpus=num_cpus),
    )
