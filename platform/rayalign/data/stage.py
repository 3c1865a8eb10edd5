"""The data stage: the opening every workflow shares (model, Ray, files, validated tokenized pairs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.data.records import DataReport, prepare_pairs
from rayalign.data.synthetic import generate, write_jsonl
from rayalign.models import resolve_run_model
from rayalign.runtime import ResourceDemand, init_ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """The starting weights, the data files, and the validated, tokenized pairs (in the object
    store) with their counts and quarantine."""

    model_dir: Path
    paths: list[str]  # the files read (directories expanded)
    pairs: Dataset
    report: DataReport


def data_paths(cfg: RunConfig, out_dir: Path) -> list[str]:
    """The configured files, or the synthetic task written into ``out_dir``."""
    if cfg.data.paths:
        return list(cfg.data.paths)
    assert cfg.data.synthetic is not None
    return [str(write_jsonl(generate(cfg.data.synthetic), out_dir / "data" / "synthetic.jsonl"))]


def prepare_data(cfg: RunConfig, out_dir: Path, demand: ResourceDemand | None) -> PreparedData:
    """Resolve the model, connect to Ray (checking ``demand`` fits, when given), read and tokenize the data."""
    model_dir = resolve_run_model(cfg)
    init_ray(cfg.ray, demand)
    pairs, report = prepare_pairs(cfg, data_paths(cfg, out_dir), model_dir, out_dir)
    log.info(report.summary_line())
    return PreparedData(model_dir, report.files, pairs, report)
