"""Reference cache: score a dataset once, keep it as Parquet, reuse it across runs and trials.

The key is a digest of everything the reference log-probs depend on:

    the model's content key (weights, config and tokenizer files; rayalign.models.ModelSource) ·
    data file contents · data format and truncation settings · scoring precision

so changing any of them misses the cache. The backend is not part of the key:
vLLM and transformers agree to ~1e-6 per token in float32 (see ``rayalign refcheck``).

An entry lives under the cache root (a local directory or a storage URI, :func:`rayalign.storage.cache_location`)
as ``<key>/data-<writer>/*.parquet`` and ``<key>/manifest.json``. Each writer writes its own
``data-<writer>`` folder, through the storage's filesystem from whichever nodes Ray Data runs on, and
then the manifest, which names that folder: the manifest is the commit. A half-written entry is never
read, and two runs that miss the same key at once each commit a whole folder instead of mixing parts.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.data.records import InputFiles
from rayalign.models import ModelSource
from rayalign.reference.actors import add_reference_logps
from rayalign.storage import Location, cache_location, file_digest, read_text, write_text

MANIFEST = "manifest.json"


@dataclass
class CacheInfo:
    key: str
    path: str
    hit: bool
    components: dict[str, Any]


def cache_components(cfg: RunConfig, model: ModelSource, inputs: InputFiles) -> dict[str, Any]:
    """Everything the scored dataset depends on, as digests and settings."""
    precision = cfg.reference.vllm.dtype if cfg.reference.backend == "vllm" else cfg.model.dtype
    return {
        "model": model.key,
        "data": [file_digest(Location(inputs.fs, p, p)) for p in sorted(inputs.files)],
        "data_settings": {
            "format": cfg.data.format,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
            "truncation": cfg.data.truncation,
            # Only when set, so the keys of caches scored without a limit stay valid.
            **({"limit": cfg.data.limit} if cfg.data.limit is not None else {}),
        },
        "precision": precision,
    }


def cache_key(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:20]


def committed_data(entry: Location) -> Location | None:
    """The data folder the entry's manifest commits, or None when the entry is not (yet) whole."""
    text = read_text(entry / MANIFEST)
    if text is None:
        return None
    data = entry / json.loads(text).get("data", "data")
    return data if data.kind() == pafs.FileType.Directory else None


def scored_pairs_cached(
    pairs: Dataset, cfg: RunConfig, model: ModelSource, inputs: InputFiles
) -> tuple[Dataset, CacheInfo]:
    """Reference-scored pairs from the cache, scoring and writing them first on a miss."""
    components = cache_components(cfg, model, inputs)
    key = cache_key(components)
    entry = cache_location(cfg) / key
    data = committed_data(entry)
    hit = data is not None
    if data is None:
        data = entry / f"data-{uuid.uuid4().hex[:12]}"
        scored = add_reference_logps(pairs, cfg, model)
        scored.write_parquet(data.path, filesystem=data.fs, ray_remote_args={"num_cpus": cfg.ray.data_cpus_per_task})
        write_text(entry / MANIFEST, json.dumps(
            {"key": key, "backend": cfg.reference.backend, "data": data.name, "components": components}, indent=2))
    return read_scored(data, cfg.ray.data_cpus_per_task), CacheInfo(key=key, path=entry.uri, hit=hit,
                                                                     components=components)


def read_scored(data: Location, num_cpus: float) -> Dataset:
    """The committed Parquet folder as a lazy Dataset whose every task takes ``num_cpus``.

    Ray Data's newer Parquet reader lists the files in a task of one whole CPU, which it cannot get
    while Ray Train's workers hold a node's CPUs: a run sized to its cluster would wait forever each
    time training starts or restarts after a lost node. The older reader lists on the driver.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    newer, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(data.path, filesystem=data.fs, num_cpus=num_cpus)
    finally:
        context.use_datasource_v2 = newer


def describe(info: CacheInfo) -> dict[str, Any]:
    return {k: v for k, v in asdict(info).items() if k != "components"}
