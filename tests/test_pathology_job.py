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
    dpo = next(r for r in rows if r["loss_type"] == "dpo")
    assert dpo["delta"] == pytest.approx(-1.350, abs=1e-3) and not dpo["prefers_chosen"]
    assert any(r["loss_type"] == "cpo" and r["prefers_chosen"] for r in rows)
    assert table.startswith("| loss |")


@pytest.mark.timeout(900)
def test_part_b_reduced_with_the_alarm_acting(ray_cluster, tmp_path, monkeypatch):
    """One seed, the full job's three epochs: DPO that switches to CPO when the alarm fires, and DPO that stops
    there. Until the alarm both are plain DPO (the full job's table has DPO alone over 3 seeds). With two epochs
    the switched run ended at 30 or 31 of 61 held-out pairs right, depending on the data order: on the line."""
    job = load_job(monkeypatch)
    result = job.part_b(
        seeds=[0], epochs=3, bias_steps=200, overrides=[f"output.root={tmp_path}"], variants=("switch", "stop")
    )
    (switch,), (stop,) = (result["runs"][name] for name in ("switch", "stop"))
    rows = {
        name: [json.loads(line) for line in (tmp_path / f"{name}-seed0" / "metrics.jsonl").read_text().splitlines()]
        for name in ("switch", "stop")
    }
    # At step 1 the policy is the reference, which prefers the wrong answer: it "agrees" only with the ~20% of
    # pairs whose labels were flipped.
    assert rows["switch"][0]["pref/absolute_accuracy"] < 0.45
    # DPO prefers the wrong answer on most held-out pairs when the alarm fires; switched to CPO there, the same
    # run ends preferring the right one.
    switched = json.loads((tmp_path / "switch-seed0" / "summary.json").read_text())
    ((step, action),) = [(a["step"], a["action"]) for a in switched["actions"]]
    at_alarm = next(r for r in rows["switch"] if r["step"] == step)
    assert action.startswith("switched to cpo") and switched["complete"]
    assert at_alarm["eval/pref/absolute_accuracy"] < 0.3 and switch["eval_abs_acc"] > 0.5
    # Stopped at the alarm: the exported model is the best held-out one seen before it.
    stopped = json.loads((tmp_path / "stop-seed0" / "summary.json").read_text())
    (action,) = stopped["actions"]
    assert stopped["stopped_on_alarm"] and stopped["steps"] == action["step"] < stopped["planned_steps"]
    before = [r["eval/pref/absolute_accuracy"] for r in rows["stop"] if "eval/loss" in r and r["step"] < action["step"]]
    exported = stopped["exported"]
    assert exported["model"] == "best" and exported["value"] == max(before) and exported["step"] < action["step"]
    assert stop["exported_abs_acc"] == max(before)
    assert (tmp_path / "stop-seed0" / "model" / "model.safetensors").is_file()
    # Once each run ended, its exported model and the reference answered the held-out prompts (greedy, checked).
    generation = switched["generation"]
    assert generation["scorer"] == "arithmetic"
    assert generation["eval/gen/prompts"] == switched["reference"]["heldout_pairs"]
    assert 0 <= generation["eval/gen/reference_score"] <= 1 and generation["eval/gen/unscored_responses"] == 0
    assert switch["gen_correct"] == generation["eval/gen/score"]
    # Switched to CPO, the policy writes correct sums where the biased reference writes none (0.25 vs 0.0 here).
    assert generation["eval/gen/score"] > generation["eval/gen/reference_score"] and generation["eval/gen/win"] > 0
    assert (tmp_path / "switch-seed0" / "evaluate" / "generations.jsonl").is_file()
    table = job.format_part_b(result)
    assert "| switch |" in table and "| reference (biased) |" in table
