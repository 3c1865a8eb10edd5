"""``rayalign evaluate``: the policy and the reference answer the same prompts with the same sampling settings;
a verifier scores every response; the policy's win rate over the reference is reported with a bootstrap interval.

Writes ``<run_dir>/evaluate/generations.jsonl`` (prompt, both responses, their scores: for a person to read) and
``evaluation.json`` (the ``eval/gen/*`` numbers), kept in the run's storage too.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import ray

from rayalign.config import ConfigError, RunConfig
from rayalign.data.records import split_heldout
from rayalign.data.stage import prepare_data
from rayalign.evaluation.generate import RESPONSE_TOKENS, RESPONSES, generated
from rayalign.evaluation.scoring import Scored, load_verifier, score, win_rate
from rayalign.metrics import gen_key
from rayalign.models import load_tokenizer, publish_model
from rayalign.runtime import ResourceDemand
from rayalign.schema import PROMPT_IDS
from rayalign.storage import MODEL_DIR, publish, storage_root, write_local

log = logging.getLogger(__name__)

EVALUATE_DIR = "evaluate"
GENERATIONS_FILE = "generations.jsonl"
EVALUATION_FILE = "evaluation.json"


def policy_dir(cfg: RunConfig, policy: str | None) -> Path:
    """The policy to evaluate: ``policy`` (a model directory, or a run directory holding ``model/``), else the
    run's exported model. Raises ConfigError in one line when there is none."""
    where = Path(policy).expanduser().resolve() if policy else cfg.output.run_dir
    candidate = where / MODEL_DIR if (where / MODEL_DIR / "config.json").is_file() else where
    if not (candidate / "config.json").is_file():
        raise ConfigError(
            f"evaluate: {where} is neither a model directory nor a run directory with {MODEL_DIR}/ "
            "(train first, or pass --policy)"
        )
    return candidate


def _prompt_rows(cfg: RunConfig, out_dir: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The reference's ModelSource and the prompts: the run's held-out ones, as token ids and text."""
    data = prepare_data(cfg, out_dir, ResourceDemand.of_run(cfg, train=False))
    _, heldout = split_heldout(data.pairs, cfg)
    if heldout is None:
        raise ConfigError("evaluate: the prompts are the run's held-out ones: set data.eval_fraction > 0")
    tokenizer = load_tokenizer(data.model.local_dir())
    rows = heldout.select_columns([PROMPT_IDS]).take(cfg.eval.generation.max_prompts)
    for row in rows:
        row["prompt"] = tokenizer.decode([int(t) for t in row[PROMPT_IDS]], skip_special_tokens=True)
    return data.model, rows


def run_evaluate(cfg: RunConfig, policy: str | None = None) -> dict[str, Any]:
    """Generate with the policy and the reference, score, compare; write and return ``evaluation.json``."""
    started = time.perf_counter()
    settings = cfg.eval.generation
    if settings.prompts is not None:
        raise ConfigError(
            "eval.generation.prompts: prompt files are not read yet; leave it unset to evaluate on "
            "the run's held-out prompts"
        )
    out_dir = cfg.output.run_dir / EVALUATE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    reference, rows = _prompt_rows(cfg, out_dir)
    policy_model = publish_model(policy_dir(cfg, policy), storage_root(cfg.output) if cfg.output.storage else None)
    prompts = ray.data.from_items([{PROMPT_IDS: [int(t) for t in row[PROMPT_IDS]]} for row in rows])
    answers = {
        side: generated(prompts, model, cfg.model.dtype, settings)
        for side, model in (("policy", policy_model), ("reference", reference))
    }
    verifier = load_verifier(settings.verifier) if settings.verifier else None
    records, sides = [], {"policy": [], "reference": []}
    for i, row in enumerate(rows):
        record = {"prompt": row["prompt"]}
        for side, answered in answers.items():
            responses = list(answered[i][RESPONSES])
            scored = [score(verifier, row["prompt"], r, record) if verifier else Scored(None) for r in responses]
            record[side] = [
                {"response": r, "tokens": int(n), "score": s.score, **({"error": s.error} if s.error else {})}
                for r, n, s in zip(responses, answered[i][RESPONSE_TOKENS], scored)
            ]
            sides[side].append([s.score for s in scored])
        records.append(record)
    write_local(out_dir / GENERATIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    report = _report(records, sides, verifier is not None)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["policy"], report["reference"] = str(policy_model.driver_dir), str(reference.driver_dir)
    write_local(out_dir / EVALUATION_FILE, json.dumps(report, indent=2))
    report["files"] = {"evaluation": str(publish(cfg.output, out_dir) / EVALUATION_FILE)}
    return report


def _report(records: list[dict[str, Any]], sides: dict[str, list[list[float | None]]], scored: bool) -> dict:
    """The ``eval/gen/*`` numbers: mean score and response length of each side, the win rate."""
    report: dict[str, Any] = {gen_key("prompts"): len(records)}
    for side in sides:
        lengths = [r["tokens"] for record in records for r in record[side]]
        report[gen_key(f"{side}_tokens")] = statistics.mean(lengths) if lengths else 0.0
    if not scored:
        return report
    # A prompt counts on both sides only where every response of both sides was scored.
    complete = [i for i in range(len(records)) if all(s is not None for side in sides for s in sides[side][i])]
    mean = {side: [statistics.mean(sides[side][i]) for i in complete] for side in sides}
    for side, values in mean.items():
        report[gen_key(f"{side}_score")] = statistics.mean(values) if values else None
    report[gen_key("unscored_prompts")] = len(records) - len(complete)
    if complete:
        wins = win_rate(mean["policy"], mean["reference"])
        report.update({gen_key(key): value for key, value in wins.as_dict().items() if key != "prompts"})
    return report
