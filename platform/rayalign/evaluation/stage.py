"""``rayalign evaluate``: the policy and the reference answer the same prompts with the same sampling settings;
a verifier or a reward model scores every response; the policy's win rate over the reference is reported with a
bootstrap interval.

Writes ``<run_dir>/evaluate/generations.jsonl`` (prompt, both responses, their scores: for a person to read),
``evaluation.json`` (the ``eval/gen/*`` numbers) and ``evaluation.png``, kept in the run's storage too.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.data import Dataset

from rayalign.config import ConfigError, RunConfig
from rayalign.evaluation.generate import RESPONSE_IDS, RESPONSES, generated
from rayalign.evaluation.prompts import PromptSet, eval_prompts, heldout_prompts
from rayalign.evaluation.report import SIDES, eval_numbers, plot_evaluation
from rayalign.evaluation.scoring import Scored, Verifier, load_verifier, reward_model_scores, score
from rayalign.metrics import GENERATION_PREFIX
from rayalign.models import ModelSource, hub_snapshot, publish_model
from rayalign.schema import PROMPT_IDS
from rayalign.storage import (
    MODEL_DIR,
    Location,
    download,
    location,
    publish,
    run_location,
    storage_root,
    write_local,
)

log = logging.getLogger(__name__)

EVALUATE_DIR = "evaluate"
GENERATIONS_FILE = "generations.jsonl"
EVALUATION_FILE = "evaluation.json"
EVALUATION_PLOT = "evaluation.png"


def policy_dir(cfg: RunConfig, policy: str | None) -> Path:
    """The policy to evaluate: ``policy`` (a model directory, or a run directory holding ``model/``; either a local
    path or a storage URI, fetched), else the run's exported model (fetched from the run's storage when the driver
    has no copy). Raises ConfigError in one line when there is none."""
    if policy is not None and "://" in policy:
        stored = location(policy, cfg.output.s3)
        stored = stored if (stored / "config.json").is_file() else stored / MODEL_DIR
        if not (stored / "config.json").is_file():
            raise ConfigError(f"evaluate: {policy} holds neither a model nor a run's {MODEL_DIR}/")
        return _fetched(stored, cfg.output.run_dir / EVALUATE_DIR / "policy")
    where = Path(policy).expanduser().resolve() if policy else cfg.output.run_dir
    if policy is not None and not where.exists():
        raise ConfigError(f"evaluate: --policy {policy}: no such file or directory")
    candidate = where / MODEL_DIR if (where / MODEL_DIR / "config.json").is_file() else where
    if policy is None and not (candidate / "config.json").is_file() and cfg.output.storage is not None:
        stored = run_location(cfg.output) / MODEL_DIR
        if (stored / "config.json").is_file():  # exported by rank 0 on another node
            candidate = _fetched(stored, where / MODEL_DIR)
    if not (candidate / "config.json").is_file():
        adapter = (
            " (a LoRA run exports a whole model with model.lora.export_merged)"
            if (where / MODEL_DIR / "adapter").is_dir()
            else ""
        )
        raise ConfigError(
            f"evaluate: {where} is neither a model directory nor a run directory with {MODEL_DIR}/{adapter} "
            "(train first, or pass --policy)"
        )
    return candidate


def _fetched(stored: Location, local: Path) -> Path:
    """``stored`` copied to ``local`` through a folder of its own, moved into place whole: a killed copy never
    leaves a model directory that looks complete."""
    staging = local.with_name(f"{local.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        download(stored, staging)
        shutil.rmtree(local, ignore_errors=True)
        staging.rename(local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
    return local


def _published(cfg: RunConfig, model_dir: Path) -> ModelSource:
    return publish_model(model_dir, storage_root(cfg.output) if cfg.output.storage is not None else None)


def _reward_model_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    if name.count("/") == 1 and not path.exists():
        return hub_snapshot(name, None)
    raise ConfigError(f"eval.generation.reward_model: {name} is neither a model directory nor a hub id")


def _scores(
    cfg: RunConfig, asked: PromptSet, answers: dict[str, list[dict]], verifier: Verifier | None
) -> dict[str, list[list[Scored]]]:
    """Every response's score, per side, per prompt, per sample."""
    settings = cfg.eval.generation
    if verifier is not None:
        return {
            side: [
                [score(verifier, p.text, response, p.record) for response in answered[RESPONSES]]
                for p, answered in zip(asked.prompts, answers[side])
            ]
            for side in SIDES
        }
    if settings.reward_model:
        model = _published(cfg, _reward_model_dir(settings.reward_model))
        texts = [
            (p.text, str(response))
            for side in SIDES
            for p, answered in zip(asked.prompts, answers[side])
            for response in answered[RESPONSES]
        ]
        flat = iter(
            reward_model_scores(texts, model, cfg.data.max_length, settings.batch_size, settings.gpus_per_actor)
        )
        return {side: [[next(flat) for _ in answered[RESPONSES]] for answered in answers[side]] for side in SIDES}
    return {side: [[Scored(None) for _ in answered[RESPONSES]] for answered in answers[side]] for side in SIDES}


def evaluation_dir(cfg: RunConfig, name: str | None = None) -> Path:
    """``<run_dir>/evaluate/`` (the evaluation after training, which summary.json names), or its ``name``
    subfolder (another evaluation of the same run)."""
    return cfg.output.run_dir / EVALUATE_DIR / (name or "")


def run_evaluate(
    cfg: RunConfig,
    policy: str | None = None,
    asked: PromptSet | None = None,
    name: str | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Generate with the policy and the reference, score, compare; write and return ``evaluation.json`` in
    :func:`evaluation_dir` (``name``). ``asked``: the prompts, when the caller has them (training's held-out split);
    else :func:`eval_prompts`. Raises ConfigError in one line (an evaluation already there without ``replace``, no
    policy, no prompts, a verifier that cannot be loaded) or DataQualityError (a prompt file with no usable
    record); all of them before anything is generated."""
    started = time.perf_counter()
    settings = cfg.eval.generation
    out_dir = evaluation_dir(cfg, name)
    if (out_dir / EVALUATION_FILE).is_file() and not replace:
        raise ConfigError(
            f"evaluate: {out_dir} holds an evaluation already"
            + (" (the one made after training, which summary.json names)" if name is None else "")
            + ": give --name NAME to keep both, or --replace"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    verifier = load_verifier(settings.verifier) if settings.verifier else None
    policy_model = policy_dir(cfg, policy)
    asked = asked or eval_prompts(cfg, out_dir)
    models = {"policy": _published(cfg, policy_model), "reference": asked.reference}
    prompts = ray.data.from_items([{"index": i, PROMPT_IDS: p.ids} for i, p in enumerate(asked.prompts)])
    max_model_len = settings.vllm.max_model_len or max(len(p.ids) for p in asked.prompts) + settings.max_new_tokens
    answers, timing = {}, {}
    for side in SIDES:
        began = time.perf_counter()
        rows = generated(prompts, models[side], settings, cfg.model.dtype, max_model_len)
        answers[side] = sorted(rows, key=lambda row: row["index"])
        tokens = sum(len(ids) for row in rows for ids in row[RESPONSE_IDS])
        seconds = time.perf_counter() - began
        timing[side] = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    scores = _scores(cfg, asked, answers, verifier)
    records = []
    for i, prompt in enumerate(asked.prompts):
        record: dict[str, Any] = {"prompt": prompt.text}
        if asked.source != "heldout":
            record["record"] = prompt.record  # the prompt file's record, as the verifier saw it
        for side in SIDES:
            answered = answers[side][i]
            record[side] = [
                {"response": str(r), "tokens": len(ids), "score": s.score, **({"error": s.error} if s.error else {})}
                for r, ids, s in zip(answered[RESPONSES], answered[RESPONSE_IDS], scores[side][i])
            ]
        records.append(record)
    write_local(out_dir / GENERATIONS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    scorer = settings.verifier or (f"reward_model:{settings.reward_model}" if settings.reward_model else None)
    report = eval_numbers(records, scorer is not None)
    report.update(
        {
            "scorer": scorer,
            "backend": settings.backend,
            "prompts": asked.as_dict(),
            "generation": timing,  # wall time of each side, actor start included
            "wall_seconds": round(time.perf_counter() - started, 1),
            "policy": str(models["policy"].driver_dir),
            "reference": str(models["reference"].driver_dir),
        }
    )
    write_local(out_dir / EVALUATION_FILE, json.dumps(report, indent=2))
    plot_evaluation(report, records, out_dir / EVALUATION_PLOT)
    stored = publish(cfg.output, out_dir)
    report["files"] = {
        "evaluation": str(stored / EVALUATION_FILE),
        "generations": str(stored / GENERATIONS_FILE),
        "plot": str(out_dir / EVALUATION_PLOT),  # local: what trackers upload
    }
    return report


def check_scorer(cfg: RunConfig) -> None:
    """Before training, when it will end with an evaluation: a verifier that cannot be loaded stops the run in one
    line now (ConfigError), not after the training it would have followed."""
    if cfg.evaluates_after_training and cfg.eval.generation.verifier:
        load_verifier(cfg.eval.generation.verifier)


def evaluate_trained(cfg: RunConfig, reference: ModelSource, heldout: Dataset | None) -> dict[str, Any]:
    """:func:`run_evaluate` on the run's exported policy once training ended, on training's own held-out pairs
    (``heldout``) unless a prompt file is set; returns what summary.json keeps as ``generation``: the
    ``eval/gen/*`` numbers, the scorer and the files."""
    settings = cfg.eval.generation
    asked = None
    if settings.prompts is None and heldout is not None:
        asked = heldout_prompts(heldout, reference, settings.max_prompts)
    # A new run's own evaluation (a replaced run's is stale); its console line is the command's, with the run's name.
    report = run_evaluate(cfg, asked=asked, replace=True)
    kept = {key: value for key, value in report.items() if key.startswith(GENERATION_PREFIX)}
    return {**kept, "scorer": report["scorer"], "files": report["files"]}
