"""Live alarms on rank 0's logged rows: the pathology alarm (the loss is falling but the policy still prefers the
rejected responses) and likelihood displacement (:func:`displacement_alarm`). What a run does when one fires is
``monitor.on_alarm`` / ``monitor.on_displacement`` (rayalign.train.worker).

DPO's loss can keep falling inside U = {δ_ref < δ_θ < 0}: the policy improves on
the reference yet still prefers y_l. Over the last ``window`` logged steps the
alarm fires when

    the loss falls                               (least-squares trend < −min_change)
    and (absolute accuracy stays below 0.5       (every value in the window < 0.5,
                                                  and not rising by min_change)
         or absolute accuracy falls              (trend < −min_change)
         or frac_in_U rises)                     (trend > +min_change)

A run that starts below 0.5 and climbs out of it (what CPO does) stays silent.

Trends are the fitted change across the window, in the metric's own units, so
a flat noisy metric does not trigger it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rayalign.metrics import ABSOLUTE_ACCURACY, FRAC_IN_U, LOSS, REWARDS_CHOSEN


def trend(values: Sequence[float]) -> float:
    """Least-squares slope × (n − 1): the fitted change from the first to the last point."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    var = sum((i - mean_x) ** 2 for i in range(n))
    return cov / var * (n - 1)


def pathology_alarm(rows: Sequence[dict[str, Any]], window: int, min_change: float) -> str | None:
    """The reason the alarm fires on the last ``window`` rows, or None when they look healthy, or have no
    preference to watch (unpaired data: KTO's rows have no absolute accuracy)."""
    if len(rows) < window or not all(ABSOLUTE_ACCURACY in r for r in rows[-window:]):
        return None
    recent = rows[-window:]
    loss_change = trend([r[LOSS] for r in recent])
    if loss_change >= -min_change:
        return None
    abs_acc = [r[ABSOLUTE_ACCURACY] for r in recent]
    abs_change = trend(abs_acc)
    # frac_in_U needs the reference: a loss that needs none (simpo, orpo) is watched on absolute accuracy alone.
    u_change = trend([r[FRAC_IN_U] for r in recent]) if all(FRAC_IN_U in r for r in recent) else 0.0
    symptoms = []
    if max(abs_acc) < 0.5 and abs_change < min_change:
        symptoms.append(f"absolute accuracy stayed below 0.5 (max {max(abs_acc):.3f})")
    if abs_change < -min_change:
        symptoms.append(f"absolute accuracy fell by {-abs_change:.3f}")
    if u_change > min_change:
        symptoms.append(f"frac_in_U rose by {u_change:.3f}")
    if not symptoms:
        return None
    return f"loss fell by {-loss_change:.3f} over {window} logged steps while " + "; ".join(symptoms)


def displacement_alarm(rows: Sequence[dict[str, Any]], window: int, min_change: float) -> str | None:
    """Likelihood displacement on the last ``window`` rows: the loss falls while the chosen responses become less
    likely under the policy than under the reference (``rewards/chosen`` = β(log π_θ(y_w) − log π_ref(y_w)) ends
    negative and falls by more than ``min_change``). DPO can lower both responses' likelihood as long as the
    rejected one falls faster (Razin et al., 2025, "Unintentional Unalignment"; Pal et al., 2024, "Smaug"); the
    usual remedy is an NLL term on the chosen response (``loss.nll_weight``). None when the rows look healthy, or
    have no reference to compare with (a loss that needs none)."""
    if len(rows) < window or not all(REWARDS_CHOSEN in r for r in rows[-window:]):
        return None
    recent = rows[-window:]
    loss_change = trend([r[LOSS] for r in recent])
    chosen = [r[REWARDS_CHOSEN] for r in recent]
    chosen_change = trend(chosen)
    if loss_change >= -min_change or chosen[-1] >= 0 or chosen_change >= -min_change:
        return None
    return (
        f"loss fell by {-loss_change:.3f} over {window} logged steps while the chosen responses' reward fell by "
        f"{-chosen_change:.3f} to {chosen[-1]:.3f}: the policy makes the chosen answers less likely than the "
        "reference does (likelihood displacement)"
    )
