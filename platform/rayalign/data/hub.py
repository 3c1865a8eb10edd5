"""``data.paths`` entries that are Hugging Face hub dataset ids (``org/name``): the files of ``data.split`` (in
``data.subset``, at ``data.revision``), resolved through the Hugging Face cache as hub models are
(:func:`rayalign.models.hub_snapshot`), then read by Ray Data like any other file.

Which files hold a split follows the hub's own conventions for a dataset repository (the ones ``datasets`` and
the dataset viewer resolve without a loading script): ``<dir><split>-*.<ext>``, ``<dir><split>.<ext>`` or
``<dir><split>/*.<ext>``, where ``<dir>`` is the repository's root or ``data/`` (with a subset:
``<subset>/`` or ``data/<subset>/``). With ``output.storage`` the files are copied once into
``<storage>/_datasets/`` (a manifest written last marks a whole copy), so nodes that share no filesystem with
the driver read them from there, as they fetch models.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

from rayalign.config import DataConfig, OutputConfig, hub_repo_id
from rayalign.models import hub_snapshot
from rayalign.storage import Location, read_text, storage_root, upload, write_text

DATASETS_DIR = "_datasets"
DATASET_MANIFEST = "rayalign-dataset.json"
# What rayalign reads (rayalign.data.reading.SUPPORTED_SUFFIXES); Parquet is what the hub converts datasets to.
_EXTENSIONS = ("parquet", "jsonl", "jsonl.gz", "json", "json.gz")


def split_patterns(split: str, subset: str | None) -> list[str]:
    """The repository paths (glob patterns) that may hold ``split``."""
    dirs = [f"{subset}/", f"data/{subset}/"] if subset else ["", "data/"]
    return [
        pattern
        for d in dirs
        for ext in _EXTENSIONS
        for pattern in (f"{d}{split}-*.{ext}", f"{d}{split}.{ext}", f"{d}{split}/*.{ext}")
    ]


def hub_dataset_files(repo_id: str, data: DataConfig) -> tuple[Path, list[Path]]:
    """The snapshot directory of hub dataset ``repo_id`` and its files for ``data.split`` (sorted), fetched into
    the Hugging Face cache when missing (:func:`rayalign.models.hub_snapshot`, whose one-line errors it raises);
    also FileNotFoundError when no file holds the split."""
    patterns = split_patterns(data.split, data.subset)
    snapshot = hub_snapshot(repo_id, data.revision, "dataset", patterns)
    # The snapshot directory also holds whatever earlier fetches of other splits brought.
    files = sorted(
        p for p in snapshot.rglob("*") if any(fnmatch(p.relative_to(snapshot).as_posix(), q) for q in patterns)
    )
    if not files:
        where = f"subset {data.subset!r}, " if data.subset else ""
        raise FileNotFoundError(
            f"data.paths: hub dataset {repo_id!r} has no file for {where}split {data.split!r} (looked for "
            f"{patterns[0]}, {patterns[1]}, {patterns[2]} and the same under data/); set data.split or data.subset"
        )
    return snapshot, files


def resolved_data_paths(data: DataConfig, output: OutputConfig) -> list[str]:
    """``data.paths`` with each hub dataset id replaced by its split's files: local paths in the Hugging Face
    cache, or, with ``output.storage``, their copies in ``<storage>/_datasets/<org>--<name>--<commit>/``."""
    paths: list[str] = []
    for path in data.paths:
        repo_id = hub_repo_id(path)
        if repo_id is None:
            paths.append(path)
            continue
        snapshot, files = hub_dataset_files(repo_id, data)
        if output.storage is None:
            paths += [str(f) for f in files]
            continue
        dest = storage_root(output) / DATASETS_DIR / f"{repo_id.replace('/', '--')}--{snapshot.name}"
        paths += [(dest / f.relative_to(snapshot).as_posix()).uri for f in _published(snapshot, files, dest)]
    return paths


def _published(snapshot: Path, files: list[Path], dest: Location) -> list[Path]:
    """Copy ``files`` to ``dest`` unless a whole copy is there (its manifest, written last, lists them)."""
    names = [f.relative_to(snapshot).as_posix() for f in files]
    manifest = read_text(dest / DATASET_MANIFEST)
    copied = json.loads(manifest)["files"] if manifest is not None else {}
    if not set(names) <= set(copied):
        for f, name in zip(files, names):
            upload(f.resolve(), dest / name)  # the cache's files are links to its blobs
        copied |= {name: f.stat().st_size for name, f in zip(names, files)}
        write_text(dest / DATASET_MANIFEST, json.dumps({"files": copied}, indent=2))
    return files
