"""Reference cache: score a dataset once, keep it as Parquet, reuse it across runs and trials.

The key is a digest of everything the reference log-probs depend on:

    reference weights (+ model config) · tokenizer files · data file contents ·
    data format and truncation settings · scoring precision

so changing any of them misses the cache. The backend is not part of the key:
vLLM and transformers agree to ~1e-6 per token in float32 (see ``rayalign refcheck``).
A cache entry is a directory ``<cache_root>/<key>/`` holding ``data/*.parquet`` and
``manifest.json``; the manifest is written last, so a half-written entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.reference.actors import add_reference_logps

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json")
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


@dataclass
class CacheInfo:
    key: str
    path: str
    hit: bool
    components: dict[str, Any]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(root: Path, patterns: tuple[str, ...]) -> str:
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + _file_digest(path).encode())
    return h.hexdigest()


def cache_components(cfg: RunConfig, model_dir: Path, data_paths: list[str]) -> dict[str, Any]:
    """Everything the scored dataset depends on, as digests and settings."""
    precision = cfg.reference.vllm.dtype if cfg.reference.backend == "vllm" else cfg.model.dtype
    return {
        "model_weights": _files_digest(model_dir, WEIGHT_PATTERNS),
        "tokenizer": _files_digest(model_dir, TOKENIZER_PATTERNS),
        "data": [_file_digest(Path(p)) for p in sorted(data_paths)],
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


def scored_pairs_cached(
    pairs: Dataset, cfg: RunConfig, model_dir: Path, data_paths: list[str]
) -> tuple[Dataset, CacheInfo]:
    """Reference-scored pairs from the cache, scoring and writing them first on a miss."""
    components = cache_components(cfg, model_dir, data_paths)
    key = cache_key(components)
    entry = Path(cfg.reference.cache_root).expanduser().resolve() / key
    manifest = entry / "manifest.json"
    hit = manifest.is_file()
    if not hit:
        staging = entry.with_name(key + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        scored = add_reference_logps(pairs, cfg, model_dir)
        scored.write_parquet(str(staging / "data"), ray_remote_args={"num_cpus": cfg.ray.data_cpus_per_task})
        shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)
        manifest.write_text(
            json.dumps({"key": key, "backend": cfg.reference.backend, "components": components}, indent=2)
        )
    dataset = ray.data.read_parquet(str(entry / "data"), num_cpus=cfg.ray.data_cpus_per_task)
    return dataset, CacheInfo(key=key, path=str(entry), hit=hit, components=components)


def describe(info: CacheInfo) -> dict[str, Any]:
    return {k: v for k, v in asdict(info).items() if k != "components"}
