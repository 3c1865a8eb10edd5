"""DPO's pathological convergence, solved exactly for one prompt with two responses.

The policy over {y_w, y_l} has a single parameter

    δ = log π(y_w) − log π(y_l),      π(y_w) = σ(δ),

and the reference has π_ref(y_w) = r, so δ_ref = logit(r). Labellers prefer
y_w with probability q, so the population loss of a preference loss ℓ is

    L(δ) = q · ℓ(y_w ≻ y_l) + (1 − q) · ℓ(y_l ≻ y_w).

For DPO, L = −q log σ(βh) − (1−q) log σ(−βh) with h = δ − δ_ref, minimised at
σ(βh) = q:

    δ* = δ_ref + logit(q)/β,      L(δ*) = H(q) = −q log q − (1−q) log(1−q).

With r = 0.1, q = 0.7, β = 1 this gives δ* ≈ −1.350 and π(y_w) ≈ 0.206: DPO
settles on a policy that prefers y_l although 70% of labels prefer y_w. The
functions here minimise L numerically through :func:`rayalign.losses.objective`,
so they exercise the platform's own loss code, and compare the variants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rayalign.config import LossConfig
from rayalign.losses import PairLogps, objective

BOUND = 30.0  # search δ in [−BOUND, BOUND]; σ(±30) is 1 to within 1e-13
DELTA_TOL = 1e-7  # bracket width for δ, well inside the 1e-6 we promise


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def population_loss(cfg: LossConfig, delta: Tensor, ref_prob_chosen: float = 0.1, label_prob: float = 0.7) -> Tensor:
    """L(δ) = q·ℓ(y_w ≻ y_l) + (1−q)·ℓ(y_l ≻ y_w), elementwise over ``delta``.

    Log-probs: log π(y_w) = log σ(δ), log π(y_l) = log σ(−δ),
    log π_ref(y_w) = log r, log π_ref(y_l) = log(1−r); the flipped label swaps roles.
    """
    log_w, log_l = F.logsigmoid(delta), F.logsigmoid(-delta)
    ref_w = torch.full_like(delta, math.log(ref_prob_chosen))
    ref_l = torch.full_like(delta, math.log1p(-ref_prob_chosen))
    one_token = torch.ones_like(delta)  # each response is a single outcome
    agree = objective(cfg, PairLogps(log_w, log_l, ref_w, ref_l, one_token, one_token)).loss
    flipped = objective(cfg, PairLogps(log_l, log_w, ref_l, ref_w, one_token, one_token)).loss
    return label_prob * agree + (1 - label_prob) * flipped


def _slope(cfg: LossConfig, delta: float, ref_prob_chosen: float, label_prob: float) -> float:
    """dL/dδ by autograd (torch's subgradient at kinks, e.g. relu'(0) = 0)."""
    d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(population_loss(cfg, d, ref_prob_chosen, label_prob), d)
    return grad.item()


def _bisect(past: Callable[[float], bool], lo: float, hi: float, tol: float) -> tuple[float, float]:
    """Shrink [lo, hi] around the point where ``past`` switches from False to True.

    Assumes ``past`` is monotone (False … False True … True) on [lo, hi].
    """
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if past(mid) else (mid, hi)
    return lo, hi


def two_response_optimum(cfg: LossConfig, ref_prob_chosen: float = 0.1, label_prob: float = 0.7) -> dict[str, float]:
    """Minimise L(δ) over δ ∈ [−30, 30]; returns delta, pi_chosen = σ(δ*), loss, delta_ref.

    Every platform loss is convex in h = δ − δ_ref, and h is affine in δ, so L' is
    non-decreasing and the minimisers form an interval. We bisect on the sign of
    L' (by autograd) from δ_ref towards the downhill side, which handles the
    hinge's kink and returns, when the minimum is flat (hinge at q = 1/2), the
    minimiser nearest δ_ref, i.e. the smallest move away from the reference.
    |δ − δ*| < 1e-7. A minimiser beyond the bounds (e.g. DPO at q = 1, where
    δ* = +∞) comes back as ±30.
    """
    delta_ref = _logit(ref_prob_chosen)

    def slope(d: float) -> float:
        return _slope(cfg, d, ref_prob_chosen, label_prob)

    s = slope(delta_ref)
    if s > 0:  # downhill is to the left: the nearest minimiser is where L' turns positive
        lo, hi = _bisect(lambda d: slope(d) > 0, -BOUND, delta_ref, DELTA_TOL)
    elif s < 0:  # downhill is to the right: the nearest minimiser is where L' stops being negative
        lo, hi = _bisect(lambda d: slope(d) >= 0, delta_ref, BOUND, DELTA_TOL)
    else:
        lo = hi = delta_ref
    delta = torch.tensor(0.5 * (lo + hi), dtype=torch.float64)
    return {
        "delta": delta.item(),
        "pi_chosen": torch.sigmoid(delta).item(),
        "population_loss": population_loss(cfg, delta, ref_prob_chosen, label_prob).item(),
        "delta_ref": delta_ref,
    }


def closed_form_dpo(beta: float, ref_prob_chosen: float, label_prob: float) -> dict[str, float]:
    """DPO's exact optimum: δ* = logit(r) + logit(q)/β, π(y_w) = σ(δ*), L(δ*) = H(q)."""
    q = label_prob
    delta = _logit(ref_prob_chosen) + _logit(q) / beta
    return {
        "delta": delta,
        "pi_chosen": 1 / (1 + math.exp(-delta)),
        "population_loss": -q * math.log(q) - (1 - q) * math.log1p(-q),
    }


def smallest_gamma(
    cfg: LossConfig,
    ref_prob_chosen: float = 0.1,
    label_prob: float = 0.7,
    lo: float = -10,
    hi: float = 20,
    tol: float = 1e-4,
) -> float | None:
    """Smallest CPO target margin γ ∈ [lo, hi] whose optimum prefers y_w (δ* > 0).

    Bisection on γ, relying on δ*(γ) increasing in γ: a larger γ raises the
    shortfall m = softplus(τ(γ − δ_ref))/τ and with it the margin δ must reach.
    Returns the upper end of the final bracket (so δ*(γ) > 0 holds there), or None
    if even γ = hi leaves δ* ≤ 0. Raises ValueError if cfg is not cpo, if δ* is not
    larger at hi than at lo, or if δ* > 0 already at lo (then lower ``lo``).
    """
    if cfg.type != "cpo":
        raise ValueError(f"smallest_gamma needs loss type 'cpo', got {cfg.type!r}")

    def delta_at(gamma: float) -> float:
        at = cfg.model_copy(update={"gamma": gamma})
        return two_response_optimum(at, ref_prob_chosen, label_prob)["delta"]

    d_lo, d_hi = delta_at(lo), delta_at(hi)
    if d_lo > d_hi:
        raise ValueError(f"δ* decreases from γ={lo} ({d_lo:.4g}) to γ={hi} ({d_hi:.4g})")
    if d_hi <= 0:
        return None
    if d_lo > 0:
        raise ValueError(f"δ* = {d_lo:.4g} > 0 already at γ={lo}; lower `lo`")
    return _bisect(lambda g: delta_at(g) > 0, lo, hi, tol)[1]


def _row(loss: str, params: str, opt: dict[str, float], gamma_min: float | None) -> dict[str, Any]:
    return {
        "loss_type": loss,
        "params": params,
        "delta": opt["delta"],
        "pi_chosen": opt["pi_chosen"],
        "loss_value": opt["population_loss"],
        "prefers_chosen": opt["delta"] > 0,
        "smallest_gamma": gamma_min,
    }


def two_response_table(
    beta: float = 1.0, ref_prob_chosen: float = 0.1, label_prob: float = 0.7
) -> list[dict[str, Any]]:
    """One row per platform loss: where it converges on the two-response problem.

    CPO rows report the smallest γ that makes δ* > 0 and the optimum at
    γ = smallest γ + 0.5 (a little past the threshold).
    """
    r, q = ref_prob_chosen, label_prob
    rows = [
        _row(t, f"β={beta:g}", two_response_optimum(LossConfig(type=t, beta=beta), r, q), None)
        for t in ("dpo", "ipo", "hinge")
    ]
    for tau in (1.0, 4.0):
        cfg = LossConfig(type="cpo", beta=beta, alpha=1.0, tau=tau)
        gamma_min = smallest_gamma(cfg, r, q)
        if gamma_min is None:
            gamma, opt = cfg.gamma, two_response_optimum(cfg, r, q)
        else:
            gamma = gamma_min + 0.5
            opt = two_response_optimum(cfg.model_copy(update={"gamma": gamma}), r, q)
        params = f"β={beta:g}, α=1, τ={tau:g}, γ={gamma:.3f}"
        rows.append(_row("cpo", params, opt, gamma_min))
    cfg = LossConfig(type="cpo_clip", beta=beta)
    rows.append(_row("cpo_clip", f"β={beta:g}", two_response_optimum(cfg, r, q), None))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`two_response_table` rows."""
    lines = [
        "| loss | params | δ* | π(y_w) | L(δ*) | prefers y_w | smallest γ |",
        "|---|---|---:|---:|---:|:---:|---:|",
    ]
    for row in rows:
        gamma = row["smallest_gamma"]
        lines.append(
            f"| {row['loss_type']} | {row['params']} | {row['delta']:.4f} | {row['pi_chosen']:.4f} "
            f"| {row['loss_value']:.4f} | {'yes' if row['prefers_chosen'] else 'no'} "
            f"| {'n/a' if gamma is None else f'{gamma:.4f}'} |"
        )
    return "\n".join(lines)
