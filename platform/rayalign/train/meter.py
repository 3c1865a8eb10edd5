"""Training metrics on a worker: pure per-pair statistics and an interval accumulator.

The keys, and what each means, are in :mod:`rayalign.metrics`. Beyond the loss, two of them make DPO's
failure mode visible: ``pref/absolute_accuracy`` (δ_θ > 0, the policy prefers y_w outright) and
``pref/frac_in_U`` (δ_ref < δ_θ < 0: better than the reference, yet still preferring y_l, where the loss can
fall forever).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from rayalign.losses import ObjectiveTerms, margins
from rayalign.metrics import (
    ABSOLUTE_ACCURACY,
    FRAC_IN_U,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS,
    PAIRS_PER_S,
    PER_PAIR_KEYS,
    REFERENCE_KEYS,
    REWARD_ACCURACY,
    REWARDS_CHOSEN,
    REWARDS_MARGINS,
    REWARDS_REJECTED,
    TOKENS_PER_S,
)


def preference_stats(compared: tuple[Tensor, Tensor, Tensor | None, Tensor | None], beta: float) -> dict[str, Tensor]:
    """Per-pair values (shape (B,)) of every preference statistic; average them to report.
    ``compared``: (log π_θ(y_w), log π_θ(y_l), log π_ref(y_w), log π_ref(y_l)), each (B,), as the objective
    compared them (:attr:`rayalign.losses.ObjectiveTerms.compared`). Without the reference's (None), only the
    policy's statistics: the :data:`rayalign.metrics.REFERENCE_KEYS` are left out."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = compared
    if ref_chosen is None or ref_rejected is None:
        delta_policy = policy_chosen - policy_rejected
        return {
            LOGPS_CHOSEN: policy_chosen,
            LOGPS_REJECTED: policy_rejected,
            ABSOLUTE_ACCURACY: (delta_policy > 0).float(),
        }
    h, delta_policy, delta_ref = margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    return {
        REWARDS_CHOSEN: reward_chosen,
        REWARDS_REJECTED: reward_rejected,
        REWARDS_MARGINS: reward_chosen - reward_rejected,
        REWARD_ACCURACY: (h > 0).float(),
        LOGPS_CHOSEN: policy_chosen,
        LOGPS_REJECTED: policy_rejected,
        ABSOLUTE_ACCURACY: (delta_policy > 0).float(),
        FRAC_IN_U: ((delta_ref < delta_policy) & (delta_policy < 0)).float(),
    }


class IntervalMeter:
    """Sums per-pair metrics over a logging interval, on the device the metrics are computed on.

    ``add`` never copies to the host (no synchronisation per micro-batch on a GPU); ``reduce`` hands
    the sums to the worker group's all-reduce on that same device, so under NCCL it is a CUDA
    tensor, under gloo a CPU one (see :class:`rayalign.distributed.Collective`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # float64: token counts over a long interval stay exact.
        # The statistics, then the loss, the pairs, the pairs scored with a reference, the tokens.
        self.sums = torch.zeros(len(PER_PAIR_KEYS) + 4, dtype=torch.float64, device=device)

    def add(self, terms: ObjectiveTerms, tokens: int, beta: float) -> None:
        """One micro-batch: its per-pair loss and statistics (:func:`preference_stats` at ``beta``), and the
        ``tokens`` its forward pass computed."""
        stats = preference_stats(terms.compared, beta)
        zero = terms.loss.detach().new_zeros(())
        sums = [stats[k].detach().sum() if k in stats else zero for k in PER_PAIR_KEYS] + [terms.loss.detach().sum()]
        self.sums[:-3] += torch.stack(sums).to(device=self.sums.device, dtype=self.sums.dtype)
        self.sums[-3] += terms.loss.numel()
        if REWARD_ACCURACY in stats:
            self.sums[-2] += terms.loss.numel()
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
        pairs, with_reference, tokens = values[-3], values[-2], values[-1]
        row = {LOSS: values[-4] / max(pairs, 1)}
        for i, key in enumerate(PER_PAIR_KEYS):
            if key not in REFERENCE_KEYS:
                row[key] = values[i] / max(pairs, 1)
            elif with_reference > 0:  # else unavailable: left out, never written as 0
                row[key] = values[i] / with_reference
        row[PAIRS_PER_S] = pairs / max(elapsed_s, 1e-9)
        row[TOKENS_PER_S] = tokens / max(elapsed_s, 1e-9)
        return row
