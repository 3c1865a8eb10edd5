"""Reading preference files with Ray Data: JSON Lines, JSON arrays, gzip and Parquet, record by record, in one
pass and never holding a record over ``data.max_record_bytes`` whole; data directories expanded once.

A record that cannot even be read as text keeps its place: it leaves here with a ``read_error`` (``bad_utf8``,
``too_large``, ``damaged_file``, ...) and is quarantined by the stage (:mod:`rayalign.data.records`)."""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Dataset
from ray.data.datasource import FileBasedDatasource

from rayalign.config import ColumnsConfig, S3Config
from rayalign.data.parsing import required_fields
from rayalign.data.report import SkippedFiles
from rayalign.errors import DataQualityError
from rayalign.schema import READ_ERROR, RECORD, ROW, SOURCE
from rayalign.storage import Location, location

_RAW_SCHEMA = pa.schema([(SOURCE, pa.string()), (ROW, pa.int64()), (RECORD, pa.string()), (READ_ERROR, pa.string())])
UTF8_BOM = b"\xef\xbb\xbf"
_RAW_ROWS_PER_BLOCK = 1024
QUARANTINE_RECORD_CHARS = 10_000  # of a rejected record's text kept in quarantine.jsonl
MAX_JSON_ARRAY_BYTES = 512 * 2**20  # a .json array is parsed whole; larger ones are refused (use JSON Lines)


class ReadDamage(Exception):
    """A file stops being readable part-way (a truncated or corrupt ``.gz``)."""


# What a damaged stream raises: gzip's BadGzipFile is an OSError, a truncation an EOFError.
_STREAM_ERRORS = (OSError, EOFError, zlib.error)


@dataclass(frozen=True)
class TooLarge:
    """A record longer than ``data.max_record_bytes``: its size and its first bytes, never the whole of it."""

    size: int
    head: bytes


def _byte_lines(stream, max_bytes: int) -> Iterator[bytes | TooLarge]:
    """The lines of a binary stream (without the newline), in one pass: each byte is looked at once, and a line
    longer than ``max_bytes`` is never held whole (it comes back as :class:`TooLarge`). Raises ReadDamage where
    the stream breaks."""
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = stream.read(1 << 16)
        except _STREAM_ERRORS as exc:
            raise ReadDamage(str(exc) or type(exc).__name__) from None
        if not chunk:
            break
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            yield _line(parts, chunk[start:end], size, max_bytes)
            parts, size, start = [], 0, end + 1
        size = _keep(parts, chunk[start:], size, max_bytes)
    if size:
        yield _line(parts, b"", size, max_bytes)


def _keep(parts: list[bytes], piece: bytes, size: int, max_bytes: int) -> int:
    """Add ``piece`` to the line being read, keeping at most the first ``max_bytes`` + 1 bytes; the new size."""
    room = max_bytes + 1 - sum(map(len, parts))
    if room > 0:
        parts.append(piece[:room])
    return size + len(piece)


def _line(parts: list[bytes], last: bytes, size: int, max_bytes: int) -> bytes | TooLarge:
    size = _keep(parts, last, size, max_bytes)
    whole = b"".join(parts)
    return whole if size <= max_bytes else TooLarge(size, whole[:QUARANTINE_RECORD_CHARS])


class PreferenceFileDatasource(FileBasedDatasource):
    """Streams raw records with their file and 1-based line (JSONL), 0-based row (Parquet) or 0-based
    item (a JSON array in a ``.json`` file).

    Parsing happens later, per record, so that one bad line is quarantined instead of failing the whole
    read. What cannot even be read as text is quarantined the same way, through ``read_error``: a line
    that is not UTF-8 (``bad_utf8``), the rest of a damaged ``.gz`` (``damaged_file``, after the lines
    read before the damage), an unparsable ``.json`` array (``bad_json``). A UTF-8 byte-order mark at
    the start of a file is skipped, as Windows tools write one.
    """

    _FILE_EXTENSIONS = ["jsonl", "json", "gz", "parquet"]

    def __init__(self, paths, max_record_bytes: int, **kwargs):
        super().__init__(paths, **kwargs)
        self.max_record_bytes = max_record_bytes

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        if path.endswith(".parquet"):  # random access: read by row group, never buffered whole
            return filesystem.open_input_file(path)
        # Decompressed in _read_stream (gzip module), not by Arrow: Arrow fails a truncated stream
        # without handing back what it decompressed before the damage.
        open_args["compression"] = None
        return filesystem.open_input_stream(path, buffer_size=self._resolve_buffer_size(open_args), **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        if path.endswith(".parquet"):
            yield from self._read_parquet(f, path)
            return
        stream = gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else f
        if path.removesuffix(".gz").endswith(".json"):
            yield from self._read_json(stream, path)
        else:
            yield from self._read_jsonl(stream, path)

    @staticmethod
    def _table(path: str, rows: list[int], records: list[str], errors: list[str | None]) -> pa.Table:
        return pa.Table.from_arrays(
            [
                pa.array([path] * len(rows)),
                pa.array(rows, pa.int64()),
                pa.array(records, pa.string()),
                pa.array(errors, pa.string()),
            ],
            schema=_RAW_SCHEMA,
        )

    def _read_jsonl(self, stream, path: str) -> Iterator[pa.Table]:
        rows, records, errors = [], [], []
        line_no = 0
        try:
            for line_no, line in enumerate(_byte_lines(stream, self.max_record_bytes), start=1):
                if isinstance(line, TooLarge):
                    record, error = (
                        _decode(line.head)[0],
                        (
                            f"too_large: {line.size} bytes, over data.max_record_bytes={self.max_record_bytes} "
                            f"(the first {len(line.head)} kept)"
                        ),
                    )
                    rows.append(line_no)
                    records.append(record)
                    errors.append(error)
                    continue
                if line_no == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM) :]
                if not line.strip():
                    continue
                record, error = _decode(line)
                rows.append(line_no)
                records.append(record)
                errors.append(error)
                if len(rows) == _RAW_ROWS_PER_BLOCK:
                    yield self._table(path, rows, records, errors)
                    rows, records, errors = [], [], []
        except ReadDamage as exc:
            rows.append(line_no + 1)
            records.append("")
            errors.append(
                f"damaged_file: the file cannot be read past line {line_no} ({exc}); "
                f"the {line_no} lines before were read"
            )
        if rows:
            yield self._table(path, rows, records, errors)

    def _read_json(self, stream, path: str) -> Iterator[pa.Table]:
        """A ``.json`` file: a JSON array of records (as dataset loaders write it), else JSON Lines. An array is
        parsed whole, so one longer than :data:`MAX_JSON_ARRAY_BYTES` is refused (one quarantine entry)."""
        try:
            data = stream.read(MAX_JSON_ARRAY_BYTES + 1)
        except _STREAM_ERRORS as exc:
            yield self._table(path, [0], [""], [f"damaged_file: the file cannot be read ({exc})"])
            return
        if len(data) > MAX_JSON_ARRAY_BYTES:
            if not data.removeprefix(UTF8_BOM).lstrip().startswith(b"["):  # JSON Lines named .json: read as such
                yield from self._read_jsonl(_Rejoined(data, stream), path)
                return
            yield self._table(
                path,
                [0],
                [""],
                [
                    f"too_large: a .json array over {MAX_JSON_ARRAY_BYTES} bytes is parsed whole; write it as JSON "
                    "Lines (.jsonl), which is read a record at a time"
                ],
            )
            return
        data = data.removeprefix(UTF8_BOM)
        if not data.lstrip().startswith(b"["):
            yield from self._read_jsonl(io.BytesIO(data), path)
            return
        text, error = _decode(data)
        if error is None:
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                error = f"bad_json: the JSON array is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        if error is not None:
            yield self._table(path, [0], [text[:10_000]], [error])
            return
        for start in range(0, len(items), _RAW_ROWS_PER_BLOCK):
            block = items[start : start + _RAW_ROWS_PER_BLOCK]
            yield self._table(
                path, list(range(start, start + len(block))), [json.dumps(r) for r in block], [None] * len(block)
            )

    def _read_parquet(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        parquet = pq.ParquetFile(f)  # a random-access file: row group by row group
        row = 0
        for batch in parquet.iter_batches(batch_size=_RAW_ROWS_PER_BLOCK):
            records = [json.dumps(r, default=str) for r in batch.to_pylist()]
            yield self._table(path, list(range(row, row + len(records))), records, [None] * len(records))
            row += len(records)


def _decode(raw: bytes) -> tuple[str, str | None]:
    """UTF-8 text, or the text with bad bytes escaped and a ``bad_utf8`` read error."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", "backslashreplace"), f"bad_utf8: invalid UTF-8 at byte {exc.start} of the record"


SUPPORTED_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass(frozen=True)
class InputFiles:
    """The files a run reads (directories expanded), the filesystem they are on, and what was left out."""

    files: list[str]  # paths in ``fs``'s terms: absolute local paths, or bucket/key in object storage
    skipped: SkippedFiles
    fs: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem)


def _files_under(place: Location) -> Iterator[tuple[str, bool]]:
    """Every file under a directory, dot-files and dot-directories (``.git/``) left out, in one pass, each with
    whether it is a symbolic link to a file outside the directory (local disks only; object stores have none)."""
    if place.is_local:
        root = os.path.realpath(place.path)
        for folder, subfolders, names in os.walk(place.path):  # linked directories are not entered
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for name in names:
                if not name.startswith("."):
                    path = os.path.join(folder, name)
                    outside = os.path.islink(path) and os.path.commonpath([root, os.path.realpath(path)]) != root
                    yield path, outside
        return
    base = place.path.rstrip("/") + "/"
    for info in place.fs.get_file_info(pafs.FileSelector(place.path, recursive=True)):
        if info.type == pafs.FileType.File and not any(
            part.startswith(".") for part in info.path.removeprefix(base).split("/")
        ):
            yield info.path, False


def input_files(
    paths: list[str], fmt: str = "auto", s3: S3Config | None = None, columns: ColumnsConfig | None = None
) -> InputFiles:
    """Expand directories to their supported files (sorted); check each named file exists and each
    Parquet file has the columns the format needs. Local paths and storage URIs (``s3`` says how to
    reach an S3-compatible server) are both read, but from one place: all local or all in one store.
    Raises DataQualityError with one line otherwise."""
    places = [location(p, s3) for p in paths]
    if len({type(place.fs) for place in places}) > 1:
        raise DataQualityError(
            f"data.paths: all files must be in one place (all local, or all in one storage), got {', '.join(paths)}"
        )
    fs = places[0].fs if places else pafs.LocalFileSystem()
    files: list[str] = []
    not_data = links_outside = 0
    examples: list[str] = []
    for given, place in zip(paths, places):
        kind = place.kind()
        if kind == pafs.FileType.NotFound:
            raise DataQualityError(f"data.paths: not found: {given}")
        if kind != pafs.FileType.Directory:
            files.append(place.path)
            continue
        kept, left_out = [], 0
        for path, outside in _files_under(place):
            if outside or not path.endswith(SUPPORTED_SUFFIXES):
                links_outside += outside
                not_data += not outside
                left_out += 1
                if len(examples) < 3:
                    examples.append(path)
            else:
                kept.append(path)
        if not kept:
            raise DataQualityError(
                f"data.paths: {given} is a directory with no {', '.join(SUPPORTED_SUFFIXES)} files"
                + (f" ({left_out} other files skipped)" if left_out else " (it is empty)")
            )
        files += sorted(kept)
    for f in files:
        if f.endswith(".parquet"):
            _check_parquet_columns(f, required_fields(fmt, columns), fs)
    return InputFiles(files, SkippedFiles(not_data, links_outside, tuple(examples)), fs)


def _check_parquet_columns(path: str, needed: list[str], fs: pafs.FileSystem) -> None:
    columns = set(pq.read_schema(path, filesystem=fs).names)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataQualityError(
            f"{path}: no {' or '.join(repr(c) for c in missing)} column (the file has: {', '.join(sorted(columns))})"
        )


class _Rejoined:
    """``head`` (already read) and then the rest of ``stream``, as one stream."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        cut = len(self.head) if size < 0 else size
        out, self.head = self.head[:cut], self.head[cut:]
        return out


# A gzip'd JSON file of preference text is ~3-5x larger once read; counted as 8x, a small one stays small.
_GZIP_EXPANSION = 8


def read_blocks(inputs: InputFiles) -> int | None:
    """1 for inputs smaller than Ray Data's ``target_min_block_size`` (1 MiB by default) once read; None
    (Ray Data decides) otherwise. Ray Data splits even a few kilobytes into 2 blocks per CPU, and each block
    is a task (often a new worker process) in every stage after the read, for no parallelism worth having."""
    sizes = [info.size or 0 for info in inputs.fs.get_file_info(inputs.files)]
    in_memory = sum(size * (_GZIP_EXPANSION if f.endswith(".gz") else 1) for f, size in zip(inputs.files, sizes))
    return 1 if in_memory < ray.data.DataContext.get_current().target_min_block_size else None


def read_preference_files(inputs: InputFiles, num_cpus: float, max_record_bytes: int) -> Dataset:
    """A Ray Dataset of ``{source, row, record, read_error}``, one row per input record; the read tasks
    open the files through ``inputs.fs`` on whichever node they run (:func:`read_blocks` says how many blocks)."""
    return ray.data.read_datasource(
        PreferenceFileDatasource(inputs.files, max_record_bytes, filesystem=inputs.fs),
        num_cpus=num_cpus,
        override_num_blocks=read_blocks(inputs),
    )
