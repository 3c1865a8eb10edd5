"""Log-probabilities of response tokens, shared by the reference scorer and training.

Both sides lay pairs out with :func:`rayalign.packing.pack_pairs` from the same token ids and score the
same response tokens, so reference and policy log-probs are aligned token for token.

Only the response tokens reach the output head, and in chunks: the decoder's hidden states are gathered
at the positions that predict a response token (N of them), then ``chunk_tokens`` at a time go through
the head to float32 logits, a log-sum-exp and the target's logit. The (tokens × vocabulary) logits
tensor of a plain forward pass is never formed; with gradients, each chunk's logits are recomputed in
the backward pass instead of being kept, so peak memory is one chunk's logits, not the batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rayalign.models import causal_lm
from rayalign.packing import PackedPairs


def _chunk_logps(hidden: Tensor, target: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class ResponseHead(nn.Module):
    """The output head over the gathered response positions, ``chunk_tokens`` at a time.

    One module call however many chunks: under ZeRO-3 every call of a module gathers its parameters,
    a collective, so a per-chunk call would need the same chunk count on every rank. Marked as a ZeRO-3
    leaf (``deepspeed.utils.set_z3_leaf_modules``), its head's weight is gathered once per forward and
    once more for the backward, where the chunks' logits are recomputed.
    """

    def __init__(self, head: nn.Linear, chunk_tokens: int = 1024):
        super().__init__()
        self.head = head
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        weight, bias = self.head.weight, self.head.bias
        chunks = []
        for h, t in zip(hidden.split(self.chunk_tokens), target.split(self.chunk_tokens)):
            if torch.is_grad_enabled():
                chunks.append(checkpoint(_chunk_logps, h, t, weight, bias, use_reentrant=False))
            else:
                chunks.append(_chunk_logps(h, t, weight, bias))
        return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)


def _check_plain_head(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} transforms its logits ({attr}); rayalign scores plain output heads only"
            )


def response_token_logps(
    model: nn.Module, pairs: PackedPairs, chunk_tokens: int = 1024, head: ResponseHead | None = None
) -> Tensor:
    """log π(y_t | x, y_<t) of every scored response token, shape (N,), float32, in ``pairs.sequence`` order.

    ``head``: the model's output head as a :class:`ResponseHead` (built here when not given).
    """
    model = causal_lm(model)  # under PEFT: the adapted model itself, so its decoder is what runs
    _check_plain_head(model)
    mask = pairs.attention_mask_for(model.config._attn_implementation, model.get_input_embeddings().weight.dtype)
    hidden = model.base_model(
        input_ids=pairs.input_ids,
        attention_mask=mask,
        position_ids=pairs.position_ids,
        use_cache=False,
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[pairs.predictor]
    head = head or ResponseHead(model.get_output_embeddings(), chunk_tokens)
    return head(hidden, pairs.target)


def sequence_logps(
    model: nn.Module, pairs: PackedPairs, chunk_tokens: int = 1024, head: ResponseHead | None = None
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (float32) and scored token counts, each of shape (2B,): chosen, then rejected."""
    per_token = response_token_logps(model, pairs, chunk_tokens, head)
    counts = pairs.counts.to(per_token.device)
    sums = torch.zeros(counts.shape[0], dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, pairs.sequence.to(per_token.device), per_token), counts


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """(2B,) -> (chosen (B,), rejected (B,))."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class PolicyLogps(nn.Module):
    """A causal LM whose forward returns the response log-probs of a :class:`PackedPairs`.

    What DeepSpeed wraps in training, so its engine's forward (ZeRO-3's parameter gathering included)
    runs the chunked head too; ``model`` is the Hugging Face model that is checkpointed and exported.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.head = ResponseHead(causal_lm(model).get_output_embeddings(), chunk_tokens)

    def forward(self, pairs: PackedPairs) -> tuple[Tensor, Tensor]:
        return sequence_logps(self.model, pairs, head=self.head)
