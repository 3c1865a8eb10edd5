"""Acting on alarms: rank 0 watches its logged rows, and every rank does what they ask at the same step.

``monitor.on_alarm`` (the pathology alarm) and ``monitor.on_displacement`` (likelihood displacement) each say
``warn`` (log it, go on), ``stop`` (end the run there, the best held-out model exported) or ``switch`` (train on
with ``monitor.switch_to``). Only rank 0 holds the logged history, so rank 0 decides and the decision reaches
every rank through one all-reduce on the process group's device (:class:`rayalign.distributed.Collective`):
under NCCL a CPU tensor there would hang or fail the run, so the decision never takes another path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rayalign.config import MonitorConfig
from rayalign.diagnostics.alarms import displacement_alarm, pathology_alarm
from rayalign.distributed import Collective
from rayalign.metrics import ACTION, ALARM, DISPLACEMENT

WARN, SWITCH, STOP = 0, 1, 2  # agreed as the largest code any rank asks for: a stop wins over a switch
_CODES = {"warn": WARN, "switch": SWITCH, "stop": STOP}
SWITCHED = "switched to"  # how an ACTION value of a switch begins


def alarms_of(history: Sequence[dict[str, Any]], monitor: MonitorConfig) -> dict[str, str]:
    """Rank 0: the alarms that hold on the last of ``history``'s rows, by key (``alarm``, ``displacement``)."""
    window, change = monitor.alarm_window, monitor.alarm_min_change
    found = {ALARM: pathology_alarm(history, window, change), DISPLACEMENT: displacement_alarm(history, window, change)}
    return {key: reason for key, reason in found.items() if reason}


def requested(row: dict[str, Any], monitor: MonitorConfig, switched: bool) -> int:
    """The code of what the alarms on ``row`` ask for under ``monitor``'s settings; a run switches once."""
    codes = [_CODES[monitor.on_alarm] * (ALARM in row), _CODES[monitor.on_displacement] * (DISPLACEMENT in row)]
    return max((code for code in codes if not (switched and code == SWITCH)), default=WARN)


@dataclass
class AlarmResponse:
    """A worker's side of the decision: what rank 0's alarms ask, agreed by every rank at the same step."""

    monitor: MonitorConfig
    collective: Collective  # the worker group's, on the process group's device
    switched: bool = False  # a run switches once

    @property
    def acts(self) -> bool:
        """Whether any alarm does more than warn (the workers then agree on a code at every logged step)."""
        return self.monitor.actions != {"warn"}

    def agree(self, row: dict[str, Any], rank: int) -> int:
        """The code every rank acts on at ``row``'s step: rank 0's ask (its row holds the alarms), the others'
        WARN, through one all-reduce (max). Only when an alarm may do more than warn: otherwise no rank waits."""
        if not self.acts:
            return WARN
        asked = requested(row, self.monitor, self.switched) if rank == 0 else WARN
        return self.collective.all_reduce_max(asked)


def describe(code: int, monitor: MonitorConfig) -> str:
    """The ``action`` a row records for ``code``."""
    if code == STOP:
        return "stopped"
    loss = monitor.switch_to
    own = {"dpo": "label_smoothing", "cpo": "gamma"}.get(loss.type)
    detail = f", {own}={getattr(loss, own):g}" if own else ""
    return f"{SWITCHED} {loss.type} (beta={loss.beta:g}{detail}, nll_weight={loss.nll_weight:g})"


def was_switched(history: Sequence[dict[str, Any]]) -> bool:
    """Whether the logged ``history`` (restored from a checkpoint) holds a switch."""
    return any(str(row.get(ACTION, "")).startswith(SWITCHED) for row in history)
