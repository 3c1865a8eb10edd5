"""The reference stage: score the prepared pairs with the frozen reference, hand training a typed value.

With ``reference.cache`` the reference runs once into Parquet (or is read from an earlier run,
:mod:`rayalign.reference.cache`); otherwise the reference actors (:mod:`rayalign.reference.actors`)
stream straight into training. Either way training gets :class:`ScoredPairs`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from ray.data import Dataset

from rayalign.config import RunConfig
from rayalign.data.records import shuffled, split_heldout
from rayalign.data.stage import PreparedData
from rayalign.reference.actors import add_reference_logps
from rayalign.reference.cache import CacheInfo, describe, scored_pairs_cached

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSource:
    """How the reference log-probs were obtained (``summary.json``'s ``reference``)."""

    backend: str
    cache: dict[str, Any] | None = None  # the cache entry (key, path, hit), when scored through it
    scored_by_sweep_driver: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoredPairs:
    """What the reference stage hands to training (with ``reference.in_worker``, the pairs unscored)."""

    train: Dataset  # reference-scored training pairs, shuffled
    num_train: int
    heldout: Dataset | None  # scored held-out pairs, in the object store (every evaluation re-reads them)
    source: ReferenceSource


def score_into_cache(cfg: RunConfig, data: PreparedData) -> tuple[Dataset, CacheInfo]:
    """Every pair of ``data`` scored once into the reference cache (whatever ``reference.cache`` says)."""
    cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"cache": True})})
    return scored_pairs_cached(data.pairs, cfg, data.model, data.inputs)


def score_reference(cfg: RunConfig, data: PreparedData) -> ScoredPairs:
    """Reference-score ``data``'s pairs and split off the held-out pairs.

    The small held-out split is scored once and kept in the object store, since every evaluation
    re-reads it.
    """
    if cfg.reference.in_worker:  # the training workers add it, each step, with the adapters off
        train, heldout = split_heldout(data.pairs, cfg)
        num_train = train.count() if heldout is not None else data.report.ok
        return ScoredPairs(shuffled(train, cfg), num_train, heldout.materialize() if heldout is not None else None,
                           ReferenceSource(cfg.reference.backend))
    if cfg.reference.cache:
        scored, info = score_into_cache(cfg, data)
        log.info("reference cache %s: %s", "hit" if info.hit else "miss", info.path)
        return split_scored(cfg, scored, ReferenceSource(cfg.reference.backend, describe(info)), data.report.ok)

    train, heldout = split_heldout(data.pairs, cfg)
    if heldout is not None:
        heldout = add_reference_logps(heldout, cfg, data.model).materialize()
    num_train = train.count() if heldout is not None else data.report.ok
    train = add_reference_logps(shuffled(train, cfg), cfg, data.model)
    if cfg.train.epochs > 1:
        # Streaming would re-score the reference every epoch; keep one scored copy in the object store.
        train = train.materialize()
    return ScoredPairs(train, num_train, heldout, ReferenceSource(cfg.reference.backend))


def split_scored(cfg: RunConfig, scored: Dataset, source: ReferenceSource, num_scored: int) -> ScoredPairs:
    """Already-scored pairs (``num_scored`` of them) -> shuffled training split and held-out split."""
    train, heldout = split_heldout(scored, cfg)
    if heldout is None:
        return ScoredPairs(shuffled(train, cfg), num_scored, None, source)
    return ScoredPairs(shuffled(train, cfg), train.count(), heldout.materialize(), source)
