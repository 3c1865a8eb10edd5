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

The reference-free losses (``simpo``, ``orpo``) compare the policy's per-token
average log-probs s(y) = log π_θ(y|x) / |y| and need no reference model at all.

``kto`` takes unpaired completions, each labelled desirable or undesirable. Its rows
are laid out as pairs (:mod:`rayalign.schema`): the completion y where a pair's
chosen response is, and the KL completion y' (another row's completion for this
prompt) where the rejected one is; so its four log-probs arrive in the same places.

Each loss is declared once in :data:`rayalign.loss_specs.LOSSES`: which function
here, its own config parameters, whether it needs reference log-probs and whether
it compares per-token averages; :func:`preference_loss` calls it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rayalign.config import LossConfig
from rayalign.loss_specs import LOSSES


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


def simpo(policy_chosen: Tensor, policy_rejected: Tensor, beta: float, margin: float) -> Tensor:
    """Simple Preference Optimization (Meng et al., 2024, "SimPO", eq. 6), reference-free.

        L = −log σ(β·s_θ(y_w) − β·s_θ(y_l) − γ_SimPO)

    on per-token average log-probs s_θ(y) = log π_θ(y|x) / |y| (the caller averages). ``margin`` is the
    target reward margin γ_SimPO (``loss.simpo_margin``; TRL's ``simpo_gamma``), in reward units β·nats.
    """
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected) - margin)


def log_odds(average_logp: Tensor) -> Tensor:
    """log(P / (1 − P)) for P = exp(s), s a per-token average log-prob (< 0), computed stably from s."""
    # log(1 − e^s): log(−expm1(s)) near 0, log1p(−e^s) far below (Mächler, "Accurately computing log(1 − exp(−|a|))").
    log_one_minus_p = torch.where(
        average_logp > -0.6931471805599453, torch.log(-torch.expm1(average_logp)), torch.log1p(-torch.exp(average_logp))
    )
    return average_logp - log_one_minus_p


def orpo(policy_chosen: Tensor, policy_rejected: Tensor, beta: float, odds_ratio_weight: float) -> Tensor:
    """Odds Ratio Preference Optimization (Hong et al., 2024, "ORPO", eqs. 4-7), reference-free.

        L = −s_θ(y_w) − λ · log σ(log odds(y_w) − log odds(y_l)),   odds(y) = P(y|x) / (1 − P(y|x))

    on per-token average log-probs s_θ(y) (P(y|x) = exp s_θ(y)): the supervised NLL of the chosen response
    plus λ = ``odds_ratio_weight`` (``loss.odds_ratio_weight``; TRL's ORPO ``beta``) times the odds-ratio term.
    ``beta`` is not in the loss: it only scales the reported rewards β·s_θ(y).
    """
    ratio = F.logsigmoid(log_odds(policy_chosen) - log_odds(policy_rejected))
    return -policy_chosen - odds_ratio_weight * ratio


def kto_reference_point(policy_kl: Tensor, ref_kl: Tensor) -> Tensor:
    """KTO's reference point z_0 = max(0, mean over the batch of log π_θ(y'|x) − log π_ref(y'|x)), detached: the
    KL(π_θ‖π_ref) estimate from mismatched completions y' (Ethayarajh et al., 2024, "KTO", §4.1). A scalar tensor."""
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto(
    policy_completion: Tensor,
    policy_kl: Tensor,
    ref_completion: Tensor,
    ref_kl: Tensor,
    desirable: Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024, "KTO", eqs. 7-8), on unpaired completions.

        r   = log π_θ(y|x) − log π_ref(y|x)
        z_0 = kto_reference_point(log π_θ(y'|x), log π_ref(y'|x))
        L   = λ_D (1 − σ(β(r − z_0)))   for a desirable y
              λ_U (1 − σ(β(z_0 − r)))   for an undesirable y

    ``desirable``: bool (B,), the label; λ_D, λ_U = ``desirable_weight``, ``undesirable_weight`` (TRL's names).
    z_0 is estimated over this batch's rows (TRL also averages it across processes; here each worker its own).
    """
    reward = policy_completion - ref_completion
    z0 = kto_reference_point(policy_kl, ref_kl)
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (reward - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward))),
    )


def nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen response: −log π(y_w|x) / |y_w|."""
    return -policy_chosen / chosen_tokens.clamp(min=1)


def preference_loss(
    cfg: LossConfig,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    desirable: Tensor | None = None,
) -> Tensor:
    """Per-pair loss for ``cfg.type`` (log-probs already summed or length-normalized; the reference ones may be
    None for a loss that needs none), called as :data:`rayalign.loss_specs.LOSSES` declares it. For an unpaired
    loss the "pair" is (completion, KL completion) and ``desirable`` (bool (B,)) labels the completion.
    Raises ValueError when the loss needs a reference, or labels, and gets None."""
    spec = LOSSES[cfg.type]
    compared = [policy_chosen, policy_rejected]
    if spec.needs_reference:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss.type {cfg.type} needs reference log-probs and the batch has none")
        compared += [ref_chosen, ref_rejected]
    if spec.data == "unpaired":
        if desirable is None:
            raise ValueError(f"loss.type {cfg.type} takes labelled unpaired completions and the batch has no labels")
        compared.append(desirable)
    own = {p.argument: getattr(cfg, name) for name, p in spec.parameters.items()}
    return globals()[spec.function](*compared, beta=cfg.beta, **own)


@dataclass(frozen=True)
class PairLogps:
    """Per-pair sequence log-probs (summed over response tokens) and response lengths, each (B,); the reference's
    are None where none was scored (a loss that needs no reference). Unpaired rows (KTO) carry their completion's
    as chosen, the KL completion's as rejected, and ``desirable`` (bool (B,)); pairs have None there."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    desirable: Tensor | None = None


@dataclass(frozen=True)
class ObjectiveTerms:
    """What :func:`objective` returns: the per-pair loss (the caller reduces) and the log-probs
    (π_θ(y_w), π_θ(y_l), π_ref(y_w), π_ref(y_l)) its preference term compared, which the metrics report (the
    reference's None where none was scored); for unpaired rows, (π_θ(y), π_θ(y'), π_ref(y), π_ref(y')) and the
    labels in ``desirable``."""

    loss: Tensor
    compared: tuple[Tensor, Tensor, Tensor | None, Tensor | None]
    desirable: Tensor | None = None


def objective(cfg: LossConfig, logps: PairLogps) -> ObjectiveTerms:
    """The whole per-pair training objective; training, evaluation and the exact analysis call this.

        ℓ = preference_loss(cfg, s_θ(y_w), s_θ(y_l), s_ref(y_w), s_ref(y_l)) + λ · nll(y_w)

    where s(y) = log π(y|x), or log π(y|x) / |y| with ``cfg.length_normalize`` or a loss defined on per-token
    averages (SimPO, ORPO; as in the CPO reference implementation), and λ = ``cfg.nll_weight``.
    """
    compared = (logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected)
    if cfg.length_normalize or LOSSES[cfg.type].per_token:
        lengths = (logps.chosen_tokens, logps.rejected_tokens, logps.chosen_tokens, logps.rejected_tokens)
        compared = tuple(
            None if value is None else value / length.clamp(min=1) for value, length in zip(compared, lengths)
        )
    loss = preference_loss(cfg, *compared, desirable=logps.desirable)
    if cfg.nll_weight > 0:
        loss = loss + cfg.nll_weight * nll(logps.policy_chosen, logps.chosen_tokens)
    return ObjectiveTerms(loss, compared, logps.desirable)
