"""Scoring generated responses: verifiers, and policy against reference per prompt.

A verifier is a callable ``(prompt, response, record) -> float`` (higher is better): the built-in
``arithmetic`` checks the synthetic task's sums; a user names their own as ``module:function``.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Verifier = Callable[[str, str, dict[str, Any]], float]

_QUESTION = re.compile(r"Q:\s*(-?\d+)\s*\+\s*(-?\d+)\s*=\s*\?")
_FIRST_NUMBER = re.compile(r"-?\d+")


def arithmetic(prompt: str, response: str, record: dict[str, Any]) -> float:
    """1.0 when the response's first number is the sum the synthetic arithmetic prompt asks for
    (``"Q: 3+4=?\\nA:"``), else 0.0. Raises ValueError for a prompt that is not such a question."""
    question = _QUESTION.search(prompt)
    if question is None:
        raise ValueError(f"not an arithmetic prompt: {prompt[:60]!r}")
    answer = _FIRST_NUMBER.search(response)
    return float(answer is not None and int(answer.group()) == int(question.group(1)) + int(question.group(2)))


def load_verifier(name: str) -> Verifier:
    """``arithmetic``, or the function ``module:function`` names (imported on the node that scores)."""
    if name == "arithmetic":
        return arithmetic
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class Scored:
    """A response's score, or why the verifier could not give one (that response only, never the run)."""

    score: float | None
    error: str | None = None


def score(verifier: Verifier, prompt: str, response: str, record: dict[str, Any]) -> Scored:
    try:
        return Scored(float(verifier(prompt, response, record)))
    except Exception as exc:  # a user's verifier failing on one response marks that response
        return Scored(None, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class WinRate:
    """Policy against reference over prompts scored on both sides: shares of wins, ties and losses, and the
    win rate (wins + ties / 2) with its bootstrap 95% interval (percentile, resampling prompts)."""

    prompts: int
    win: float
    tie: float
    loss: float
    win_rate: float
    win_rate_low: float
    win_rate_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def win_rate(policy: Sequence[float], reference: Sequence[float], resamples: int = 2000, seed: int = 0) -> WinRate:
    """``policy[i]`` against ``reference[i]`` for each prompt i (scores averaged over a prompt's samples)."""
    outcomes = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)]
    n = len(outcomes)
    if n == 0:
        raise ValueError("no prompt was scored on both sides: no win rate")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(resamples))
    return WinRate(
        prompts=n,
        win=outcomes.count(1.0) / n,
        tie=outcomes.count(0.5) / n,
        loss=outcomes.count(0.0) / n,
        win_rate=sum(outcomes) / n,
        win_rate_low=means[int(0.025 * resamples)],
        win_rate_high=means[int(0.975 * resamples) - 1],
    )
