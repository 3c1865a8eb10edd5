"""Preference losses: pure functions of log-probabilities.

Every function takes tensors of shape (batch,) and returns per-pair losses of
shape (batch,); the caller reduces. Notation, for a prompt x with chosen
response y_w and rejected response y_l:

    δ_θ   = log π_θ(y_w|x)   − log π_θ(y_l|x)          (policy preference)
    δ_ref = log π_ref(y_w|x) − log π_ref(y_l|x)        (reference preference)
    h     = δ_θ − δ_ref                                 (implicit reward margin / β)

DPO is equivalent to RLHF only when the RLHF-optimal policy prefers y_w. When
the reference strongly prefers y_l (δ_ref ≪ 0), DPO's loss can fall while
δ_θ stays negative: the region U = {δ_ref < δ_θ < 0}. Constrained Preference
Optimization (``cpo``, ``cpo_clip``; not TRL's Contrastive PO) shifts the
target so that the learned margin is never negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rayalign.config import LossConfig


def margins(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Return (h, δ_θ, δ_ref) as defined in the module docstring."""
    delta_policy = policy_chosen - policy_rejected
    delta_ref = ref_chosen - ref_rejected
    return delta_policy - delta_ref, delta_policy, delta_ref


def dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Direct Preference Optimization (Rafailov et al., 2023), eq. 7.

        L = −(1−ε) log σ(βh) − ε log σ(−βh)

    ε = label_smoothing is the conservative-DPO label-noise rate (ε = 0: plain DPO).
    """
    h, _, _ = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Identity Preference Optimization (Azar et al., 2023), eq. 17.

    L = (h − 1/(2β))²
    """
    h, _, _ = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


def hinge(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """SLiC-style hinge loss on the implicit reward margin.

    L = max(0, 1 − βh)
    """
    h, _, _ = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.relu(1 - beta * h)


def cpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    gamma: float,
    alpha: float,
    tau: float,
) -> Tensor:
    """Constrained Preference Optimization, smooth form.

        m = softplus(τ(γ − δ_ref)) / τ
        L = −log σ(βh − (β/α)·m)

    m is a smooth max(0, γ − δ_ref): how far the reference falls short of the
    target margin γ. Moving (β/α)·m into the sigmoid raises the margin the
    policy must reach to approximately δ_θ ≥ γ (for α = 1) on pairs the
    reference gets wrong. As γ → −∞ or α → ∞, m/α → 0 and this is DPO.
    """
    h, _, delta_ref = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    shortfall = F.softplus(tau * (gamma - delta_ref)) / tau
    return -F.logsigmoid(beta * h - (beta / alpha) * shortfall)


def cpo_clip(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Constrained Preference Optimization, clipped-reference form.

        L = −log σ(β(δ_θ − max(0, δ_ref)))

    Where the reference already prefers y_w this is DPO; where it prefers y_l
    the policy is measured against 0, i.e. it must prefer y_w outright.
    """
    _, delta_policy, delta_ref = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * (delta_policy - torch.clamp(delta_ref, min=0.0)))


def nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen response: −log π(y_w|x) / |y_w|."""
    return -policy_chosen / chosen_tokens.clamp(min=1)


def preference_loss(
    cfg: LossConfig,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
) -> Tensor:
    """Per-pair loss for ``cfg.type`` (log-probs already summed or length-normalized)."""
    args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if cfg.type == "dpo":
        return dpo(*args, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    if cfg.type == "ipo":
        return ipo(*args, beta=cfg.beta)
    if cfg.type == "hinge":
        return hinge(*args, beta=cfg.beta)
    if cfg.type == "cpo":
        return cpo(*args, beta=cfg.beta, gamma=cfg.gamma, alpha=cfg.alpha, tau=cfg.tau)
    if cfg.type == "cpo_clip":
        return cpo_clip(*args, beta=cfg.beta)
    raise ValueError(f"unknown loss type {cfg.type!r}")


@dataclass(frozen=True)
class PairLogps:
    """Per-pair sequence log-probs (summed over response tokens) and response lengths, each (B,)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass(frozen=True)
class ObjectiveTerms:
    """What :func:`objective` returns: the per-pair loss (the caller reduces) and the log-probs
    (π_θ(y_w), π_θ(y_l), π_ref(y_w), π_ref(y_l)) its preference term compared, which the metrics report."""

    loss: Tensor
    compared: tuple[Tensor, Tensor, Tensor, Tensor]


def objective(cfg: LossConfig, logps: PairLogps) -> ObjectiveTerms:
    """The whole per-pair training objective; training, evaluation and the exact analysis call this.

        ℓ = preference_loss(cfg, s_θ(y_w), s_θ(y_l), s_ref(y_w), s_ref(y_l)) + λ · nll(y_w)

    where s(y) = log π(y|x), or log π(y|x) / |y| with ``cfg.length_normalize`` (per-token averages,
    as in the CPO reference implementation), and λ = ``cfg.nll_weight``.
    """
    compared = (logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected)
    if cfg.length_normalize:
        lengths = (logps.chosen_tokens, logps.rejected_tokens, logps.chosen_tokens, logps.rejected_tokens)
        compared = tuple(value / length.clamp(min=1) for value, length in zip(compared, lengths))
    loss = preference_loss(cfg, *compared)
    if cfg.nll_weight > 0:
        loss = loss + cfg.nll_weight * nll(logps.policy_chosen, logps.chosen_tokens)
    return ObjectiveTerms(loss, compared)
