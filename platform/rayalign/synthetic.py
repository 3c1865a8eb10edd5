"""Synthetic preference tasks with known ground truth.

The default run and the tests use data the project makes itself: the chosen
response is correct by construction and the rejected one is wrong, so every
metric has a known right answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rayalign.config import SyntheticDataConfig


def arithmetic_pairs(num_pairs: int, seed: int, max_operand: int = 4) -> list[dict[str, str]]:
    """Addition of operands in [0, max_operand]: chosen is the true sum, rejected is off by 1-3.

    Small operand ranges keep the task learnable by a 2-layer model in a few dozen steps.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        answer = a + b
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 3)
        if wrong < 0:
            wrong = answer + (answer - wrong)  # mirror to keep it a non-negative wrong answer
        pairs.append({"prompt": f"Q: {a}+{b}=?\nA:", "chosen": f" {answer}", "rejected": f" {wrong}"})
    return pairs


def generate(cfg: SyntheticDataConfig) -> list[dict[str, str]]:
    if cfg.task == "arithmetic":
        return arithmetic_pairs(cfg.num_pairs, cfg.seed, cfg.max_operand)
    raise ValueError(f"unknown synthetic task {cfg.task!r}")


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
