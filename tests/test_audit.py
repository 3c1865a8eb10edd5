"""Audit numbers on data whose answers are known by construction."""

from __future__ import annotations

import json

from conftest import make_config

from rayalign.diagnostics.audit import audit_scored_pairs, format_audit, run_audit
from rayalign.models import publish_model, resolve_run_model


def scored_row(prompt, chosen, rejected, ref_c, ref_r):
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
        "chosen_tokens": len(chosen),
        "rejected_tokens": len(rejected),
    }


def test_reference_and_length_statistics_by_construction():
    rows = [
        scored_row([1, 2], [5, 6, 7], [8], -3.0, -1.0),  # δ_ref = -2.0 (prefers rejected, beyond margin 1)
        scored_row([1, 3], [5], [8, 9], -1.0, -1.5),  # δ_ref = +0.5
        scored_row([1, 4], [5, 6], [8, 9, 10], -2.0, -1.5),  # δ_ref = -0.5 (prefers rejected, within margin)
        scored_row([1, 4], [5, 6], [8, 9, 10], -2.0, -1.5),  # exact duplicate of the row above
    ]
    report = audit_scored_pairs(rows, margin=1.0)
    ref, data = report["reference"], report["data"]
    assert ref["frac_prefers_rejected"] == 0.75
    assert ref["frac_prefers_rejected_by_margin"] == 0.25
    assert ref["delta_ref"]["min"] == -2.0 and ref["delta_ref"]["max"] == 0.5
    assert ref["delta_ref"]["median"] == -0.5
    # per token: -3/3 - -1/1 = 0; -1/1 - -1.5/2 = -0.25; -2/2 - -1.5/3 = -0.5
    assert ref["frac_prefers_rejected_per_token"] == 0.75
    assert data["exact_duplicates"] == 1 and data["near_duplicates"] >= 1
    assert data["chosen_longer_fraction"] == 0.25 and data["rejected_longer_fraction"] == 0.75
    assert data["lengths"]["prompt"]["mean"] == 2.0
    assert sum(ref["histogram"]["counts"]) == 4


def test_audit_end_to_end_on_a_constructed_file(ray_cluster, tmp_path):
    records = [{"prompt": f"Q: {i}?", "chosen": " yes" * (1 + i % 2), "rejected": " no"} for i in range(9)]
    records += [records[0], records[0]]  # two exact duplicates
    lines = [json.dumps(r) for r in records] + ["{not json"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = make_config(
        tmp_path, data={"paths": [str(path)], "synthetic": None, "max_quarantine_fraction": 0.2}, audit={"margin": 2.0}
    )
    out = tmp_path / "audit"
    report = run_audit(cfg, publish_model(resolve_run_model(cfg), None), [str(path)], out)
    assert report["pairs"] == 11
    assert report["data"]["quarantine"]["quarantined_by_reason"] == {"bad_json": 1}
    assert report["data"]["exact_duplicates"] == 2
    # " yes" (4 bytes) or " yes yes" vs " no" (3 bytes), +EOS: chosen is always longer.
    assert report["data"]["chosen_longer_fraction"] == 1.0
    ref = report["reference"]
    assert 0.0 <= ref["frac_prefers_rejected_by_margin"] <= ref["frac_prefers_rejected"] <= 1.0
    assert json.loads((out / "audit.json").read_text())["pairs"] == 11
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prefers the REJECTED response" in format_audit(report)
