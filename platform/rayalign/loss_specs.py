"""What each preference loss is, declared once: the config, the pipeline and the metrics read it.

A :class:`LossSpec` names its pure function in :mod:`rayalign.losses` (where its formula and source are), the
config fields it takes beyond ``beta`` (and which keyword of the function each one fills), whether it needs
reference log-probs (a loss that needs none starts no reference actors for training) and whether it compares
per-token average log-probs whatever ``loss.length_normalize`` says. This module imports neither torch nor the
config, so ``rayalign validate`` stays light.

Adding a loss: its function in :mod:`rayalign.losses`, its entry here, its test, a README row.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossParameter:
    """A config field of ``loss`` only this loss takes: the keyword of its function it fills, and what it is."""

    argument: str
    what: str


@dataclass(frozen=True)
class LossSpec:
    """One loss: ``function`` (its name in :mod:`rayalign.losses`), ``parameters`` (``loss.<field>`` →
    :class:`LossParameter`; the config refuses them for every other loss), ``needs_reference``, ``per_token``."""

    function: str
    parameters: dict[str, LossParameter] = field(default_factory=dict)
    needs_reference: bool = True
    per_token: bool = False


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(
        "dpo", {"label_smoothing": LossParameter("label_smoothing", "conservative DPO's label-noise rate")}
    ),
    "ipo": LossSpec("ipo"),
    "hinge": LossSpec("hinge"),
    "cpo": LossSpec(
        "cpo",
        {
            "gamma": LossParameter("gamma", "CPO's target margin γ"),
            "alpha": LossParameter("alpha", "CPO's constraint weight α"),
            "tau": LossParameter("tau", "CPO's smoothness τ"),
        },
    ),
    "cpo_clip": LossSpec("cpo_clip"),
    "simpo": LossSpec(
        "simpo",
        {"simpo_margin": LossParameter("margin", "SimPO's target reward margin γ_SimPO")},
        needs_reference=False,
        per_token=True,
    ),
    "orpo": LossSpec(
        "orpo",
        {"odds_ratio_weight": LossParameter("odds_ratio_weight", "ORPO's odds-ratio weight λ")},
        needs_reference=False,
        per_token=True,
    ),
}


def needs_reference(loss_type: str) -> bool:
    """Whether loss ``loss_type`` compares against reference log-probs."""
    return LOSSES[loss_type].needs_reference
