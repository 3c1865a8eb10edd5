"""How a worker's pairs become optimizer steps, and a step's pairs become micro-batches.

An optimizer step takes ``micro_batch_size × gradient_accumulation_steps`` pairs on every worker, and
its loss is the mean over all of them (every worker holds as many pairs: Ray Train splits the stream
equally). How those pairs are split into forward passes is the only thing the token budget changes:

    fixed pairs    (``train.tokens_per_batch`` unset) ``gradient_accumulation_steps`` micro-batches of
                   ``micro_batch_size`` consecutive pairs
    token budget   as few micro-batches as hold at most ``tokens_per_batch`` computed tokens each, in
                   the layout in use (a pair longer than the budget goes alone), of about equal size:
                   as many pairs as fit, so memory stays flat whatever the lengths

Under a token budget every worker must still run the same number of micro-batches: ZeRO-2 reduces
gradients, and ZeRO-3 gathers parameters, in every forward and backward, so a worker with one micro-batch
more would wait for the others forever. The workers agree on the largest count (one all-reduce of a
number per step), and a worker that needs fewer splits its fullest micro-batches further.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from rayalign.config import RunConfig, TrainConfig
from rayalign.packing import LAYOUTS, pack_pairs, row_width
from rayalign.schema import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS, ROW, SOURCE, TOKEN_COLUMNS
from rayalign.train.steps import pairs_per_step


def pair_tokens(batch: Mapping[str, Sequence[Sequence[int]]], layout: str) -> list[int]:
    """Positions each pair of ``batch`` computes in ``layout`` (padding aside): shared_prompt computes the
    prompt once, packed once per response. Padded rows depend on their neighbours: no budget applies."""
    if layout not in ("shared_prompt", "packed"):
        raise ValueError(f"a token budget needs a packed layout, not {layout!r}")
    prompt_copies = 1 if layout == "shared_prompt" else 2
    return [
        prompt_copies * len(p) + len(c) + len(r)
        for p, c, r in zip(batch[PROMPT_IDS], batch[CHOSEN_IDS], batch[REJECTED_IDS])
    ]


def _balanced(tokens: Sequence[int], count: int) -> list[list[int]]:
    """Longest pair first, each into the micro-batch holding the fewest tokens so far (LPT scheduling):
    micro-batches of about equal size, each a mix of long and short pairs, which pack into rows of the
    longest one's width with little padding (sorted runs of similar lengths would not share rows)."""
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(range(len(tokens)), key=lambda i: -tokens[i]):
        emptiest = min(range(count), key=loads.__getitem__)
        groups[emptiest].append(i)
        loads[emptiest] += tokens[i]
    return [g for g in groups if g]


def _split_fullest(groups: list[list[int]], tokens: Sequence[int], count: int) -> list[list[int]]:
    """Split the micro-batches holding the most tokens in two until there are ``count`` of them."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        fullest = max((g for g in groups if len(g) > 1), key=lambda g: sum(tokens[i] for i in g), default=None)
        if fullest is None:
            raise ValueError(f"cannot make {count} micro-batches of {len(tokens)} pairs")
        groups.remove(fullest)
        groups += [fullest[0::2], fullest[1::2]]  # sorted by size already: the halves come out even
    return groups


def micro_batch_groups(
    tokens: Sequence[int],
    micro_batch_size: int,
    tokens_per_batch: int | None,
    agree: Callable[[int], int] = lambda count: count,
) -> list[list[int]]:
    """The micro-batches of one optimizer step's pairs, as indices into them (each in the pairs' order).

    ``tokens``: each pair's computed tokens (:func:`pair_tokens`; only read with a budget).
    ``agree``: every worker's largest micro-batch count, given this one's (an all-reduce max); only
    called with a budget, since fixed micro-batches already agree.
    """
    if tokens_per_batch is None:
        return [list(range(i, min(i + micro_batch_size, len(tokens)))) for i in range(0, len(tokens), micro_batch_size)]
    count = min(len(tokens), max(1, math.ceil(sum(tokens) / tokens_per_batch)))
    while True:  # ends by count = len(tokens) at the latest: one pair per micro-batch
        groups = _balanced(tokens, count)
        if all(len(g) == 1 or sum(tokens[i] for i in g) <= tokens_per_batch for g in groups):
            break
        count += 1
    groups = _split_fullest(groups, tokens, agree(len(groups)))
    return [sorted(g) for g in groups]


@dataclass(frozen=True)
class MicroBatching:
    """How one optimizer step's pairs are split into forward passes: ``micro_batch_size`` pairs each, or as
    many as fit ``tokens_per_batch`` computed tokens in ``layout`` (see the module docstring)."""

    layout: str
    micro_batch_size: int
    tokens_per_batch: int | None = None

    @classmethod
    def of(cls, train: TrainConfig) -> MicroBatching:
        """The run's own: ``train.packing.layout``, ``train.micro_batch_size``, ``train.tokens_per_batch``."""
        return cls(train.packing.layout, train.micro_batch_size, train.tokens_per_batch)

    def groups(
        self, batch: Mapping[str, Sequence[Sequence[int]]], agree: Callable[[int], int] = lambda count: count
    ) -> list[list[int]]:
        """:func:`micro_batch_groups` of one step's ``batch``, its pairs' tokens counted under a budget."""
        tokens = pair_tokens(batch, self.layout) if self.tokens_per_batch else [0] * len(batch[PROMPT_IDS])
        return micro_batch_groups(tokens, self.micro_batch_size, self.tokens_per_batch, agree)


def take(batch: Mapping[str, Any], indices: Sequence[int]) -> dict[str, Any]:
    """The rows ``indices`` of a columnar batch (numpy arrays or lists)."""
    picked = np.asarray(indices, dtype=np.int64)
    return {
        key: (column[picked] if isinstance(column, np.ndarray) else [column[i] for i in indices])
        for key, column in batch.items()
    }


def heldout_share(batches: Iterable[Mapping[str, Any]], rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """This worker's share of the held-out pairs, which every worker reads whole: a pair goes to the worker
    its (file name, row) hashes to, so each is evaluated exactly once whatever the worker count or the order
    the batches come in. (An equal split would drop the remainder: one held-out pair and two workers would
    evaluate nothing.)"""
    for batch in batches:
        keys = zip(batch[SOURCE], batch[ROW])
        mine = [
            i
            for i, (source, row) in enumerate(keys)
            if zlib.crc32(f"{PurePath(str(source)).name}:{int(row)}".encode()) % world_size == rank
        ]
        if mine:
            yield take(batch, mine)


@dataclass(frozen=True)
class LayoutCost:
    """What training will pay for, measured on a sample of the data before it starts: the pre-flight line."""

    layout: str  # the one in use
    attention: str
    sample_pairs: int
    micro_batch_size: int
    tokens_per_batch: int | None
    passes_per_step: float  # forward passes (micro-batches) per optimizer step per worker, in the layout in use
    computed_tokens_per_pair: dict[str, float]  # per layout, padding included
    padding_share: dict[str, float]  # per layout: padding / computed positions
    tokens_per_step: float  # computed positions per optimizer step, all workers, in the layout in use

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        per_pair = self.computed_tokens_per_pair
        passes = (
            f"{self.passes_per_step:.1f} passes of ≤{self.tokens_per_batch} tokens per step"
            if self.tokens_per_batch
            else f"{self.micro_batch_size} pairs per pass"
        )
        return (
            f"layout {self.layout} ({self.attention} attention, {passes}): {per_pair[self.layout]:.0f} tokens "
            f"computed per pair, {self.padding_share[self.layout]:.0%} of them padding; padded would compute "
            f"{per_pair['padded']:.0f} ({self.padding_share['padded']:.0%} padding); "
            f"{self.tokens_per_step:.0f} tokens per optimizer step (sample of {self.sample_pairs} pairs)"
        )


def layout_cost(rows: Sequence[Mapping[str, Sequence[int]]], cfg: RunConfig, pad_id: int) -> LayoutCost:
    """Lay ``rows`` (token columns of consecutive pairs) out as a worker of the run ``cfg`` would, a step's pairs
    at a time in micro-batches (:func:`micro_batch_groups`), in every layout (padded ones in micro_batch_size
    pairs), and count."""
    train, attention, num_workers = cfg.train, cfg.model.attn_implementation, cfg.scaling.num_workers
    per_step = pairs_per_step(train)
    steps = [{k: [r[k] for r in rows[i : i + per_step]] for k in TOKEN_COLUMNS} for i in range(0, len(rows), per_step)]
    computed, padding, passes = {}, {}, {}
    for layout in LAYOUTS:
        budget = None if layout == "padded" else train.tokens_per_batch
        total = real = micro_batches = 0
        for step in steps:
            for group in MicroBatching(layout, train.micro_batch_size, budget).groups(step):
                packed = pack_pairs(take(step, group), layout, pad_id, row_width(train.packing.row_tokens, attention))
                total, real, micro_batches = (
                    total + packed.computed_tokens,
                    real + packed.real_tokens,
                    micro_batches + 1,
                )
        computed[layout] = total / max(len(rows), 1)
        padding[layout] = 1 - real / total if total else 0.0
        passes[layout] = micro_batches / max(len(steps), 1)
    in_use = train.packing.layout
    return LayoutCost(
        in_use,
        attention,
        len(rows),
        train.micro_batch_size,
        train.tokens_per_batch,
        passes[in_use],
        computed,
        padding,
        computed[in_use] * per_step * num_workers,
    )
