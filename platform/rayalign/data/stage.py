"""The data stage: the opening every workflow shares (model, Ray, storage, validated tokenized pairs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.cpus import cluster_nodes, plan_line, resolve_auto_cpus
from rayalign.data.hub import resolved_data_paths
from rayalign.data.reading import InputFiles
from rayalign.data.records import prepare_pairs
from rayalign.data.report import DataReport
from rayalign.data.synthetic import generate, to_jsonl
from rayalign.models import ModelSource, publish_model, resolve_run_model
from rayalign.probe import check_driver_storage, check_storage
from rayalign.runtime import ResourceDemand, Workload, init_ray
from rayalign.storage import storage_root, stored_twin, write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedRun:
    """What every workflow starts from, once Ray is up: the starting weights as every node finds them,
    and the data files (local paths or URIs) every node can read."""

    model: ModelSource
    paths: list[str]


@dataclass(frozen=True)
class PreparedData:
    """The starting weights, the data files read, and the validated, tokenized pairs (in the object
    store) with their counts and quarantine."""

    model: ModelSource
    inputs: InputFiles  # the files read (directories expanded) and their filesystem
    pairs: Dataset
    report: DataReport


def data_paths(cfg: RunConfig, out_dir: Path) -> list[str]:
    """The configured files, or the synthetic task written to the run's storage (``out_dir/data`` there),
    where every node reads it."""
    if cfg.data.paths:
        return resolved_data_paths(cfg.data, cfg.output)
    assert cfg.data.synthetic is not None
    dest = stored_twin(cfg.output, out_dir / "data" / "synthetic.jsonl")
    write_text(dest, to_jsonl(generate(cfg.data.synthetic)))
    return [dest.uri]


def open_run(cfg: RunConfig, out_dir: Path, workload: Workload | None) -> OpenedRun:
    """Resolve the model, connect to Ray, resolve the ``auto`` CPU settings for its nodes (rayalign.cpus) and check
    that ``workload`` fits, when given; publish the model and the synthetic data to storage, and check that every
    node reaches what it will open."""
    model_dir = resolve_run_model(cfg)
    init_ray(cfg.ray)
    resolve_auto_cpus(cfg, cluster_nodes())
    log.info("CPUs: %s", plan_line(cfg))
    if workload is not None:
        init_ray(cfg.ray, ResourceDemand.of_run(cfg, workload))
    check_driver_storage(cfg)  # before anything is written there: a wrong endpoint or key ends in one line
    model = publish_model(model_dir, storage_root(cfg.output) if cfg.output.storage is not None else None)
    paths = data_paths(cfg, out_dir)
    check_storage(cfg, model, paths)
    return OpenedRun(model, paths)


def prepare_data(cfg: RunConfig, out_dir: Path, workload: Workload | None) -> PreparedData:
    """:func:`open_run`, then read and tokenize the data."""
    opened = open_run(cfg, out_dir, workload)
    pairs, report, inputs = prepare_pairs(cfg, opened.paths, opened.model, out_dir)
    log.info(report.summary_line())
    return PreparedData(opened.model, inputs, pairs, report)
