"""Acting on alarms (rayalign.train.actions): the likelihood-displacement detector, which action an alarm asks
for, and the settings an action needs."""

from __future__ import annotations

import pytest
from conftest import make_config

from rayalign.config import ConfigError, MonitorConfig
from rayalign.diagnostics.alarms import displacement_alarm
from rayalign.metrics import ALARM, DISPLACEMENT
from rayalign.train import actions


def rows(loss, chosen):
    return [{"step": i + 1, "loss": value, "rewards/chosen": c} for i, (value, c) in enumerate(zip(loss, chosen))]


FALLING = [0.69 - 0.05 * i for i in range(8)]


def test_displacement_fires_when_the_chosen_reward_falls_below_zero_while_the_loss_falls():
    reason = displacement_alarm(rows(FALLING, [-0.1 * i for i in range(8)]), window=8, min_change=0.1)
    assert reason is not None and "likelihood displacement" in reason and "fell by 0.700 to -0.700" in reason


@pytest.mark.parametrize(
    "loss,chosen",
    [
        (FALLING, [0.1 * i for i in range(8)]),  # chosen rising: healthy DPO
        (FALLING, [0.8 - 0.1 * i for i in range(8)]),  # falling but still above the reference
        ([0.69] * 8, [-0.1 * i for i in range(8)]),  # the loss does not fall: another problem
        (FALLING[:5], [-0.1 * i for i in range(5)]),  # fewer rows than the window
    ],
)
def test_displacement_stays_silent_otherwise(loss, chosen):
    assert displacement_alarm(rows(loss, chosen), window=8, min_change=0.1) is None


def test_a_stop_wins_over_a_switch_and_a_run_switches_once():
    both = MonitorConfig(on_alarm="switch", on_displacement="stop", switch_to={"type": "cpo"}, eval_every=2)
    assert actions.requested({ALARM: "x"}, both, switched=False) == actions.SWITCH
    assert actions.requested({ALARM: "x", DISPLACEMENT: "y"}, both, switched=False) == actions.STOP
    assert actions.requested({ALARM: "x"}, both, switched=True) == actions.WARN
    assert actions.requested({}, both, switched=False) == actions.WARN
    assert actions.describe(actions.SWITCH, both).startswith("switched to cpo (beta=0.1, gamma=0")


def test_actions_name_what_they_need(tmp_path):
    with pytest.raises(ConfigError, match="switch needs monitor.switch_to"):
        make_config(tmp_path, monitor={"on_alarm": "switch"})
    with pytest.raises(ConfigError, match="exports the best held-out model.*set monitor.eval_every"):
        make_config(tmp_path, monitor={"on_alarm": "stop"})
    with pytest.raises(ConfigError, match="needs held-out pairs: set data.eval_fraction"):
        make_config(tmp_path, monitor={"on_alarm": "stop", "eval_every": 2})
    with pytest.raises(ConfigError, match="'eval/accuracy' is not a held-out key"):
        make_config(tmp_path, monitor={"keep_best": "eval/accuracy", "eval_every": 2})
    stop = make_config(tmp_path, data={"eval_fraction": 0.25}, monitor={"on_alarm": "stop", "eval_every": 2})
    assert stop.monitor.best_key == "eval/pref/absolute_accuracy"
    kept = make_config(tmp_path, data={"eval_fraction": 0.25}, monitor={"keep_best": "eval/loss", "eval_every": 2})
    assert kept.monitor.best_key == "eval/loss"


def test_a_restored_history_says_whether_the_run_had_switched():
    monitor = MonitorConfig(on_alarm="switch", switch_to={"type": "cpo", "gamma": 1.0})
    switched = [{"step": 1}, {"step": 2, "action": actions.describe(actions.SWITCH, monitor)}, {"step": 3}]
    assert actions.was_switched(switched) and not actions.was_switched(switched[:1])
    assert not actions.was_switched([{"step": 2, "action": actions.describe(actions.STOP, monitor)}])
