"""The training loop's helpers, one at a time: planned steps, the LR schedule, collation, the
held-out split and scoring a batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_config

from rayalign.config import LossConfig, TrainConfig
from rayalign.errors import DataQualityError
from rayalign.losses import PairLogps, objective
from rayalign.train.step import PreferenceStep
from rayalign.train.steps import StepPlan, step_plan
from rayalign.train.worker import lr_schedule


def test_planned_steps_split_the_pairs_across_workers_and_accumulation():
    train = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, epochs=3)
    # 50 pairs over 2 workers: 25 each -> 7 micro-batches (the last one short) -> 3 steps per epoch
    assert step_plan(train, num_workers=2, num_pairs=50) == StepPlan(total=9, per_epoch=3)
    assert step_plan(train.model_copy(update={"max_steps": 5}), num_workers=2, num_pairs=50) == StepPlan(5, 3)
    with pytest.raises(DataQualityError, match="7 usable pairs are not enough for one optimizer step"):
        step_plan(train, num_workers=2, num_pairs=7)


def test_lr_schedule_warms_up_then_decays():
    warm = TrainConfig(warmup_steps=3, scheduler="linear")
    factor = lr_schedule(warm, total_steps=13)
    assert [factor(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert factor(3) == 1.0 and factor(8) == pytest.approx(0.5) and factor(13) == 0.0
    cosine = lr_schedule(TrainConfig(scheduler="cosine"), total_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert lr_schedule(TrainConfig(), total_steps=10)(7) == 1.0


@pytest.mark.e2e
def test_heldout_split_is_stable_disjoint_and_keyed_by_file_name(ray_cluster, tmp_path):
    import ray

    from rayalign.data.records import split_heldout

    cfg = make_config(tmp_path, data={"eval_fraction": 0.25})
    rows = lambda folder: [{"source": f"{folder}/pairs.jsonl", "row": i} for i in range(200)]  # noqa: E731
    keys = lambda ds: sorted(r["row"] for r in ds.take_all())  # noqa: E731
    train, heldout = split_heldout(ray.data.from_items(rows("/a")), cfg)
    train_rows, heldout_rows = keys(train), keys(heldout)
    assert set(train_rows).isdisjoint(heldout_rows) and len(train_rows) + len(heldout_rows) == 200
    assert 25 <= len(heldout_rows) <= 75
    # Same file name in another directory (a sweep trial vs. the retrained best config): same split.
    assert keys(split_heldout(ray.data.from_items(rows("/elsewhere")), cfg)[1]) == heldout_rows
    assert split_heldout(ray.data.from_items(rows("/a")), make_config(tmp_path))[1] is None


def test_scoring_a_batch_applies_the_objective_to_policy_and_reference_log_probs(tiny_model_dir):
    from rayalign.logprobs import PolicyLogps, sequence_logps, split_pairs
    from rayalign.models import load_causal_lm
    from rayalign.packing import pack_pairs

    model = load_causal_lm(tiny_model_dir).eval()
    batch = {
        "prompt_ids": np.array([[1, 40, 41], [1, 42]], dtype=object),
        "chosen_ids": np.array([[50, 51], [52]], dtype=object),
        "rejected_ids": np.array([[60], [61, 62, 63]], dtype=object),
        "ref_chosen_logps": np.array([-9.0, -4.0]),
        "ref_rejected_logps": np.array([-3.0, -12.0]),
    }
    loss_cfg = LossConfig(type="cpo", beta=0.5, gamma=1.0, nll_weight=0.2)
    with torch.no_grad():
        scored = PreferenceStep(loss_cfg, TrainConfig(), pad_id=0, device=torch.device("cpu")).score(
            PolicyLogps(model), batch
        )
        terms, tokens = scored.terms, scored.real_tokens
        logps, counts = sequence_logps(model, pack_pairs(batch, "padded", pad_id=0))
    assert tokens == (3 + 2 + 1) + (2 + 1 + 3)  # the default shared-prompt layout computes each prompt once
    (pc, pr), (nc, nr) = split_pairs(logps), split_pairs(counts)
    assert nc.tolist() == [2, 1] and nr.tolist() == [1, 3]
    expected = objective(loss_cfg, PairLogps(pc, pr, torch.tensor([-9.0, -4.0]), torch.tensor([-3.0, -12.0]), nc, nr))
    assert torch.allclose(terms.loss, expected.loss, atol=1e-5) and all(math.isfinite(v) for v in terms.loss.tolist())
    assert terms.compared[2].tolist() == [-9.0, -4.0]  # the reference column as given, cast to float32


def test_the_final_checkpoint_is_the_kept_one_of_the_latest_step_whatever_registered_last(tmp_path):
    """After a lost node, a report of the failed worker group (an earlier step) can be registered after the restarted
    group's last checkpoint: the run reads back the latest step's, not the last registered."""
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from rayalign.train.stage import last_step_checkpoint

    at = {step: Checkpoint.from_directory(str(tmp_path / str(step))) for step in (7, 12)}
    result = SimpleNamespace(checkpoint=at[7], best_checkpoints=[(at[12], {"step": 12}), (at[7], {"step": 7})])
    assert last_step_checkpoint(result) is at[12]
    assert last_step_checkpoint(SimpleNamespace(checkpoint=None, best_checkpoints=None)) is None
