"""Sequence log-probabilities of responses, shared by the reference scorer and training.

Both sides build the same [chosen; rejected] batch (:func:`rayalign.schema.collate_pairs`)
from the same token ids and mask the same response tokens, so reference and policy log-probs are aligned
token for token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rayalign.schema import PairBatch


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_t | x_<t) for t >= 1, shape (N, T-1); avoids a full log-softmax tensor copy."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response token counts, each of shape (2B,)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    per_token = token_logps(logits, batch.input_ids)
    mask = batch.response_mask[:, 1:]
    return (per_token * mask).sum(-1), mask.sum(-1)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """(2B,) -> (chosen (B,), rejected (B,))."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
