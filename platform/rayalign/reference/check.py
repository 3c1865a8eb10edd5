"""Reference fidelity check: vLLM log-probs against the training engine's own forward pass.

vLLM and the training model can disagree on log-probs (precision, batch
composition, kernels). DPO sums per-token log-probs, so a per-token bias grows
with response length and shifts δ_ref. ``rayalign refcheck`` scores a sample of
pairs both ways, from the same weights and the same token ids, and reports:

    per sequence:  max |Δ| and mean |Δ| over response tokens, Δ of the summed log-prob
    per pair:      Δ δ_ref = δ_ref(vLLM) − δ_ref(training forward)

It fails (non-zero exit) when the largest per-token |Δ| exceeds the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rayalign.config import RunConfig
from rayalign.data.records import prepare_pairs
from rayalign.models import ModelSource
from rayalign.reference.actors import add_reference_logps
from rayalign.schema import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, ROW, SOURCE, TOKEN_LOGPS_COLUMNS
from rayalign.storage import write_local


def _by_pair(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r[SOURCE], int(r[ROW])): r for r in rows}


def compare(vllm_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Per-token and per-pair differences between two scorings of the same pairs."""
    vllm_by, train_by = _by_pair(vllm_rows), _by_pair(train_rows)
    if vllm_by.keys() != train_by.keys():
        raise ValueError("the two scorings cover different pairs")
    sequences, pair_deltas = [], []
    for key in sorted(vllm_by):
        v, t = vllm_by[key], train_by[key]
        for side, column in zip(("chosen", "rejected"), TOKEN_LOGPS_COLUMNS):
            a, b = np.asarray(v[column]), np.asarray(t[column])
            if a.shape != b.shape:
                raise ValueError(f"{key} {side}: {a.shape[0]} vs {b.shape[0]} scored tokens (misaligned masks)")
            diff = np.abs(a - b)
            sequences.append(
                {
                    SOURCE: key[0],
                    ROW: key[1],
                    "side": side,
                    "tokens": int(a.shape[0]),
                    "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                    "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                    "sum_diff": float(a.sum() - b.sum()),
                }
            )
        delta_v = v[REF_CHOSEN_LOGPS] - v[REF_REJECTED_LOGPS]
        delta_t = t[REF_CHOSEN_LOGPS] - t[REF_REJECTED_LOGPS]
        pair_deltas.append(float(delta_v - delta_t))
    max_abs = max(s["max_abs_diff"] for s in sequences)
    return {
        "pairs": len(pair_deltas),
        "sequences": len(sequences),
        "tokens": sum(s["tokens"] for s in sequences),
        "max_abs_diff_per_token": max_abs,
        "mean_abs_diff_per_token": float(np.mean([s["mean_abs_diff"] for s in sequences])),
        "max_abs_sum_diff": max(abs(s["sum_diff"]) for s in sequences),
        "delta_ref_max_abs_diff": float(np.max(np.abs(pair_deltas))),
        "delta_ref_mean_abs_diff": float(np.mean(np.abs(pair_deltas))),
        "tolerance": tolerance,
        "passed": max_abs <= tolerance,
        "per_sequence": sequences,
    }


def run_refcheck(cfg: RunConfig, model: ModelSource, paths: list[str], num_pairs: int, out_dir: Path) -> dict[str, Any]:
    """Score ``num_pairs`` pairs with vLLM and with the training forward; write refcheck.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs, _, _ = prepare_pairs(cfg, paths, model, out_dir)
    sample = pairs.limit(num_pairs).materialize()
    vllm_rows = add_reference_logps(sample, cfg, model, backend="vllm", per_token=True).take_all()
    train_rows = add_reference_logps(sample, cfg, model, backend="transformers", per_token=True).take_all()
    report = compare(vllm_rows, train_rows, cfg.reference.refcheck_tolerance)
    report["vllm_dtype"], report["training_dtype"] = cfg.reference.vllm.dtype, cfg.model.dtype
    write_local(out_dir / "refcheck.json", json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any]) -> str:
    verdict = "PASS" if report["passed"] else "FAIL"
    return (
        f"refcheck {verdict}: {report['pairs']} pairs, {report['tokens']} response tokens "
        f"(vLLM {report['vllm_dtype']} vs training forward {report['training_dtype']})\n"
        f"  per-token |Δ log-prob|: max {report['max_abs_diff_per_token']:.3g}, "
        f"mean {report['mean_abs_diff_per_token']:.3g} (tolerance {report['tolerance']:.3g})\n"
        f"  per-sequence |Δ Σ log-prob|: max {report['max_abs_sum_diff']:.3g}\n"
        f"  δ_ref |Δ|: max {report['delta_ref_max_abs_diff']:.3g}, mean {report['delta_ref_mean_abs_diff']:.3g}"
    )
