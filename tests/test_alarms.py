"""The pathology alarm on constructed trajectories: fires on DPO's failure mode, silent when healthy."""

import pytest

from rayalign.diagnostics.alarms import pathology_alarm, trend


def rows(loss, abs_acc, frac_u):
    return [
        {"step": i + 1, "loss": loss_value, "pref/absolute_accuracy": a, "pref/frac_in_U": u}
        for i, (loss_value, a, u) in enumerate(zip(loss, abs_acc, frac_u))
    ]


def test_trend_is_fitted_change():
    assert trend([0.0, 1.0, 2.0, 3.0]) == pytest.approx(3.0)
    assert trend([1.0, 1.0, 1.0]) == 0.0 and trend([5.0]) == 0.0


def test_fires_when_loss_falls_but_policy_still_prefers_rejected():
    # Loss falls steadily; absolute accuracy stuck at ~0.3; more pairs drift into U.
    path = rows(
        loss=[0.69 - 0.03 * i for i in range(10)],
        abs_acc=[0.30, 0.31, 0.29, 0.30, 0.31, 0.30, 0.29, 0.30, 0.31, 0.30],
        frac_u=[0.10 + 0.04 * i for i in range(10)],
    )
    reason = pathology_alarm(path, window=8, min_change=0.02)
    assert reason is not None
    assert "absolute accuracy stayed below 0.5" in reason and "frac_in_U rose" in reason


def test_fires_when_absolute_accuracy_falls_even_above_half():
    path = rows(loss=[0.6 - 0.02 * i for i in range(8)], abs_acc=[0.9 - 0.03 * i for i in range(8)], frac_u=[0.0] * 8)
    assert "absolute accuracy fell" in pathology_alarm(path, window=8, min_change=0.02)


def test_silent_on_healthy_and_on_short_or_flat_trajectories():
    healthy = rows(
        loss=[0.69 - 0.04 * i for i in range(10)],
        abs_acc=[0.45 + 0.04 * i for i in range(10)],
        frac_u=[0.20 - 0.02 * i for i in range(10)],
    )
    assert pathology_alarm(healthy, window=8, min_change=0.02) is None
    assert pathology_alarm(healthy[:5], window=8, min_change=0.02) is None  # not enough history
    # Policy wrong but the loss is not falling: nothing for this alarm to say.
    stuck = rows(loss=[0.69] * 8, abs_acc=[0.3] * 8, frac_u=[0.5] * 8)
    assert pathology_alarm(stuck, window=8, min_change=0.02) is None
    # Below 0.5 but climbing out of it (CPO's early phase): not the failure mode.
    recovering = rows(
        loss=[3.0 - 0.2 * i for i in range(8)],
        abs_acc=[0.1 + 0.05 * i for i in range(8)],
        frac_u=[0.8 - 0.05 * i for i in range(8)],
    )
    assert pathology_alarm(recovering, window=8, min_change=0.02) is None
    # Noise below min_change does not count as a fall in accuracy.
    noisy = rows(
        loss=[0.6 - 0.02 * i for i in range(8)],
        abs_acc=[0.8, 0.81, 0.79, 0.8, 0.8, 0.81, 0.79, 0.8],
        frac_u=[0.05, 0.04, 0.05, 0.05, 0.04, 0.05, 0.05, 0.04],
    )
    assert pathology_alarm(noisy, window=8, min_change=0.02) is None
