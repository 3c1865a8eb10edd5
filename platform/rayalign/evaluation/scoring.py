"""Scoring generated responses: verifiers, a reward model, and policy against reference per prompt.

A verifier is a callable ``(prompt, response, record) -> float`` (higher is better): the built-in
``arithmetic`` checks the synthetic task's sums; a user names their own as ``module:function``. A reward model
is a sequence-classification model with one output, run in Ray Data actors; its logit on prompt + response is
the score. Either way a response that cannot be scored is marked with the error, never the run.
"""

from __future__ import annotations

import importlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from rayalign.config import ConfigError
from rayalign.cpus import use_reserved_cpus
from rayalign.models import ModelSource

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
    """``arithmetic``, or the function ``module:function`` names (imported on the driver, which scores).
    Raises ConfigError in one line when it cannot be imported or is not callable."""
    if name == "arithmetic":
        return arithmetic
    module, _, function = name.partition(":")
    try:
        verifier = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"eval.generation.verifier: cannot load {name} ({type(err).__name__}: {err}); the module must be "
            "importable where the command runs (e.g. on PYTHONPATH, or in the job's working_dir)"
        ) from None
    if not callable(verifier):
        raise ConfigError(f"eval.generation.verifier: {name} is not callable")
    return verifier


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


SCORE, SCORE_ERROR = "score", "score_error"  # the reward-model actors' output columns


class RewardModelScorer:
    """Scores ``prompt`` + ``response`` texts with a sequence-classification model (one label): its logit.
    A batch that fails is scored one response at a time, so one bad response is marked alone."""

    def __init__(self, model: ModelSource, max_length: int, on_gpu: bool):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        use_reserved_cpus("reward model actor")
        model_dir = model.local_dir()
        self.device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        self.model = self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"eval.generation.reward_model: {model.driver_dir} has {self.model.config.num_labels} labels; "
                "a reward model has one output (its logit is the score)"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length

    def _logits(self, texts: list[str]) -> list[float]:
        import torch

        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            return self.model(**encoded).logits[:, 0].float().cpu().tolist()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(p) + str(r) for p, r in zip(batch["prompt"], batch["response"])]
        try:
            scores, errors = self._logits(texts), [None] * len(texts)
        except Exception:  # find which response it was: each alone
            scores, errors = [], []
            for text in texts:
                try:
                    scores.append(self._logits([text])[0])
                    errors.append(None)
                except Exception as exc:
                    scores.append(float("nan"))
                    errors.append(f"{type(exc).__name__}: {exc}"[:500])
        batch[SCORE], batch[SCORE_ERROR] = np.array(scores, dtype=np.float64), np.array(errors, dtype=object)
        return batch


def reward_model_scores(
    texts: list[tuple[str, str]], model: ModelSource, max_length: int, batch_size: int, gpus: float
) -> list[Scored]:
    """The reward model's score of each ``(prompt, response)``, in order, from one actor."""
    rows = [{"index": i, "prompt": p, "response": r} for i, (p, r) in enumerate(texts)]
    scored = ray.data.from_items(rows).map_batches(
        RewardModelScorer,
        fn_constructor_kwargs={"model": model, "max_length": max_length, "on_gpu": bool(gpus)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_gpus=gpus,
    )
    out = sorted(scored.take_all(), key=lambda row: row["index"])
    return [Scored(None, row[SCORE_ERROR]) if row[SCORE_ERROR] else Scored(float(row[SCORE])) for row in out]


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
