"""Where a run's outputs are kept: a local directory or any URI pyarrow (and so Ray Train) can open.

A run writes into its local run directory (``output.root/output.name``) as it goes, so that
``tail -f metrics.jsonl`` works. ``output.storage`` names where the run is *kept*; on a multi-node
cluster that is shared storage, since the driver and rank 0 may be on different machines::

    <output.storage>/<output.name>/
        ray/             Ray Train's checkpoints, written there directly by every worker
        model/           the trained policy, uploaded by rank 0
        metrics.jsonl    copied by the driver at the end (taken from the final checkpoint)
        summary.json, config.yaml, quarantine.jsonl, audit/, ...

Without ``output.storage`` the run directory is the storage and nothing is copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from rayalign.config import OutputConfig

if TYPE_CHECKING:
    from rayalign.config import RunConfig

# The run directory's files, by name (see rayalign.pipeline for the whole layout).
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
QUARANTINE_FILE = "quarantine.jsonl"


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path in it, for APIs that take both rather than a URI."""
    return pafs.FileSystem.from_uri(uri)


def is_same_place(local: Path, uri: str) -> bool:
    """True when ``uri`` is the local path itself (the default: no copy needed)."""
    if "://" in uri and not uri.startswith("file://"):
        return False
    _, path = open_uri(uri if "://" in uri else str(Path(uri).resolve()))
    return Path(path).resolve() == local.resolve()


def upload(local: Path, uri: str) -> None:
    """Copy a local file or directory (recursively) to ``uri``, overwriting files of the same name."""
    if is_same_place(local, uri):
        return
    fs, path = open_uri(uri)
    fs.create_dir(path if local.is_dir() else path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local.resolve()), path, destination_filesystem=fs)


def read_text(uri: str) -> str | None:
    """A file's text from storage, or None when there is no such file."""
    fs, path = open_uri(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def remove(uri: str) -> None:
    """Delete a directory in storage (nothing to do when it does not exist)."""
    fs, path = open_uri(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def publish(output: OutputConfig, local_dir: Path) -> str:
    """Copy a finished output directory inside the run directory (e.g. ``audit/``) to the same place
    under the run's storage; returns where it went."""
    dest = f"{output.run_storage}/{local_dir.relative_to(output.run_dir).as_posix()}"
    upload(local_dir, dest)
    return dest


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory, drop the files a previous run of the same name left, write the config."""
    run_dir = cfg.output.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (METRICS_FILE, SUMMARY_FILE, QUARANTINE_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    return run_dir


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
