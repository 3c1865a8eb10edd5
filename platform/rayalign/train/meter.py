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

from rayalign.losses import ObjectiveTerms, kto_reference_point, margins
from rayalign.metrics import (
    ABSOLUTE_ACCURACY,
    FRAC_IN_U,
    KL,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS,
    PAIRS_PER_S,
    PER_PAIR_KEYS,
    REWARD_ACCURACY,
    REWARDS_CHOSEN,
    REWARDS_MARGINS,
    REWARDS_REJECTED,
    TOKENS_PER_S,
)


def preference_stats(
    compared: tuple[Tensor, Tensor, Tensor | None, Tensor | None], beta: float, desirable: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-pair values (shape (B,)) of every preference statistic; average them to report, NaN where a row has
    none. ``compared``: (log π_θ(y_w), log π_θ(y_l), log π_ref(y_w), log π_ref(y_l)), each (B,), as the objective
    compared them (:attr:`rayalign.losses.ObjectiveTerms.compared`). Without the reference's (None), only the
    policy's statistics: the :data:`rayalign.metrics.REFERENCE_KEYS` are left out. Unpaired rows (``desirable``
    given; KTO's) have no preference: the rewards and log-probs of their desirable completions (``/chosen``) and
    undesirable ones (``/rejected``), and the KL estimate z_0, as TRL's KTOTrainer reports them."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = compared
    if desirable is not None:
        return _unpaired_stats(compared, beta, desirable)
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


def _unpaired_stats(
    compared: tuple[Tensor, Tensor, Tensor | None, Tensor | None], beta: float, desirable: Tensor
) -> dict[str, Tensor]:
    policy, policy_kl, ref, ref_kl = compared  # completion y and KL completion y' (rayalign.schema)
    reward = beta * (policy - ref)
    nan = torch.full_like(reward, float("nan"))
    return {
        REWARDS_CHOSEN: torch.where(desirable, reward, nan),
        REWARDS_REJECTED: torch.where(desirable, nan, reward),
        LOGPS_CHOSEN: torch.where(desirable, policy, nan),
        LOGPS_REJECTED: torch.where(desirable, nan, policy),
        KL: kto_reference_point(policy_kl, ref_kl).expand_as(reward),
    }


class IntervalMeter:
    """Sums per-pair metrics over a logging interval, on the device the metrics are computed on.

    ``add`` never copies to the host (no synchronisation per micro-batch on a GPU); ``reduce`` hands
    the sums to the worker group's all-reduce on that same device, so under NCCL it is a CUDA
    tensor, under gloo a CPU one (see :class:`rayalign.distributed.Collective`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # float64: token counts over a long interval stay exact. Each statistic's sum and the rows it had a value
        # for (a statistic no row had, e.g. one that needs the reference, is left out); then loss, rows, tokens.
        self.sums = torch.zeros(2 * len(PER_PAIR_KEYS) + 3, dtype=torch.float64, device=device)

    def add(self, terms: ObjectiveTerms, tokens: int, beta: float) -> None:
        """One micro-batch: its per-pair loss and statistics (:func:`preference_stats` at ``beta``), and the
        ``tokens`` its forward pass computed."""
        stats = preference_stats(terms.compared, beta, terms.desirable)
        loss = terms.loss.detach()
        values = torch.stack(
            [stats[k].detach() if k in stats else torch.full_like(loss, torch.nan) for k in PER_PAIR_KEYS]
        )
        values = values.to(device=self.sums.device, dtype=self.sums.dtype)
        keys = len(PER_PAIR_KEYS)
        self.sums[:keys] += values.nansum(dim=1)
        self.sums[keys : 2 * keys] += (~values.isnan()).sum(dim=1)
        self.sums[-3] += loss.sum().to(self.sums.dtype)
        self.sums[-2] += loss.numel()
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
        loss, pairs, tokens = values[-3:]
        keys = len(PER_PAIR_KEYS)
        row = {LOSS: loss / max(pairs, 1)}
        for key, total, count in zip(PER_PAIR_KEYS, values[:keys], values[keys : 2 * keys]):
            if count > 0:  # else unavailable (no reference, or unpaired data): left out, never written as 0
                row[key] = total / count
        row[PAIRS_PER_S] = pairs / max(elapsed_s, 1e-9)
        row[TOKENS_PER_S] = tokens / max(elapsed_s, 1e-9)
        return row
