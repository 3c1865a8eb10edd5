"""jobs/pathology.py in reduced form: part (a) fully, part (b) with one seed and one epoch."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def load_job(monkeypatch):
    # `python jobs/pathology.py` puts its own folder on sys.path (for jobs/biased_reference.py).
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("pathology_job", REPO / "jobs" / "pathology.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_part_a_table(monkeypatch):
    rows, table = load_job(monkeypatch).part_a()
    dpo = next(r for r in rows if r["loss"] == "dpo")
    assert dpo["delta"] == pytest.approx(-1.350, abs=1e-3) and not dpo["prefers_chosen"]
    assert any(r["loss"] == "cpo" and r["prefers_chosen"] for r in rows)
    assert table.startswith("| loss |")


@pytest.mark.timeout(900)
def test_part_b_reduced(ray_cluster, tmp_path, monkeypatch):
    job = load_job(monkeypatch)
    result = job.part_b(seeds=[0], epochs=1, bias_steps=200, overrides=[f"output.root={tmp_path}"])
    dpo, cpo = result["runs"]["dpo"][0], result["runs"]["cpo"][0]
    for loss in ("dpo", "cpo"):
        first = json.loads((tmp_path / f"{loss}-seed0" / "metrics.jsonl").read_text().splitlines()[0])
        # At step 1 the policy is the reference, which prefers the wrong answer: it "agrees" only with
        # the ~20% of pairs whose labels were flipped.
        assert first["pref/absolute_accuracy"] < 0.45
    # On the held-out split after one epoch, DPO still prefers the wrong answers on most pairs and CPO
    # does better on both counts. (DPO's loss falling over a full run is shown by the full job's table.)
    assert dpo["eval_abs_acc"] < 0.5
    assert cpo["eval_abs_acc"] > dpo["eval_abs_acc"] and cpo["eval_frac_in_U"] < dpo["eval_frac_in_U"]
    assert (tmp_path / "dpo-vs-cpo.png").is_file()
    assert "| dpo |" in job.format_part_b(result)
