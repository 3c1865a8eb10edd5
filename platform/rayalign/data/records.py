"""Data stage: read preference pairs with Ray Data, validate, tokenize, quarantine.

Flow::

    files ──PreferenceFileDatasource──▶ {source, row, record}
          ──map_batches(PairTokenizer)──▶ {status, reason, ..., prompt_ids, chosen_ids, rejected_ids}
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

A record that cannot be used is never dropped silently: it is written to
``quarantine.jsonl`` with its file, line/row and the reason, and the run fails
when the quarantined fraction exceeds ``data.max_quarantine_fraction``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.data.datasource import FileBasedDatasource

from rayalign.config import DataConfig, RunConfig, S3Config
from rayalign.errors import DataQualityError
from rayalign.models import ModelSource
from rayalign.schema import (
    DETAIL,
    FIELD,
    PAIR_KEY,
    READ_ERROR,
    RECORD,
    ROW,
    SOURCE,
    STATUS,
    TOKEN_COLUMNS,
    TRUNCATED,
)
from rayalign.storage import QUARANTINE_FILE, Location, location, publish, replaced_whole, stored_twin

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
OK = "ok"
_RAW_SCHEMA = pa.schema([(SOURCE, pa.string()), (ROW, pa.int64()), (RECORD, pa.string()), (READ_ERROR, pa.string())])
UTF8_BOM = b"\xef\xbb\xbf"
_RAW_ROWS_PER_BLOCK = 1024
QUARANTINE_RECORD_CHARS = 10_000  # of a rejected record's text kept in quarantine.jsonl
MAX_JSON_ARRAY_BYTES = 512 * 2**20  # a .json array is parsed whole; larger ones are refused (use JSON Lines)


class RecordError(ValueError):
    """One record is unusable; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field


# ---------------------------------------------------------------- reading


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
            [pa.array([path] * len(rows)), pa.array(rows, pa.int64()), pa.array(records, pa.string()),
             pa.array(errors, pa.string())],
            schema=_RAW_SCHEMA,
        )

    def _read_jsonl(self, stream, path: str) -> Iterator[pa.Table]:
        rows, records, errors = [], [], []
        line_no = 0
        try:
            for line_no, line in enumerate(_byte_lines(stream, self.max_record_bytes), start=1):
                if isinstance(line, TooLarge):
                    record, error = _decode(line.head)[0], (
                        f"too_large: {line.size} bytes, over data.max_record_bytes={self.max_record_bytes} "
                        f"(the first {len(line.head)} kept)")
                    rows.append(line_no)
                    records.append(record)
                    errors.append(error)
                    continue
                if line_no == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]
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
            errors.append(f"damaged_file: the file cannot be read past line {line_no} ({exc}); "
                          f"the {line_no} lines before were read")
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
            yield self._table(path, [0], [""], [
                f"too_large: a .json array over {MAX_JSON_ARRAY_BYTES} bytes is parsed whole; write it as JSON "
                "Lines (.jsonl), which is read a record at a time"])
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
            block = items[start:start + _RAW_ROWS_PER_BLOCK]
            yield self._table(path, list(range(start, start + len(block))), [json.dumps(r) for r in block],
                              [None] * len(block))

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
class SkippedFiles:
    """What expanding the named directories left out: counts, and the first few names to show."""

    not_data: int = 0  # files not in a supported format
    links_outside: int = 0  # symbolic links to files outside the named directory: never read
    examples: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.not_data + self.links_outside

    def as_dict(self) -> dict[str, Any]:
        return {"not_data": self.not_data, "links_outside": self.links_outside, "examples": list(self.examples)}


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
                part.startswith(".") for part in info.path.removeprefix(base).split("/")):
            yield info.path, False


def input_files(paths: list[str], fmt: str = "auto", s3: S3Config | None = None) -> InputFiles:
    """Expand directories to their supported files (sorted); check each named file exists and each
    Parquet file has the columns the format needs. Local paths and storage URIs (``s3`` says how to
    reach an S3-compatible server) are both read, but from one place: all local or all in one store.
    Raises DataQualityError with one line otherwise."""
    places = [location(p, s3) for p in paths]
    if len({type(place.fs) for place in places}) > 1:
        raise DataQualityError(f"data.paths: all files must be in one place (all local, or all in one storage), "
                               f"got {', '.join(paths)}")
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
            _check_parquet_columns(f, fmt, fs)
    return InputFiles(files, SkippedFiles(not_data, links_outside, tuple(examples)), fs)


def _check_parquet_columns(path: str, fmt: str, fs: pafs.FileSystem) -> None:
    columns = set(pq.read_schema(path, filesystem=fs).names)
    needed = ["chosen", "rejected"] + (["prompt"] if fmt == "pairs" else [])
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


def read_preference_files(inputs: InputFiles, num_cpus: float, max_record_bytes: int) -> Dataset:
    """A Ray Dataset of ``{source, row, record, read_error}``, one row per input record; the read tasks
    open the files through ``inputs.fs`` on whichever node they run."""
    return ray.data.read_datasource(PreferenceFileDatasource(inputs.files, max_record_bytes, filesystem=inputs.fs),
                                    num_cpus=num_cpus)


# ---------------------------------------------------------------- parsing one record


@dataclass
class Pair:
    """A normalised preference pair; ``prompt`` is text or a list of chat messages."""

    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str


def _require_str(obj: dict, key: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise RecordError("missing_field", f"field {key!r} is missing", key)
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("not_a_string", f"field {key!r} must be a string, got {type(value).__name__}", key)
    if not allow_empty and not value.strip():
        raise RecordError("empty_response", f"field {key!r} is empty", key)
    return value


def _check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("bad_messages", f"field {key!r} must be a non-empty list of messages", key)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RecordError("bad_messages", f"{key}[{i}] must be {{role: str, content: str}}", key)
    return messages


def _final_assistant_text(messages: list[dict[str, str]], key: str) -> str:
    last = messages[-1]
    if last["role"] != "assistant":
        raise RecordError("bad_messages", f"the last message of {key!r} must be from the assistant", key)
    if not last["content"].strip():
        raise RecordError("empty_response", f"the final assistant message of {key!r} is empty", key)
    return last["content"]


def _parse_conversational(obj: dict) -> Pair:
    chosen = _check_messages(obj.get("chosen"), "chosen")
    rejected = _check_messages(obj.get("rejected"), "rejected")
    if obj.get("prompt") is not None:
        prompt = _check_messages(obj["prompt"], "prompt")
        if len(chosen) != 1 or len(rejected) != 1:
            raise RecordError(
                "bad_messages", "with an explicit prompt, chosen and rejected must each be one message"
            )
    else:
        if chosen[:-1] != rejected[:-1]:
            raise RecordError("prompt_mismatch", "chosen and rejected dialogues differ before the final turn", "chosen")
        prompt = chosen[:-1]
        if not prompt:
            raise RecordError("bad_messages", "no prompt: the dialogue has only the final turn", "chosen")
    return Pair(prompt, _final_assistant_text(chosen, "chosen"), _final_assistant_text(rejected, "rejected"))


def _split_hh(transcript: str, key: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RecordError("hh_no_assistant_turn", f"{key!r} has no '\\n\\nAssistant:' turn", key)
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _parse_hh(obj: dict) -> Pair:
    chosen_prompt, chosen = _split_hh(_require_str(obj, "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh(_require_str(obj, "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        raise RecordError(
            "prompt_mismatch", "the dialogue before the last Assistant turn differs between chosen and rejected", "rejected"
        )
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordError("empty_response", f"the final Assistant response of {key!r} is empty", key)
    return Pair(chosen_prompt, chosen, rejected)


def _parse_pairs(obj: dict) -> Pair:
    return Pair(
        _require_str(obj, "prompt", allow_empty=True), _require_str(obj, "chosen"), _require_str(obj, "rejected")
    )


def detect_format(obj: dict) -> str:
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("prompt"), list):
        return "conversational"
    if "prompt" in obj:
        return "pairs"
    if isinstance(obj.get("chosen"), str) and (HH_ASSISTANT in obj["chosen"] or HH_HUMAN in obj["chosen"]):
        return "hh"  # a transcript, even one without an Assistant turn (reported as such)
    return "pairs"  # reports the missing prompt field


_PARSERS = {"pairs": _parse_pairs, "conversational": _parse_conversational, "hh": _parse_hh}


def parse_record(record: str, fmt: str) -> Pair:
    """Parse one raw record (JSON text) in ``fmt`` ('auto' detects); raises RecordError."""
    try:
        obj = json.loads(record)
    except json.JSONDecodeError as exc:
        raise RecordError("bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise RecordError("too_deeply_nested", "JSON nested deeper than the parser's recursion limit") from None
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    pair = _PARSERS[detect_format(obj) if fmt == "auto" else fmt](obj)
    _check_encodable(pair)
    if pair.chosen == pair.rejected:
        raise RecordError("identical_responses", "chosen and rejected responses are identical", "rejected")
    return pair


def _check_encodable(pair: Pair) -> None:
    """Valid JSON can still hold text no tokenizer or Arrow column takes: a lone UTF-16 surrogate (``\\ud83d``)."""
    for name in ("prompt", "chosen", "rejected"):
        value = getattr(pair, name)
        texts = [m.get("content", "") for m in value] if isinstance(value, list) else [value]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RecordError("bad_text", f"not valid Unicode text: {err.reason} ({text[err.start]!r}) at "
                                  f"character {err.start}", name) from None


# ---------------------------------------------------------------- tokenizing one pair


def tokenize_pair(pair: Pair, tokenizer, cfg: DataConfig) -> tuple[list[int], list[int], list[int], bool]:
    """Token ids of (prompt, chosen, rejected) and whether anything was truncated.

    A sequence starts with one BOS (when the tokenizer adds one) and each response ends with one EOS, so
    the model learns where an answer stops, whatever special-token text the data already holds. Over-long
    pairs follow ``cfg.truncation``: keep the end of the prompt (at most
    ``max_prompt_length`` tokens) and then cut responses to fit ``max_length``,
    or quarantine the pair as ``too_long``.
    """
    if isinstance(pair.prompt, list):
        if tokenizer.chat_template:
            prompt_ids = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
                prompt_ids = prompt_ids["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in pair.prompt) + "assistant:"
            prompt_ids = tokenizer(text).input_ids
    else:
        prompt_ids = tokenizer(pair.prompt).input_ids
    prompt_ids = _one_leading(list(prompt_ids), tokenizer.bos_token_id)
    chosen_ids, rejected_ids = (_response_ids(text, tokenizer) for text in (pair.chosen, pair.rejected))

    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= cfg.max_length:
        return list(prompt_ids), chosen_ids, rejected_ids, False
    if cfg.truncation == "drop":
        raise RecordError(
            "too_long",
            f"{len(prompt_ids)} prompt + {longest} response tokens > data.max_length={cfg.max_length}",
        )
    if len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = prompt_ids[-cfg.max_prompt_length :]
    budget = cfg.max_length - len(prompt_ids)
    chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    if chosen_ids == rejected_ids:
        raise RecordError("identical_after_truncation", "responses are identical once truncated to max_length")
    return list(prompt_ids), chosen_ids, rejected_ids, True


def _one_leading(ids: list[int], token: int | None) -> list[int]:
    """``ids`` with a run of leading ``token`` (BOS added by the tokenizer and BOS text in the data) cut to one."""
    start = 0
    while token is not None and start + 1 < len(ids) and ids[start] == ids[start + 1] == token:
        start += 1
    return ids[start:]


def _response_ids(text: str, tokenizer) -> list[int]:
    """A response's ids: no BOS in front, and exactly one EOS at the end (EOS text in the data not doubled)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while ids and ids[0] == bos:
        ids = ids[1:]
    if eos is None:
        return ids
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids + [eos]


class PairTokenizer:
    """Ray Data callable: raw records -> tokenized pairs, or a reason they were rejected."""

    def __init__(self, model: ModelSource, data_cfg: DataConfig):
        from rayalign.models import load_tokenizer

        self.tokenizer = load_tokenizer(model.local_dir())
        self.cfg = data_cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {k: [] for k in (STATUS, FIELD, DETAIL, RECORD, TRUNCATED, *TOKEN_COLUMNS)}
        for record, read_error in zip(batch.column(RECORD).to_pylist(), batch.column(READ_ERROR).to_pylist()):
            try:
                if read_error is not None:
                    reason, _, detail = read_error.partition(": ")
                    raise RecordError(reason, detail)
                *ids, truncated = tokenize_pair(parse_record(record, self.cfg.format), self.tokenizer, self.cfg)
                status, fld, detail, kept = OK, None, None, None  # the raw text is only kept for the quarantine
            except Exception as exc:  # noqa: BLE001  one record never stops the stage: it is quarantined with why
                err = exc if isinstance(exc, RecordError) else RecordError(
                    "unprocessable", f"{type(exc).__name__}: {exc}"[:500])
                ids, truncated = ([], [], []), False
                status, fld, detail, kept = err.reason, err.field, err.detail, record
            for name, value in zip((STATUS, FIELD, DETAIL, RECORD, TRUNCATED), (status, fld, detail, kept, truncated)):
                out[name].append(value)
            for name, value in zip(TOKEN_COLUMNS, ids):
                out[name].append(value)
        ids_type = pa.list_(pa.int32())
        return pa.table(
            {
                SOURCE: batch.column(SOURCE),
                ROW: batch.column(ROW),
                **{name: pa.array(out[name], pa.string()) for name in (STATUS, FIELD, DETAIL, RECORD)},
                TRUNCATED: pa.array(out[TRUNCATED], pa.bool_()),
                **{name: pa.array(out[name], ids_type) for name in TOKEN_COLUMNS},
            }
        )


# ---------------------------------------------------------------- the stage


@dataclass
class DataReport:
    total: int = 0
    ok: int = 0
    truncated: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantine_path: str = ""
    files: list[str] = field(default_factory=list)  # what was read (directories expanded)
    skipped_files: SkippedFiles = field(default_factory=SkippedFiles)  # what expanding directories left out

    @property
    def num_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def quarantined_fraction(self) -> float:
        return self.num_quarantined / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "truncated": self.truncated,
            "quarantined": self.num_quarantined,
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "quarantined_fraction": round(self.quarantined_fraction, 6),
            "quarantine_path": self.quarantine_path,
            "files": len(self.files),
            "skipped_files": self.skipped_files.as_dict(),
        }

    def summary_line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantined.items())) or "none"
        left_out = self.skipped_files
        kinds = [f"{left_out.not_data} not .jsonl/.json/.gz/.parquet"] * bool(left_out.not_data) + [
            f"{left_out.links_outside} links to outside the directory"] * bool(left_out.links_outside)
        skipped = (f"; {left_out.total} files skipped ({', '.join(kinds)}): " + ", ".join(left_out.examples)
                   + (", ..." if left_out.total > len(left_out.examples) else "")) if left_out.total else ""
        return (
            f"data: {self.total} records, {self.ok} usable, {self.truncated} truncated, "
            f"{self.num_quarantined} quarantined ({reasons}) -> {self.quarantine_path}{skipped}"
        )


def _only(status_is_ok: bool):
    def keep(batch: pa.Table) -> pa.Table:
        is_ok = pc.equal(batch.column(STATUS), OK)
        return batch.filter(is_ok if status_is_ok else pc.invert(is_ok))

    return keep


def _capped(text: str | None) -> str | None:
    """A rejected record's text as kept in the quarantine: at most QUARANTINE_RECORD_CHARS characters."""
    if text is None or len(text) <= QUARANTINE_RECORD_CHARS:
        return text
    return text[:QUARANTINE_RECORD_CHARS] + f"…[{len(text) - QUARANTINE_RECORD_CHARS} more characters]"


def _write_quarantine(rejected: Dataset, path: Path) -> Counter:
    counts: Counter = Counter()
    with replaced_whole(path) as f:
        for row in rejected.iter_rows():
            counts[row[STATUS]] += 1
            f.write(
                json.dumps(
                    {
                        SOURCE: row[SOURCE],
                        ROW: int(row[ROW]),
                        "reason": row[STATUS],
                        "field": row[FIELD],
                        "detail": row[DETAIL],
                        "record": _capped(row[RECORD]),
                    }
                )
                + "\n"
            )
    return counts


def prepare_pairs(cfg: RunConfig, paths: list[str], model: ModelSource, run_dir: Path
                  ) -> tuple[Dataset, DataReport, InputFiles]:
    """Read, validate and tokenize; write the quarantine (kept in the run's storage too); return usable
    pairs (in file order), counts and the files read.

    The tokenized pairs are materialized in Ray's object store (not on the
    driver) so that counts, quarantine and training all see one pass.
    Raises DataQualityError when too much was quarantined.
    """
    num_cpus = cfg.ray.data_cpus_per_task
    inputs = input_files(paths, cfg.data.format, cfg.output.s3)
    records = read_preference_files(inputs, num_cpus, cfg.data.max_record_bytes)
    if cfg.data.limit is not None:
        records = records.limit(cfg.data.limit)
    prepared = (
        records.map_batches(
            PairTokenizer,
            fn_constructor_kwargs={"model": model, "data_cfg": cfg.data},
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=1),
            num_cpus=num_cpus,
        )
        .materialize()
    )
    quarantine = run_dir / QUARANTINE_FILE
    report = DataReport(quarantine_path=str(stored_twin(cfg.output, quarantine)), files=inputs.files,
                        skipped_files=inputs.skipped)
    for batch in prepared.select_columns([STATUS, TRUNCATED], num_cpus=num_cpus).iter_batches(batch_format="pyarrow"):
        report.total += batch.num_rows
        report.ok += pc.sum(pc.equal(batch.column(STATUS), OK)).as_py() or 0
        report.truncated += pc.sum(batch.column(TRUNCATED)).as_py() or 0
    rejected = prepared.map_batches(_only(status_is_ok=False), batch_format="pyarrow", num_cpus=num_cpus)
    report.quarantined = dict(_write_quarantine(rejected, quarantine))
    publish(cfg.output, quarantine)  # before any refusal below: a refused run's quarantine is kept too

    if report.total == 0:
        raise DataQualityError(f"no records found in {', '.join(paths)}", report)
    if report.quarantined_fraction > cfg.data.max_quarantine_fraction:
        raise DataQualityError(
            f"{report.num_quarantined} of {report.total} records ({report.quarantined_fraction:.1%}) were "
            f"quarantined, above data.max_quarantine_fraction={cfg.data.max_quarantine_fraction:.1%}. "
            f"Reasons: {report.as_dict()['quarantined_by_reason']}. See {report.quarantine_path}", report
        )
    if report.ok == 0:
        raise DataQualityError(
            f"none of the {report.total} records is usable (reasons: {report.as_dict()['quarantined_by_reason']}); "
            f"see {report.quarantine_path}", report
        )
    usable = prepared.map_batches(_only(status_is_ok=True), batch_format="pyarrow", num_cpus=num_cpus)
    return usable.select_columns([*PAIR_KEY, *TOKEN_COLUMNS], num_cpus=num_cpus), report, inputs


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
