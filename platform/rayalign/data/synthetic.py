"""Synthetic preference tasks with known ground truth.

The default run and the tests use data the project makes itself: the chosen
response is correct by construction and the rejected one is wrong, so every
metric has a known right answer.
"""

from __future__ import annotations

import json
import random

from rayalign.config import SyntheticDataConfig


def arithmetic_pairs(
    num_pairs: int, seed: int, max_operand: int = 4, wrong_offset: int | None = None, label_noise: float = 0.0
) -> list[dict[str, str]]:
    """Addition of operands in [0, max_operand]: chosen is the true sum, rejected is wrong.

    The wrong answer is off by a random 1-3, or by ``wrong_offset`` always (a systematic
    error a model can learn, used to build a reference that prefers the wrong answers).
    With ``label_noise`` = p, a share p of pairs has its labels flipped, as with noisy
    human raters (the population DPO optimum is then finite: δ* = δ_ref + logit(1−p)/β).
    Small operand ranges keep the task learnable by a 2-layer model in a few dozen steps.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        answer = a + b
        offset = wrong_offset if wrong_offset is not None else rng.choice([-1, 1]) * rng.randint(1, 3)
        wrong = answer + offset
        if wrong < 0 or wrong == answer:
            wrong = answer + abs(offset) + (offset == 0)  # keep it a non-negative, wrong answer
        chosen, rejected = (wrong, answer) if label_noise and rng.random() < label_noise else (answer, wrong)
        pairs.append({"prompt": f"Q: {a}+{b}=?\nA:", "chosen": f" {chosen}", "rejected": f" {rejected}"})
    return pairs


def generate(cfg: SyntheticDataConfig) -> list[dict[str, str]]:
    if cfg.task == "arithmetic":
        return arithmetic_pairs(cfg.num_pairs, cfg.seed, cfg.max_operand, cfg.wrong_offset, cfg.label_noise)
    raise ValueError(f"unknown synthetic task {cfg.task!r}")


def to_jsonl(records: list[dict]) -> str:
    """Records as JSON Lines text (one object a line)."""
    return "".join(json.dumps(record) + "\n" for record in records)
