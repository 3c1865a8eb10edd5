"""Live pathology alarm: the loss is falling but the policy still prefers the rejected responses.

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

from rayalign.metrics import ABSOLUTE_ACCURACY, FRAC_IN_U, LOSS


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
    """The reason the alarm fires on the last ``window`` rows, or None when they look healthy."""
    if len(rows) < window:
        return None
    recent = rows[-window:]
    loss_change = trend([r[LOSS] for r in recent])
    if loss_change >= -min_change:
        return None
    abs_acc = [r[ABSOLUTE_ACCURACY] for r in recent]
    abs_change, u_change = trend(abs_acc), trend([r[FRAC_IN_U] for r in recent])
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
