"""Sequence log-probabilities of responses, shared by the reference scorer and training.

Both sides build the same [chosen; rejected] batch from the same token ids and
mask the same response tokens, so reference and policy log-probs are aligned
token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor


@dataclass
class PairBatch:
    """B pairs as 2B right-padded sequences: rows [0, B) chosen, [B, 2B) rejected."""

    input_ids: Tensor  # (2B, T) long
    attention_mask: Tensor  # (2B, T) long
    response_mask: Tensor  # (2B, T) bool: True on response tokens

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask)))


def collate_pairs(batch: Mapping[str, Sequence[Sequence[int]]], pad_id: int) -> PairBatch:
    """Build a PairBatch from columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``."""
    sequences, prompt_lens = [], []
    for response_key in ("chosen_ids", "rejected_ids"):
        for prompt, response in zip(batch["prompt_ids"], batch[response_key]):
            sequences.append([*prompt, *response])
            prompt_lens.append(len(prompt))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        input_ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, prompt_len : len(seq)] = True
    return PairBatch(input_ids, attention_mask, response_mask)


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
