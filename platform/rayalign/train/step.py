"""The training step: pairs in, the objective's terms and one optimizer step out.

:class:`PreferenceStep` is built once per worker (:meth:`PreferenceStep.of_plan`) from the settings that stay
fixed for a run: the loss, the batching and packing, the pad id, the device, the attention implementation and
where the reference comes from. Training, held-out evaluation, the GPU checks and ``bench/packing.py`` call
the same object, so none of them writes the step again. Its parts are named ranges in a ``torch.profiler`` trace
(``rayalign.pack``, ``rayalign.policy_logps``, ``rayalign.backward``, ``rayalign.optimizer_step``; see
``bench/profile_step.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from rayalign.config import LossConfig, TrainConfig
from rayalign.distributed import Collective
from rayalign.logprobs import split_pairs
from rayalign.loss_specs import takes_unpaired
from rayalign.losses import ObjectiveTerms, PairLogps, objective
from rayalign.metrics import as_eval
from rayalign.packing import pack_pairs, row_width
from rayalign.schema import CHOSEN_IDS, DESIRABLE, PROMPT_IDS, REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, REJECTED_IDS
from rayalign.train.batching import MicroBatching, take
from rayalign.train.meter import IntervalMeter


@dataclass(frozen=True)
class ScoredMicroBatch:
    """One forward pass: the objective's per-pair terms, and the positions it computed (``real_tokens``
    without padding, a shared prompt once; ``computed_tokens`` with padding)."""

    terms: ObjectiveTerms
    real_tokens: int
    computed_tokens: int


def adapters_off_logps(policy, pairs) -> Tensor:
    """The reference's response log-probs from the policy itself: its LoRA adapters disabled (the
    frozen base weights), in eval mode, without gradients. ``policy``: a :class:`PolicyLogps` around
    a PEFT model, or the DeepSpeed engine around one (ZeRO-3 gathers the base weights as for training)."""
    module = getattr(policy, "module", policy)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), module.model.disable_adapter():
            logps, _ = policy(pairs)
    finally:
        module.train(was_training)
    return logps


@dataclass(frozen=True)
class PreferenceStep:
    """Scores micro-batches with the configured objective and steps a DeepSpeed engine.

    ``batching``: the run's ``train`` section (micro-batch size, token budget, packing layout and row width).
    ``reference_in_worker``: batches carry no reference columns; the policy scores them with its adapters
    off (``reference.backend: adapters_off``). Batches without reference columns (a loss that needs none,
    :mod:`rayalign.loss_specs`) are scored without. Everything stays on ``device``; the loss maths is float32
    whatever the model's dtype."""

    loss: LossConfig
    batching: TrainConfig
    pad_id: int
    device: torch.device
    attention: str = "sdpa"
    reference_in_worker: bool = False

    def score(self, policy, batch: dict[str, Any]) -> ScoredMicroBatch:
        """The objective's terms for one micro-batch (laid out as ``train.packing``). ``policy``: a
        :class:`rayalign.logprobs.PolicyLogps`, or the DeepSpeed engine around one. The reference columns
        (float64 from the actors) are cast to the log-probs' dtype on the device, with no host synchronisation."""
        packing = self.batching.packing
        with record_function("rayalign.pack"):
            pairs = pack_pairs(batch, packing.layout, self.pad_id, row_width(packing.row_tokens, self.attention))
            computed = pairs.computed_tokens
            pairs = pairs.to(self.device)
        ref_chosen = ref_rejected = None  # a loss that needs no reference, on pairs scored by none
        if self.reference_in_worker:
            with record_function("rayalign.reference_adapters_off"):
                ref_chosen, ref_rejected = split_pairs(adapters_off_logps(policy, pairs))
        with record_function("rayalign.policy_logps"):
            logps, counts = policy(pairs)
        if not self.reference_in_worker and REF_CHOSEN_LOGPS in batch:
            ref_chosen = torch.as_tensor(batch[REF_CHOSEN_LOGPS], device=self.device).to(logps.dtype)
            ref_rejected = torch.as_tensor(batch[REF_REJECTED_LOGPS], device=self.device).to(logps.dtype)
        policy_chosen, policy_rejected = split_pairs(logps)
        chosen_tokens, rejected_tokens = split_pairs(counts)
        desirable = None  # unpaired rows' labels (rayalign.schema)
        if DESIRABLE in batch:
            desirable = torch.as_tensor(batch[DESIRABLE], dtype=torch.bool, device=self.device)
        terms = objective(
            self.loss,
            PairLogps(
                policy_chosen,
                policy_rejected,
                ref_chosen=ref_chosen,
                ref_rejected=ref_rejected,
                chosen_tokens=chosen_tokens,
                rejected_tokens=rejected_tokens,
                desirable=desirable,
            ),
        )
        return ScoredMicroBatch(terms, pairs.real_tokens, computed)

    def micro_batches(self, batch: dict[str, Any], agree_count: Callable[[int], int]) -> list[dict[str, Any]]:
        """One optimizer step's ``batch`` as the forward passes it is split into (:mod:`rayalign.train.batching`);
        ``agree_count``: the largest of every worker's pass count (an all-reduce max)."""
        return [take(batch, group) for group in MicroBatching.of(self.batching).groups(batch, agree_count)]

    def optimizer_step(
        self, engine, batch: dict[str, Any], agree_count: Callable[[int], int]
    ) -> list[ScoredMicroBatch]:
        """Forward and backward over the micro-batches of one step's ``batch``, then one DeepSpeed optimizer step.

        The step's loss is the mean over its pairs whatever the micro-batches hold: each backward takes its
        pairs' summed loss over the step's pair count (DeepSpeed averages the workers', which hold as many
        pairs each). The accumulation boundary is set by hand because the micro-batch count varies by step."""
        num_pairs = len(batch[PROMPT_IDS])
        parts = self.micro_batches(batch, agree_count)
        done = []
        for index, part in enumerate(parts):
            engine.set_gradient_accumulation_boundary(index == len(parts) - 1)
            scored = self.score(engine, part)
            with record_function("rayalign.backward"):
                engine.backward(scored.terms.loss.sum() / num_pairs, scale_wrt_gas=False)
            done.append(scored)
        with record_function("rayalign.optimizer_step"):
            engine.step()
        return done

    def evaluate(self, policy, batches: Iterable[dict[str, Any]], collective: Collective) -> dict[str, float]:
        """The training metrics on the held-out ``batches`` (``eval/`` keys), averaged over every worker's share.

        Under ZeRO-3 every forward pass gathers the parameters from every worker, so the workers run their passes
        in lockstep: one whose share has run out (shares differ, and may be empty) scores a stand-in pair and
        drops the result, until no worker has a batch left. Otherwise the one with more passes would wait in a
        gather that the others never join."""
        meter = IntervalMeter(self.device)
        start = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            batches = iter(batches)
            while True:
                batch = next(batches, None)
                if self.batching.zero_stage == 3 and collective.all_reduce_max(int(batch is not None)) == 1:
                    batch = batch or self.stand_in_pair
                elif batch is None:
                    break
                scored = self.score(policy, batch)
                if batch is not self.stand_in_pair:
                    meter.add(scored.terms, scored.real_tokens, self.loss.beta)
        policy.train()
        return as_eval(meter.reduce(start, all_reduce=collective.all_reduce_sum))

    @cached_property
    def stand_in_pair(self) -> dict[str, Any]:
        """One pair of pad tokens, with reference columns (and a label, for an unpaired loss): a forward pass like
        any other whose result is dropped."""
        pad = [[self.pad_id]]
        pair = {PROMPT_IDS: pad, CHOSEN_IDS: pad, REJECTED_IDS: pad, REF_CHOSEN_LOGPS: [0.0], REF_REJECTED_LOGPS: [0.0]}
        return {**pair, DESIRABLE: [True]} if takes_unpaired(self.loss.type) else pair
