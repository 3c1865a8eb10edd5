"""The reference stage: score the prepared pairs with the frozen reference, hand training a typed value.

With ``reference.cache`` each pair's scores are read from the reference store where an earlier run left them,
and only the missing pairs are scored and appended (:mod:`rayalign.reference.store`); otherwise the reference
actors (:mod:`rayalign.reference.actors`) stream straight into training. Either way training gets
:class:`ScoredPairs`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.data import Dataset

from rayalign.config import ConfigError, RunConfig
from rayalign.data.records import shuffled, split_heldout
from rayalign.data.stage import PreparedData
from rayalign.models import ModelSource
from rayalign.reference.actors import add_reference_logps
from rayalign.reference.store import StoreReport, scored_through_store
from rayalign.storage import SCORED_DIR, Location, run_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSource:
    """How the reference log-probs were obtained (``summary.json``'s ``reference``)."""

    backend: str
    cache: dict[str, Any] | None = None  # the reference store's report (StoreReport), when scored through it
    scored_by_sweep_driver: bool = False
    scope: str = "all"  # which pairs it scored: all, heldout or none (RunConfig.reference_scope)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoredPairs:
    """What the reference stage hands to training (with ``reference.in_worker``, the pairs unscored)."""

    train: Dataset  # reference-scored training pairs, shuffled
    num_train: int
    heldout: Dataset | None  # scored held-out pairs, in the object store (every evaluation re-reads them)
    source: ReferenceSource


def score_into_cache(cfg: RunConfig, data: PreparedData) -> tuple[Dataset, StoreReport]:
    """Every pair of ``data`` with its reference scores, through the reference store (whatever
    ``reference.cache`` says): read where stored, scored and appended where not."""
    scored, report = scored_through_store(data.pairs, cfg, data.model)
    log.info(
        "reference store: %d pairs found, %d scored; the store holds %d rows (%.1f MB) in %s",
        report.found,
        report.scored,
        report.store_rows,
        report.store_bytes / 1e6,
        report.path,
    )
    return scored, report


def score_reference(cfg: RunConfig, data: PreparedData) -> ScoredPairs:
    """Reference-score ``data``'s pairs and split off the held-out pairs.

    The small held-out split is scored once and kept in the object store, since every evaluation
    re-reads it.
    """
    scope = cfg.reference_scope
    if cfg.reference.in_worker or scope != "all":
        # In the workers, each step, with the adapters off; or a loss that needs no reference: the held-out
        # pairs alone are scored (for frac_in_U and the rewards on them), or none.
        train, heldout = split_heldout(data.pairs, cfg)
        heldout = scored_heldout_only(cfg, kept_heldout(heldout, cfg, data.report.ok), data.model)
        num_train = train.count() if heldout is not None else data.report.ok
        return ScoredPairs(
            shuffled(train, cfg), num_train, heldout, ReferenceSource(cfg.reference.backend, scope=scope)
        )
    if cfg.reference.cache:
        scored, report = score_into_cache(cfg, data)
        if cfg.train.max_failures > 0:
            # Restarted workers re-read their pairs: from storage, not from object-store blocks that may have
            # been on the node that was lost.
            scored = kept_in_storage(scored, run_location(cfg.output) / SCORED_DIR, cfg.ray.data_cpus_per_task)
        return split_scored(cfg, scored, ReferenceSource(cfg.reference.backend, report.as_dict()), data.report.ok)

    train, heldout = split_heldout(data.pairs, cfg)
    heldout = kept_heldout(heldout, cfg, data.report.ok)
    if heldout is not None:
        heldout = add_reference_logps(heldout, cfg, data.model).materialize()
    num_train = train.count() if heldout is not None else data.report.ok
    train = add_reference_logps(shuffled(train, cfg), cfg, data.model)
    if cfg.train.epochs > 1:
        # Streaming would re-score the reference every epoch; keep one scored copy in the object store.
        train = train.materialize()
    return ScoredPairs(train, num_train, heldout, ReferenceSource(cfg.reference.backend))


def scored_heldout_only(cfg: RunConfig, heldout: Dataset | None, model: ModelSource) -> Dataset | None:
    """The held-out pairs of a run that scores no training pair, reference-scored in the object store when
    ``cfg.reference_scope`` is ``heldout`` (a loss that needs no reference, with
    ``monitor.reference_for_heldout``), else as they are."""
    if heldout is None or cfg.reference_scope != "heldout":
        return heldout
    return add_reference_logps(heldout, cfg, model).materialize()


def split_scored(
    cfg: RunConfig,
    scored: Dataset,
    source: ReferenceSource,
    num_scored: int,
    scored_heldout: Dataset | None = None,
) -> ScoredPairs:
    """Already-scored pairs (``num_scored`` of them) -> shuffled training split and held-out split.
    ``scored_heldout``: the held-out pairs as scored apart (a loss that needs no reference scores them alone,
    :func:`scored_heldout_only`), kept instead of ``scored``'s."""
    train, heldout = split_heldout(scored, cfg)
    if heldout is None:
        return ScoredPairs(shuffled(train, cfg), num_scored, None, source)
    if scored_heldout is None:
        scored_heldout = kept_heldout(heldout, cfg, num_scored)
    return ScoredPairs(shuffled(train, cfg), train.count(), scored_heldout, source)


def kept_in_storage(scored: Dataset, where: Location, num_cpus: float) -> Dataset:
    """``scored`` written as Parquet to ``where`` (the run's storage) and read back lazily from there."""
    scored.write_parquet(where.path, filesystem=where.fs, ray_remote_args={"num_cpus": num_cpus})
    from ray.data import DataContext

    # Ray Data's newer Parquet reader lists the files in a task of one whole CPU, which it cannot get while
    # Ray Train's workers hold a node's CPUs: a run sized to its cluster would wait forever each time training
    # starts or restarts after a lost node. The older reader lists on the driver.
    context = DataContext.get_current()
    newer, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(where.path, filesystem=where.fs, num_cpus=num_cpus)
    finally:
        context.use_datasource_v2 = newer


def kept_heldout(heldout: Dataset | None, cfg: RunConfig, num_pairs: int) -> Dataset | None:
    """The held-out split in the object store (every evaluation re-reads it); an empty one is refused in one
    line, since a metric over no pair would be written as if measured."""
    if heldout is None:
        return None
    heldout = heldout.materialize()
    if heldout.count() == 0:
        raise ConfigError(
            f"data.eval_fraction={cfg.data.eval_fraction} selects none of the {num_pairs} usable pairs "
            "for the held-out split: raise it, or set it to 0 to train without one"
        )
    return heldout
