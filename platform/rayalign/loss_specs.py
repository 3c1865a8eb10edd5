"""What each preference loss is, declared once: the config, the pipeline and the metrics read it.

A :class:`LossSpec` names its pure function in :mod:`rayalign.losses` (where its formula and source are), the
config fields it takes beyond ``beta`` (and which keyword of the function each one fills), whether it needs
reference log-probs (a loss that needs none starts no reference actors for training), whether it compares
per-token average log-probs whatever ``loss.length_normalize`` says, and which data it takes: preference pairs
(prompt, chosen, rejected) or unpaired completions (prompt, completion, label; KTO's). This module imports
neither torch nor the config, so ``rayalign validate`` stays light.

Adding a loss: its function in :mod:`rayalign.losses`, its entry here, its test, a README row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LossParameter:
    """A config field of ``loss`` only this loss takes: the keyword of its function it fills, and what it is."""

    argument: str
    what: str


@dataclass(frozen=True)
class LossSpec:
    """One loss: ``function`` (its name in :mod:`rayalign.losses`), ``parameters`` (``loss.<field>`` →
    :class:`LossParameter`; the config refuses them for every other loss), ``needs_reference``, ``per_token``,
    and ``data``: ``paired`` records, or ``unpaired`` ones (each a completion labelled desirable or not)."""

    function: str
    parameters: dict[str, LossParameter] = field(default_factory=dict)
    needs_reference: bool = True
    per_token: bool = False
    data: Literal["paired", "unpaired"] = "paired"


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
    "kto": LossSpec(
        "kto",
        {
            "desirable_weight": LossParameter("desirable_weight", "KTO's weight λ_D of desirable completions"),
            "undesirable_weight": LossParameter("undesirable_weight", "KTO's weight λ_U of undesirable completions"),
        },
        data="unpaired",
    ),
}


def needs_reference(loss_type: str) -> bool:
    """Whether loss ``loss_type`` compares against reference log-probs."""
    return LOSSES[loss_type].needs_reference


def takes_unpaired(loss_type: str) -> bool:
    """Whether loss ``loss_type`` trains on unpaired completions (prompt, completion, label) rather than pairs."""
    return LOSSES[loss_type].data == "unpaired"
