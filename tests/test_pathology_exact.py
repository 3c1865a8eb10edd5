"""The exact two-response pathology: numerical optima of the platform losses vs closed forms."""

import math

import pytest
import torch

from rayalign.config import LossConfig
from rayalign.diagnostics.pathology import (
    closed_form_dpo,
    format_table,
    population_loss,
    smallest_gamma,
    two_response_optimum,
    two_response_table,
)

R, Q = 0.1, 0.7
DELTA_REF = math.log(R / (1 - R))


def cfg(type_: str, **kw) -> LossConfig:
    return LossConfig(type=type_, beta=1.0, **kw)


@pytest.fixture(scope="module")
def cpo_gamma_min() -> float:
    gamma = smallest_gamma(cfg("cpo"), R, Q)
    assert gamma is not None
    return gamma


def test_dpo_matches_closed_form():
    got, want = two_response_optimum(cfg("dpo"), R, Q), closed_form_dpo(1.0, R, Q)
    for key in ("delta", "pi_chosen", "population_loss"):
        assert got[key] == pytest.approx(want[key], abs=1e-3)
    assert got["delta"] == pytest.approx(want["delta"], abs=1e-6)
    assert (got["delta"], got["pi_chosen"], got["population_loss"]) == pytest.approx((-1.350, 0.206, 0.611), abs=1e-3)
    assert got["delta_ref"] == pytest.approx(DELTA_REF)


def test_dpo_prefers_rejected_although_labels_prefer_chosen():
    assert Q > 0.5 and two_response_optimum(cfg("dpo"), R, Q)["delta"] < 0


@pytest.mark.parametrize("beta", [0.1, 0.5, 3.0])
def test_dpo_closed_form_other_betas(beta):
    got = two_response_optimum(LossConfig(type="dpo", beta=beta), R, Q)
    assert got["delta"] == pytest.approx(closed_form_dpo(beta, R, Q)["delta"], abs=1e-6)


@pytest.mark.parametrize(
    "loss,want",
    [("ipo", DELTA_REF + (2 * Q - 1) / 2), ("hinge", DELTA_REF + 1.0)],  # β = 1
)
def test_ipo_and_hinge_closed_forms(loss, want):
    # IPO: q(h − ½) + (1−q)(h + ½) = 0 → h = (2q−1)/2; hinge: the kink at h = 1.
    assert two_response_optimum(cfg(loss), R, Q)["delta"] == pytest.approx(want, abs=1e-6)


def test_flat_hinge_minimum_picks_point_nearest_reference():
    # At q = ½ the hinge loss is constant for |h| ≤ 1; δ_ref itself is a minimiser.
    assert two_response_optimum(cfg("hinge"), R, 0.5)["delta"] == pytest.approx(DELTA_REF)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "cpo", "cpo_clip"])
def test_optimum_beats_a_dense_grid(loss):
    c = cfg(loss)
    opt = two_response_optimum(c, R, Q)
    grid = torch.linspace(-30, 30, 60_001, dtype=torch.float64)
    assert opt["population_loss"] <= population_loss(c, grid, R, Q).min().item() + 1e-9


def test_cpo_gamma_threshold(cpo_gamma_min):
    def delta(gamma: float) -> float:
        return two_response_optimum(cfg("cpo", gamma=gamma), R, Q)["delta"]

    assert delta(cpo_gamma_min + 1.0) > 0
    assert delta(cpo_gamma_min) > 0
    assert abs(delta(cpo_gamma_min)) < 1e-3  # δ*(γ) crosses 0 right there
    assert delta(cpo_gamma_min - 1e-3) <= 0


def test_sharp_cpo_threshold_matches_hard_constraint():
    # τ → ∞ with δ_ref < γ < −δ_ref: the constraint acts on the agreeing label only,
    # L = −q log σ(β(δ − γ)) − (1−q) log σ(−β(δ − δ_ref)), and δ* = 0 when
    # q σ(βγ) = (1−q)(1−r).
    p = (1 - Q) * (1 - R) / Q
    want = math.log(p / (1 - p))
    assert smallest_gamma(cfg("cpo", tau=50.0), R, Q) == pytest.approx(want, abs=2e-4)


def test_cpo_with_very_negative_gamma_is_dpo():
    got = two_response_optimum(cfg("cpo", gamma=-50.0), R, Q)
    assert got["delta"] == pytest.approx(closed_form_dpo(1.0, R, Q)["delta"], abs=1e-6)
    assert got["population_loss"] == pytest.approx(closed_form_dpo(1.0, R, Q)["population_loss"], abs=1e-9)


def test_smallest_gamma_edge_cases():
    assert smallest_gamma(cfg("cpo"), R, Q, lo=-10, hi=-5) is None
    with pytest.raises(ValueError):
        smallest_gamma(cfg("dpo"), R, Q)
    with pytest.raises(ValueError):  # DPO at β = 0.1 already prefers y_w, so δ* > 0 at lo
        smallest_gamma(LossConfig(type="cpo", beta=0.1), R, Q)


def test_table_has_a_row_per_variant():
    rows = two_response_table()
    assert [r["loss_type"] for r in rows] == ["dpo", "ipo", "hinge", "cpo", "cpo", "cpo_clip"]
    assert [r["prefers_chosen"] for r in rows] == [False, False, False, True, True, True]
    assert all((r["smallest_gamma"] is None) == (r["loss_type"] != "cpo") for r in rows)
    text = format_table(rows)
    assert text.count("\n") == len(rows) + 1 and "| dpo | β=1 | -1.3499 |" in text
