"""Audit before training: where is DPO's implicit assumption at risk, and is the data sound?

DPO matches RLHF only when the RLHF-optimal policy prefers the chosen response,
δ* = δ_ref + Δr/β > 0. Pairs whose reference already prefers the rejected
response (δ_ref < 0), especially by more than a margin, are where DPO can
converge while still preferring y_l. The audit reports, from one reference pass:

reference   δ_ref (summed and per token): quantiles and histogram; the fraction with
            δ_ref < 0 and with δ_ref < −margin
data        counts by quarantine reason; exact and near duplicates; identical responses;
            prompt/response length statistics and histograms; length bias (how often
            chosen is the longer response)

Outputs ``audit.json`` and ``audit.png`` in ``<run_dir>/audit/`` and a terminal summary.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.config import RunConfig
from rayalign.data.records import prepare_pairs
from rayalign.models import ModelSource
from rayalign.reference.actors import add_reference_logps
from rayalign.reference.store import scored_through_store
from rayalign.schema import (
    CHOSEN_IDS,
    CHOSEN_TOKENS,
    PROMPT_IDS,
    REF_CHOSEN_LOGPS,
    REF_REJECTED_LOGPS,
    REJECTED_IDS,
    REJECTED_TOKENS,
    SCORED_COLUMNS,
)
from rayalign.storage import replaced_whole, write_local


def _digest(ids) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _near_key(ids, bins: int = 8) -> tuple:
    """A coarse shingle signature: pairs that differ only in a few tokens usually share it."""
    ids = [int(t) for t in ids]
    shingles = {hash(tuple(ids[i : i + 3])) for i in range(max(1, len(ids) - 2))}
    return tuple(sorted(shingles))[:bins]


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    qs = np.quantile(values, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return dict(zip(["min", "p05", "p25", "median", "p75", "p95", "max"], map(float, qs))) | {
        "mean": float(values.mean())
    }


def _histogram(values: np.ndarray, bins: int = 30) -> dict[str, list[float]]:
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def audit_scored_pairs(rows: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """Pure statistics over reference-scored pairs (``rayalign.schema.SCORED_COLUMNS``)."""
    n = len(rows)
    delta = np.array([r[REF_CHOSEN_LOGPS] - r[REF_REJECTED_LOGPS] for r in rows], dtype=np.float64)
    chosen_len = np.array([int(r[CHOSEN_TOKENS]) for r in rows])
    rejected_len = np.array([int(r[REJECTED_TOKENS]) for r in rows])
    per_token = np.array(
        [
            r[REF_CHOSEN_LOGPS] / max(c, 1) - r[REF_REJECTED_LOGPS] / max(j, 1)
            for r, c, j in zip(rows, chosen_len, rejected_len)
        ]
    )
    prompt_len = np.array([len(r[PROMPT_IDS]) for r in rows])

    exact = Counter(_digest([*r[PROMPT_IDS], -1, *r[CHOSEN_IDS], -2, *r[REJECTED_IDS]]) for r in rows)
    near = Counter(_near_key([*r[PROMPT_IDS], *r[CHOSEN_IDS]]) for r in rows)
    identical = sum(list(r[CHOSEN_IDS]) == list(r[REJECTED_IDS]) for r in rows)
    return {
        "pairs": n,
        "reference": {
            "delta_ref": _quantiles(delta),
            "delta_ref_per_token": _quantiles(per_token),
            "frac_prefers_rejected": float(np.mean(delta < 0)) if n else 0.0,
            "margin": margin,
            "frac_prefers_rejected_by_margin": float(np.mean(delta < -margin)) if n else 0.0,
            "frac_prefers_rejected_per_token": float(np.mean(per_token < 0)) if n else 0.0,
            "histogram": _histogram(delta),
        },
        "data": {
            "exact_duplicates": int(sum(c - 1 for c in exact.values() if c > 1)),
            # Near duplicates include the exact ones.
            "near_duplicates": int(sum(c - 1 for c in near.values() if c > 1)),
            "identical_responses": int(identical),
            "chosen_longer_fraction": float(np.mean(chosen_len > rejected_len)) if n else 0.0,
            "rejected_longer_fraction": float(np.mean(chosen_len < rejected_len)) if n else 0.0,
            "lengths": {
                "prompt": _quantiles(prompt_len.astype(float)),
                "chosen": _quantiles(chosen_len.astype(float)),
                "rejected": _quantiles(rejected_len.astype(float)),
            },
            "histograms": {
                "prompt": _histogram(prompt_len),
                "response": _histogram(np.concatenate([chosen_len, rejected_len])),
            },
        },
    }


def plot_audit(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, data = report["reference"], report["data"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    hist = ref["histogram"]
    edges = np.array(hist["edges"])
    axes[0].bar(
        edges[:-1],
        hist["counts"],
        width=np.diff(edges),
        align="edge",
        color=["tab:red" if e < 0 else "tab:blue" for e in edges[:-1]],
    )
    axes[0].axvline(0, color="k", lw=1)
    axes[0].axvline(-ref["margin"], color="tab:red", ls="--", lw=1, label=f"−margin ({ref['margin']})")
    axes[0].set_title(
        f"δ_ref = log π_ref(y_w) − log π_ref(y_l)\n{ref['frac_prefers_rejected']:.1%} prefer rejected, "
        f"{ref['frac_prefers_rejected_by_margin']:.1%} by > margin"
    )
    axes[0].set_xlabel("δ_ref (nats)")
    axes[0].legend()
    for key, ax, title in (("prompt", axes[1], "prompt length"), ("response", axes[2], "response length")):
        h = data["histograms"][key]
        e = np.array(h["edges"])
        ax.bar(e[:-1], h["counts"], width=np.diff(e), align="edge", color="tab:gray")
        ax.set_title(title + " (tokens)")
        ax.set_xlabel("tokens")
    axes[2].set_title(f"response length (tokens)\nchosen longer in {data['chosen_longer_fraction']:.1%} of pairs")
    fig.tight_layout()
    with replaced_whole(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def run_audit(cfg: RunConfig, model: ModelSource, paths: list[str], out_dir: Path) -> dict[str, Any]:
    """Validate, tokenize and score every pair with the reference; write audit.json and audit.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs, data_report, _ = prepare_pairs(cfg, paths, model, out_dir)
    store = None
    if cfg.reference.cache:  # read what an earlier run or audit scored, add what it did not
        scored, store = scored_through_store(pairs, cfg, model)
    else:
        scored = add_reference_logps(pairs, cfg, model)
    scored = scored.select_columns(list(SCORED_COLUMNS))
    # Only compact per-pair ids and scores reach the driver, never model state.
    report = audit_scored_pairs(scored.take_all(), cfg.audit.margin)
    report["data"]["quarantine"] = data_report.as_dict()
    report["reference_store"] = store.as_dict() if store else None
    report["model_dir"], report["sources"] = str(model.stored or model.driver_dir), paths
    write_local(out_dir / "audit.json", json.dumps(report, indent=2))
    plot_audit(report, out_dir / "audit.png")
    return report


def format_audit(report: dict[str, Any]) -> str:
    ref, data = report["reference"], report["data"]
    d, q = ref["delta_ref"], data["quarantine"]
    reasons = ", ".join(f"{k}={v}" for k, v in q["quarantined_by_reason"].items()) or "none"
    return "\n".join(
        [
            f"audit: {report['pairs']} scored pairs ({q['total']} records, {q['quarantined']} quarantined: {reasons})",
            f"  reference prefers the REJECTED response in {ref['frac_prefers_rejected']:.1%} of pairs "
            f"({ref['frac_prefers_rejected_by_margin']:.1%} by more than {ref['margin']} nats; "
            f"{ref['frac_prefers_rejected_per_token']:.1%} per token)",
            f"  δ_ref median {d.get('median', float('nan')):.3f}, p05 {d.get('p05', float('nan')):.3f}, "
            f"p95 {d.get('p95', float('nan')):.3f}",
            f"  duplicates: {data['exact_duplicates']} exact, {data['near_duplicates']} near; "
            f"identical responses: {data['identical_responses']}",
            f"  length bias: chosen longer in {data['chosen_longer_fraction']:.1%} of pairs "
            f"(rejected longer in {data['rejected_longer_fraction']:.1%})",
        ]
    )
