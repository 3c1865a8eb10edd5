"""Training metrics: pure per-pair statistics and an interval accumulator.

Beyond the loss, two metrics make DPO's failure mode visible:

    pref/absolute_accuracy   fraction of pairs with δ_θ > 0 (policy prefers y_w outright)
    pref/frac_in_U           fraction with δ_ref < δ_θ < 0 (better than the reference,
                             yet still preferring y_l: the loss can fall here forever)
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from rayalign.losses import margins

# Every logged row has these keys (besides step/epoch bookkeeping).
METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "pref/absolute_accuracy",
    "pref/frac_in_U",
    "pairs/s",
    "tokens/s",
)
_PER_PAIR_KEYS = METRIC_KEYS[1:9]


def preference_stats(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> dict[str, Tensor]:
    """Per-pair values (shape (B,)) of every preference metric; average them to report."""
    h, delta_policy, delta_ref = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    return {
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "rewards/accuracies": (h > 0).float(),
        "logps/chosen": policy_chosen,
        "logps/rejected": policy_rejected,
        "pref/absolute_accuracy": (delta_policy > 0).float(),
        "pref/frac_in_U": ((delta_ref < delta_policy) & (delta_policy < 0)).float(),
    }


class IntervalMeter:
    """Sums per-pair metrics over a logging interval, on the device the metrics are computed on.

    ``add`` never copies to the host (no synchronisation per micro-batch on a GPU); ``reduce`` hands
    the sums to the worker group's all-reduce on that same device, so under NCCL it is a CUDA
    tensor, under gloo a CPU one (see :class:`rayalign.distributed.Collective`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # float64: token counts over a long interval stay exact.
        self.sums = torch.zeros(len(_PER_PAIR_KEYS) + 3, dtype=torch.float64, device=device)  # + loss, pairs, tokens

    def add(self, loss_per_pair: Tensor, stats: dict[str, Tensor], tokens: int) -> None:
        sums = [stats[k].detach().sum() for k in _PER_PAIR_KEYS] + [loss_per_pair.detach().sum()]
        self.sums[:-2] += torch.stack(sums).to(device=self.sums.device, dtype=self.sums.dtype)
        self.sums[-2] += loss_per_pair.numel()
        self.sums[-1] += tokens

    def reduce(
        self,
        started: float,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> dict[str, float]:
        """Averages over every pair seen by every worker since the last reduce; then resets.

        ``all_reduce`` sums a tensor across the worker group and returns the result
        (:meth:`rayalign.distributed.Collective.all_reduce_sum`); None: this process only.
        Rates are per second since ``clock()`` read ``started``, taken once the sums are back on
        the host: on a GPU that read waits for the queued work, so none of it escapes the interval.
        """
        sums = self.sums.clone()
        self.sums.zero_()
        if all_reduce is not None:
            sums = all_reduce(sums)
        values = sums.tolist()
        elapsed_s = clock() - started
        pairs, tokens = values[-2], values[-1]
        row = {"loss": values[-3] / max(pairs, 1)}
        row.update({k: values[i] / max(pairs, 1) for i, k in enumerate(_PER_PAIR_KEYS)})
        row["pairs/s"] = pairs / max(elapsed_s, 1e-9)
        row["tokens/s"] = tokens / max(elapsed_s, 1e-9)
        return row

