"""How B preference pairs become model input: the three layouts, and where each scored token is predicted.

    padded         2B rows [prompt | response | pad...]: every sequence padded to the longest (what TRL does)
    packed         the 2B sequences [prompt | response] packed into rows of ``row_tokens`` without padding
                   between them; a sequence attends only to itself and its positions restart at 0
    shared_prompt  one segment per pair, [prompt | chosen | rejected], packed the same way; the rejected
                   response attends to the prompt but not to the chosen one, and both responses continue
                   the prompt's positions, so the prompt's forward and backward are computed once

In every layout a response token t is scored from the hidden state of the token before it *in its own
sequence*: in the shared-prompt layout the first rejected token is predicted from the prompt's last token,
not from the chosen response's. :class:`PackedPairs` records that as flat indices (``predictor``), so the
log-prob code (:mod:`rayalign.logprobs`) is the same for all three, and gives the same numbers as the
padded layout up to float rounding. The first token of a sequence has no prediction: with an empty
prompt, scoring starts at the response's second token (as :func:`response_start` says).

Attention (:meth:`PackedPairs.attention_mask_for`): padded rows take the usual (2B, L) padding mask; packed
rows take a (R, 1, L, L) mask (may attend: True for SDPA, 0 for eager, which adds it to its scores), or for
flex attention a block mask of the same rule, under which a whole micro-batch is one row without padding
(:func:`row_width`) and the kernel skips the blocks a sequence does not see.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from rayalign.schema import PROMPT_IDS, RESPONSE_COLUMNS

Layout = Literal["padded", "packed", "shared_prompt"]
LAYOUTS: tuple[str, ...] = ("shared_prompt", "packed", "padded")

_PROMPT, _CHOSEN, _REJECTED = 0, 1, 2  # which part of a segment a position holds


def row_width(row_tokens: int | None, attention: str) -> int | None:
    """The packed row width to use: ``row_tokens`` when set; else the longest segment (None) under a dense
    mask, whose cost grows with the square of the row, or one row per micro-batch under flex attention."""
    if row_tokens is None and attention == "flex_attention":
        return sys.maxsize
    return row_tokens


def response_start(prompt_len: int) -> int:
    """First scored position of a sequence: token 0 has no prediction, so an empty prompt starts at 1."""
    return max(prompt_len, 1)


@dataclass
class PackedPairs:
    """B pairs as model input, plus the scored tokens: N = every scored response token, in sequence order
    (chosen of pair 0, ..., chosen of pair B-1, rejected of pair 0, ...), each sequence's tokens in order."""

    input_ids: Tensor  # (R, L) long
    position_ids: Tensor  # (R, L) long
    segment_ids: Tensor  # (R, L) long: the segment of each position (padding: a negative id of its own)
    part_ids: Tensor  # (R, L) long: prompt, chosen or rejected
    layout: Layout
    predictor: Tensor  # (N,) long: flat index (row * L + column) of the hidden state that predicts each token
    target: Tensor  # (N,) long: the token
    sequence: Tensor  # (N,) long: 0..B-1 chosen, B..2B-1 rejected
    counts: Tensor  # (2B,) long: scored tokens per sequence
    real_tokens: int  # positions that hold a token (what the forward pass pays for, beside padding)

    @property
    def num_pairs(self) -> int:
        return self.counts.shape[0] // 2

    @property
    def computed_tokens(self) -> int:
        """Positions the forward pass computes, padding included."""
        return self.input_ids.numel()

    @property
    def attention_mask(self) -> Tensor:
        """(R, L) long for the padded layout, else (R, 1, L, L) bool: a position attends to the earlier
        positions of its own segment, and a rejected response never to its pair's chosen one.

        Built from the (R, L) ids where they are, so after :meth:`to` the L×L mask is made on the device
        rather than copied to it every micro-batch.
        """
        if self.layout == "padded":
            return (self.segment_ids >= 0).long()
        segment, part, width = self.segment_ids, self.part_ids, self.segment_ids.shape[1]
        same_segment = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
        rejected_sees_chosen = (part[:, :, None] == _REJECTED) & (part[:, None, :] == _CHOSEN)
        return (same_segment & causal & ~rejected_sees_chosen).unsqueeze(1)

    def attention_mask_for(self, implementation: str, dtype: torch.dtype):
        """:attr:`attention_mask` in the form ``implementation`` (transformers' name) takes: as is for
        SDPA; additive (0 or the dtype's lowest) for eager; a flex-attention ``BlockMask`` of the same rule."""
        if self.layout == "padded":
            return self.attention_mask
        if implementation == "flex_attention":
            return self._block_mask()
        mask = self.attention_mask
        if implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    def _block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        segment, part = self.segment_ids, self.part_ids

        def may_attend(row, head, query, key):
            rejected_sees_chosen = (part[row, query] == _REJECTED) & (part[row, key] == _CHOSEN)
            return (segment[row, query] == segment[row, key]) & (key <= query) & ~rejected_sees_chosen

        rows, width = segment.shape
        # Compiled, the rule is evaluated block by block: the dense L×L mask is never formed (as transformers does).
        return create_block_mask(
            may_attend, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment.device, _compile=True
        )

    def to(self, device: torch.device | str) -> PackedPairs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedPairs(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()})


@dataclass
class _Segment:
    """One packed unit: its tokens, their positions and parts, and its scored tokens' (offset, token, sequence)."""

    ids: list[int]
    positions: list[int]
    parts: list[int]
    scored: list[tuple[int, int, int]]  # (offset of the predicting token in the segment, target token, sequence)


def _plain_segment(prompt: list[int], response: list[int], sequence: int) -> _Segment:
    ids = prompt + response
    scored = [(t - 1, ids[t], sequence) for t in range(response_start(len(prompt)), len(ids))]
    parts = [_PROMPT] * len(prompt) + [_CHOSEN] * len(response)
    return _Segment(ids, list(range(len(ids))), parts, scored)


def _shared_segment(prompt: list[int], chosen: list[int], rejected: list[int], pair: int, num_pairs: int) -> _Segment:
    p, c = len(prompt), len(chosen)
    ids = prompt + chosen + rejected
    positions = list(range(p + c)) + list(range(p, p + len(rejected)))
    parts = [_PROMPT] * p + [_CHOSEN] * c + [_REJECTED] * len(rejected)
    scored = []
    for first, response, sequence in ((p, chosen, pair), (p + c, rejected, num_pairs + pair)):
        for k in range(len(response)):
            if p + k < response_start(p):  # no token before it in its own sequence
                continue
            # The token before response[k] in its own sequence: the previous response token, or the prompt's last.
            before = first + k - 1 if k > 0 else p - 1
            scored.append((before, response[k], sequence))
    return _Segment(ids, positions, parts, scored)


def _segments(batch: Mapping[str, Sequence[Sequence[int]]], layout: Layout) -> list[_Segment]:
    prompts = [[int(t) for t in p] for p in batch[PROMPT_IDS]]
    chosen, rejected = ([[int(t) for t in r] for r in batch[column]] for column in RESPONSE_COLUMNS)
    b = len(prompts)
    if layout == "shared_prompt":
        return [_shared_segment(prompts[i], chosen[i], rejected[i], i, b) for i in range(b)]
    return [
        _plain_segment(prompts[i], responses[i], s * b + i)
        for s, responses in enumerate((chosen, rejected))
        for i in range(b)
    ]


def _rows(segments: list[_Segment], layout: Layout, row_tokens: int | None) -> list[list[int]]:
    """Segment indices per row: one per row when padded; else first-fit by decreasing length into rows as
    wide as the longest segment (or ``row_tokens``, when larger), so little is left over to pad."""
    if layout == "padded":
        return [[i] for i in range(len(segments))]
    capacity = max(row_tokens or 0, max(len(s.ids) for s in segments))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(segments)), key=lambda i: -len(segments[i].ids)):
        size = len(segments[i].ids)
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= size
    return rows


def pack_pairs(
    batch: Mapping[str, Sequence[Sequence[int]]], layout: Layout, pad_id: int, row_tokens: int | None = None
) -> PackedPairs:
    """Lay out the token columns of B rows (:mod:`rayalign.schema`) as model input; see the module's docstring.

    ``row_tokens``: width of a packed row; None (or less than the longest segment): the longest segment's.
    Attention costs each row the square of its width, so wider rows trade attention for fewer rows.
    """
    segments = _segments(batch, layout)
    rows = _rows(segments, layout, row_tokens)
    width = max(sum(len(segments[i].ids) for i in row) for row in rows)
    num_rows = len(rows)
    input_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    # Per position: its segment (padding: a segment of its own, so no query is left without a key) and part.
    segment_of = -1 - torch.arange(width).repeat(num_rows, 1)
    part_of = torch.full((num_rows, width), _PROMPT, dtype=torch.long)
    scored: list[tuple[int, int, int]] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            seg = segments[i]
            end = start + len(seg.ids)
            input_ids[r, start:end] = torch.tensor(seg.ids)
            position_ids[r, start:end] = torch.tensor(seg.positions)
            segment_of[r, start:end] = i
            part_of[r, start:end] = torch.tensor(seg.parts)
            scored += [(r * width + start + offset, token, sequence) for offset, token, sequence in seg.scored]
            start = end
    scored.sort(key=lambda s: s[2])  # sequence order; stable, so each sequence's tokens stay in order
    predictor, target, sequence = (torch.tensor([s[k] for s in scored], dtype=torch.long) for k in range(3))
    counts = torch.bincount(sequence, minlength=len(batch[PROMPT_IDS]) * 2)
    real_tokens = sum(len(s.ids) for s in segments)

    return PackedPairs(
        input_ids, position_ids, segment_of, part_of, layout, predictor, target, sequence, counts, real_tokens
    )
