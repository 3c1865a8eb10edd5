"""What a logged row holds: every metric key written once, the way :mod:`rayalign.schema` writes the columns.

Rank 0 appends one row per logging step to ``metrics.jsonl``::

    key                          meaning
    step, epoch, lr              the optimizer step (1-based), the epoch (0-based), the learning rate after it
    loss                         the objective (rayalign.losses.objective), mean over the interval's pairs
    rewards/chosen               β (log π_θ(y_w) − log π_ref(y_w)), mean over pairs (DPO's implicit reward)
    rewards/rejected             β (log π_θ(y_l) − log π_ref(y_l))
    rewards/margins              rewards/chosen − rewards/rejected
    rewards/accuracies           share of pairs with h = δ_θ − δ_ref > 0 (what DPO's loss rewards)
    logps/chosen, logps/rejected log π_θ(y|x) summed over the response tokens (per token with length_normalize)
    pref/absolute_accuracy       share of pairs with δ_θ > 0: the policy prefers y_w outright
    pref/frac_in_U               share with δ_ref < δ_θ < 0: better than the reference, still preferring y_l
    kl                           unpaired data (KTO): the KL estimate z_0 from mismatched completions, mean over rows
    pairs/s, tokens/s            throughput over the interval, every worker together (tokens: computed positions)
    memory/peak_allocated_gib    rank 0's peak accelerator memory (GPU runs only)
    memory/peak_rss_gib          rank 0's peak resident set in host RAM (every run)
    eval/<key>                   the same statistics on the held-out pairs (no rates), when evaluated

The rewards/* keys and pref/frac_in_U need the reference's log-probs (REFERENCE_KEYS): a run whose loss needs no
reference (simpo, orpo) leaves them out of its training rows, and has them on its held-out rows only when
monitor.reference_for_heldout scored the held-out pairs with the reference. A run on unpaired completions (kto)
has no pairs to compare: its rewards/chosen and logps/chosen are over the desirable completions, its /rejected
over the undesirable ones (as TRL's KTOTrainer logs them), and it reports kl where the others report the margins,
accuracies and frac_in_U.
    eval/gen/<name>              generation-based evaluation (rayalign evaluate): each side's mean verifier
                                 score and response length, the policy's win/tie/loss shares and win rate
    alarm                        the pathology alarm's reason, on the rows where it holds
    displacement                 the likelihood-displacement alarm's reason, on the rows where it holds
    action                       what the run did about an alarm, on the row it did it (stop, switch to ...)
    resumed_from_step            on the first row after a restore: the checkpoint's step

A row goes four ways, each written once per row: rank 0's ``metrics.jsonl`` (what the driver copies from
the final checkpoint), the progress relay to the console and the trackers (rayalign.train.progress), every
checkpoint (the file up to that step), and Ray Train's report (checkpoints, held-out values for Tune).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

STEP = "step"
EPOCH = "epoch"
LR = "lr"
LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGINS = "rewards/margins"
REWARD_ACCURACY = "rewards/accuracies"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
ABSOLUTE_ACCURACY = "pref/absolute_accuracy"
FRAC_IN_U = "pref/frac_in_U"
KL = "kl"
PAIRS_PER_S = "pairs/s"
TOKENS_PER_S = "tokens/s"
PEAK_MEMORY_GIB = "memory/peak_allocated_gib"
PEAK_RSS_GIB = "memory/peak_rss_gib"
ALARM = "alarm"
DISPLACEMENT = "displacement"
ACTION = "action"
RESUMED_FROM_STEP = "resumed_from_step"
EVAL_PREFIX = "eval/"
GENERATION_PREFIX = EVAL_PREFIX + "gen/"

# Each per-pair statistic once, in the order the interval meter sums them (rayalign.train.meter).
PER_PAIR_KEYS = (
    REWARDS_CHOSEN,
    REWARDS_REJECTED,
    REWARDS_MARGINS,
    REWARD_ACCURACY,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    ABSOLUTE_ACCURACY,
    FRAC_IN_U,
    KL,
)
# The per-pair statistics that compare against the reference: unavailable where no reference was scored.
REFERENCE_KEYS = (REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_MARGINS, REWARD_ACCURACY, FRAC_IN_U)
# The statistics of unpaired data (KTO) alone.
UNPAIRED_ONLY_KEYS = (KL,)
RATE_KEYS = (PAIRS_PER_S, TOKENS_PER_S)
# Every logged row of a paired run has these keys (besides step/epoch/lr bookkeeping), but REFERENCE_KEYS where
# none was scored.
METRIC_KEYS = (LOSS, *(key for key in PER_PAIR_KEYS if key not in UNPAIRED_ONLY_KEYS), *RATE_KEYS)
# What a run's summary reports first and last of (with the loss), and the sweep's table abbreviates.
SUMMARY_KEYS = (REWARD_ACCURACY, ABSOLUTE_ACCURACY, FRAC_IN_U, REWARDS_MARGINS)
SHORT_NAMES = {ABSOLUTE_ACCURACY: "abs_acc", REWARD_ACCURACY: "reward_acc", FRAC_IN_U: "frac_in_U"}


def eval_key(key: str) -> str:
    """The held-out twin of a training key: ``eval/<key>``."""
    return EVAL_PREFIX + key


def gen_key(name: str, side: str = "policy") -> str:
    """A generation-based evaluation key: ``eval/gen/<name>`` for the policy (``eval/gen/score``), and
    ``eval/gen/<side>_<name>`` for the other side (``eval/gen/reference_score``)."""
    return GENERATION_PREFIX + (name if side == "policy" else f"{side}_{name}")


# A sweep's objective: which held-out keys it may be, and which way is better. The generation keys are measured
# once, when a trial's training ended (rayalign.evaluation).
OBJECTIVE_MODES: dict[str, Literal["max", "min"]] = {
    eval_key(ABSOLUTE_ACCURACY): "max",
    eval_key(REWARD_ACCURACY): "max",
    eval_key(LOSS): "min",
    eval_key(FRAC_IN_U): "min",
    gen_key("score"): "max",
    gen_key("win_rate"): "max",
}
DEFAULT_OBJECTIVE = eval_key(ABSOLUTE_ACCURACY)


def as_eval(row: Mapping[str, float]) -> dict[str, float]:
    """An interval's statistics as held-out keys (rates dropped: evaluation is not throughput)."""
    return {eval_key(key): value for key, value in row.items() if key not in RATE_KEYS}


def heldout(row: Mapping[str, Any]) -> dict[str, Any]:
    """The held-out values of a row (its ``eval/`` keys)."""
    return {key: value for key, value in row.items() if is_eval(key)}


def is_eval(key: str) -> bool:
    return key.startswith(EVAL_PREFIX)


def alarms(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every row's alarm as ``{"step", "reason"}``, in step order."""
    return [{STEP: row[STEP], "reason": row[ALARM]} for row in rows if ALARM in row]


def actions(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every action the run took on an alarm, as ``{"step", "action"}``, in step order."""
    return [{STEP: row[STEP], ACTION: row[ACTION]} for row in rows if ACTION in row]


class FirstAlarm:
    """Hands on each alarm's reason (pathology, displacement) the first time it is seen, then never again: a
    consumer (console, tracker, log) says it once, not on every later row where it still holds."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def of(self, row: Mapping[str, Any]) -> str | None:
        for key in (ALARM, DISPLACEMENT):
            if key in row and key not in self.seen:
                self.seen.add(key)
                return row[key]
        return None
