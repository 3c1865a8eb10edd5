"""Where a run's outputs are kept: a local directory or a storage URI (s3://, gs://, file://).

A run writes into its local run directory (``output.root/output.name``) as it goes, so that
``tail -f metrics.jsonl`` works. ``output.storage`` names where the run is *kept*; on a cluster
whose nodes share no filesystem that is object storage, the one place every node reaches::

    <output.storage>/
        _models/<name>-<digest>/   starting weights, published once per content (rayalign.models)
        _refcache/refstore/<scorer>/ the reference store: per-pair scores (rayalign.reference.store)
        <output.name>/
            ray/             Ray Train's checkpoints, written there directly by every worker
            model/           the trained policy, uploaded by rank 0
            data/            synthetic data, written by the driver and read by every node
            metrics.jsonl, summary.json, config.yaml, quarantine.jsonl, logs/, audit/, ...

Without ``output.storage`` the run directory is the storage and nothing is copied.

Every place is a :class:`Location`: the pyarrow filesystem that reaches it and the path in it. It
pickles whole (endpoint, region, scheme; never credentials, which each node takes from its own
environment), so a process on another node opens the same place, and Ray Train, Tune and Data are
handed the filesystem explicitly instead of guessing it from a string.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from rayalign.config import OutputConfig, RunConfig, S3Config

# The run directory's files, by name (see rayalign.pipeline for the whole layout).
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
QUARANTINE_FILE = "quarantine.jsonl"
SCORED_DIR = "scored"  # the run's reference-scored pairs, kept for restarts (train.max_failures > 0)
MODEL_DIR = "model"  # the trained policy, Hugging Face format
RUN_PLOT = "report.png"
RAY_TRAIN_DIR = "ray"  # Ray Train's storage path
BEST_DIR = "best"  # the best held-out model so far (monitor.keep_best), a DeepSpeed checkpoint
RAY_TRAIN_RUN = "train"  # the Ray Train run's name in it: one per run directory, so a resumed run finds it


@dataclass(frozen=True)
class Location:
    """A file or directory in storage. ``path`` is in ``fs``'s terms (``bucket/key`` for object
    storage, an absolute path locally); ``uri`` is how a person reads it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        """On a filesystem of this machine (a local disk or a mount); object storage otherwise."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File


def location(where: str, s3: S3Config | None = None) -> Location:
    """The :class:`Location` of a local path or a URI; ``s3`` says how to reach an S3-compatible server."""
    if "://" not in where:
        path = str(Path(where).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), path, path)
    scheme, rest = where.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return Location(pafs.LocalFileSystem(), rest, where)
    if scheme == "s3":
        options: dict[str, Any] = {}
        if s3 is not None and s3.endpoint is not None:
            options.update(endpoint_override=s3.endpoint, scheme=s3.scheme)
        region = (
            (s3.region if s3 is not None else None)
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )
        if not region and "endpoint_override" not in options:
            region = _bucket_region(rest.split("/", 1)[0])
        if region:
            options["region"] = region
        return Location(pafs.S3FileSystem(**options), rest.rstrip("/"), where)
    fs, path = pafs.FileSystem.from_uri(where)
    return Location(fs, path, where)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    """An AWS bucket's region, asked of S3 once per bucket (None when it cannot be asked): the nodes then
    get it with the filesystem instead of each guessing us-east-1."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def storage_root(output: OutputConfig) -> Location:
    """The storage every run of this config shares (``output.storage``, else ``output.root``)."""
    return location(output.storage_root, output.s3)


def run_location(output: OutputConfig) -> Location:
    """The run's directory in storage: ``<storage>/<name>``."""
    return location(output.run_storage, output.s3)


def cache_location(cfg: RunConfig) -> Location:
    """The reference cache's root: ``reference.cache_root``, else ``<storage>/_refcache``."""
    return location(cfg.reference.cache_root or f"{cfg.output.storage_root}/_refcache", cfg.output.s3)


def is_same_place(local: Path, dest: Location) -> bool:
    """True when ``dest`` is the local path itself (the default: no copy needed)."""
    return dest.is_local and Path(dest.path).resolve() == local.resolve()


def upload(local: Path, dest: Location) -> None:
    """Copy a local file or directory (recursively) to ``dest``, overwriting files of the same name."""
    if is_same_place(local, dest):
        return
    parent = dest.path if local.is_dir() else dest.path.rsplit("/", 1)[0]
    dest.fs.create_dir(parent, recursive=True)
    pafs.copy_files(str(local.resolve()), dest.path, destination_filesystem=dest.fs)


def download(src: Location, local: Path) -> None:
    """Copy a file or directory in storage to ``local`` (created)."""
    if src.kind() == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src.path, str(local), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())


def read_bytes(loc: Location) -> bytes | None:
    """A file's bytes from storage, or None when there is no such file."""
    if not loc.is_file():
        return None
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def read_text(loc: Location) -> str | None:
    """A file's text from storage, or None when there is no such file."""
    data = read_bytes(loc)
    return None if data is None else data.decode()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole file. A reader never sees it half-written: an object store makes an object visible
    only once its upload completes; on a local disk the file is written beside and renamed."""
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    if not loc.is_local:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    staging = f"{loc.path}.{uuid.uuid4().hex[:8]}.partial"
    with loc.fs.open_output_stream(staging) as f:
        f.write(data)
    loc.fs.move(staging, loc.path)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


@contextlib.contextmanager
def replaced_whole(path: Path, mode: str = "w", **open_args) -> Iterator[IO]:
    """Open a staging file of this process's own beside ``path`` and move it onto ``path`` only once the block
    finished: a killed run never leaves a file that looks complete, and two runs never write into each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with staging.open(mode, **open_args) as f:
            yield f
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_local(path: Path, data: str | bytes) -> None:
    """Write a whole local file at once (:func:`replaced_whole`)."""
    with replaced_whole(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def remove(loc: Location) -> None:
    """Delete a directory or file in storage (nothing to do when it does not exist)."""
    kind = loc.kind()
    if kind == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif kind == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def file_digest(loc: Location) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stored_twin(output: OutputConfig, local: Path) -> Location:
    """Where ``local``, a file or folder inside the run directory, is kept in the run's storage (a path
    outside the run directory is kept where it is)."""
    local = local.resolve()
    if not local.is_relative_to(output.run_dir):
        return location(str(local))
    return run_location(output) / local.relative_to(output.run_dir).as_posix()


def publish(output: OutputConfig, local: Path) -> Location:
    """Copy a finished output inside the run directory (e.g. ``audit/``, ``quarantine.jsonl``) to the
    same place under the run's storage; returns where it went."""
    dest = stored_twin(output, local)
    upload(local, dest)
    return dest


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory, drop the files a previous run of the same name left (here and in the
    run's storage, so a run that fails never stands beside an older run's summary or model), write the config."""
    run_dir = cfg.output.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (METRICS_FILE, SUMMARY_FILE, QUARANTINE_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    remove(location(str(run_dir / SCORED_DIR)))
    stored = run_location(cfg.output)
    if not is_same_place(run_dir, stored):
        for stale in (METRICS_FILE, SUMMARY_FILE, QUARANTINE_FILE, SCORED_DIR, MODEL_DIR):
            remove(stored / stale)
    write_local(run_dir / CONFIG_FILE, cfg.to_yaml())
    return run_dir


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
