"""The prompts an evaluation asks: the run's held-out prompts, or a prompt file a user brings (out-of-distribution
or adversarial suites). Either way each prompt is tokenized as training tokenizes prompts, so the policy answers in
the format it was trained on."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.data import Dataset

from rayalign.config import ConfigError, RunConfig
from rayalign.data.parsing import RecordError, parse_prompt_record
from rayalign.data.reading import InputFiles, read_preference_files
from rayalign.data.records import capped_record, split_heldout
from rayalign.data.report import SkippedFiles
from rayalign.data.stage import open_run, prepare_data
from rayalign.data.tokenizing import tokenize_prompt
from rayalign.errors import DataQualityError
from rayalign.models import ModelSource, load_tokenizer
from rayalign.runtime import Workload
from rayalign.schema import PROMPT_IDS, READ_ERROR, RECORD, ROW, SOURCE
from rayalign.storage import QUARANTINE_FILE, location, publish, replaced_whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPrompt:
    text: str  # as a person reads it in generations.jsonl (chat messages as decoded from their token ids)
    ids: list[int]
    record: dict[str, Any]  # what a verifier receives: the prompt file's whole record, or {"prompt": text}


@dataclass(frozen=True)
class PromptSet:
    """The prompts asked, where they came from, and what a prompt file had that could not be asked."""

    prompts: list[EvalPrompt]
    source: str  # "heldout", or the prompt file
    reference: ModelSource
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> records (prompt files only)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "asked": len(self.prompts), "quarantined": self.quarantined}


def eval_prompts(cfg: RunConfig, out_dir: Path) -> PromptSet:
    """``eval.generation.prompts`` when set, else the run's held-out prompts; the first ``max_prompts``.
    Raises ConfigError (no held-out split) or DataQualityError (no usable record in a prompt file)."""
    settings = cfg.eval.generation
    if settings.prompts is None:
        data = prepare_data(cfg, out_dir, Workload(train=False))
        _, heldout = split_heldout(data.pairs, cfg)
        if heldout is None:
            raise ConfigError(
                "evaluate: without eval.generation.prompts the prompts are the run's held-out ones: "
                "set data.eval_fraction > 0 or give a prompt file"
            )
        return heldout_prompts(heldout, data.model, settings.max_prompts)
    opened = open_run(cfg, out_dir, Workload(train=False))
    return _file_prompts(cfg, opened.model, out_dir / QUARANTINE_FILE)


def heldout_prompts(heldout: Dataset, reference: ModelSource, max_prompts: int) -> PromptSet:
    """The first ``max_prompts`` prompts of held-out pairs (with ``prompt_ids``), as training tokenized them."""
    tokenizer = load_tokenizer(reference.local_dir())
    prompts = []
    for row in heldout.select_columns([PROMPT_IDS]).take(max_prompts):
        ids = [int(t) for t in row[PROMPT_IDS]]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        prompts.append(EvalPrompt(text, ids, {"prompt": text}))
    return PromptSet(prompts, "heldout", reference)


def _file_prompts(cfg: RunConfig, model: ModelSource, quarantine: Path) -> PromptSet:
    settings = cfg.eval.generation
    place = location(settings.prompts, cfg.output.s3)
    if not place.is_file():
        raise ConfigError(f"eval.generation.prompts: not found: {settings.prompts}")
    inputs = InputFiles([place.path], SkippedFiles(), place.fs)
    rows = read_preference_files(inputs, cfg.ray.data_cpus_per_task, cfg.data.max_record_bytes).take_all()
    tokenizer = load_tokenizer(model.local_dir())
    prompts, reasons = [], Counter()
    with replaced_whole(quarantine) as rejected:
        for row in rows:
            try:
                if row[READ_ERROR]:
                    reason, _, detail = row[READ_ERROR].partition(": ")
                    raise RecordError(reason, detail)
                prompt, record = parse_prompt_record(row[RECORD])
                # As training truncates an over-long prompt: its end, at most data.max_prompt_length tokens.
                ids = tokenize_prompt(prompt, tokenizer)[-cfg.data.max_prompt_length :]
            except RecordError as err:
                reasons[err.reason] += 1
                if sum(reasons.values()) == 1:
                    log.warning(
                        "eval.generation.prompts: %s record %d: field %s: %s (quarantined; see %s)",
                        settings.prompts, row[ROW], err.field, err.detail, quarantine,
                    )  # fmt: skip
                entry = {SOURCE: settings.prompts, ROW: int(row[ROW]), "reason": err.reason, "field": err.field}
                rejected.write(json.dumps({**entry, "detail": err.detail, "record": capped_record(row[RECORD])}) + "\n")
                continue
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=True)
            prompts.append(EvalPrompt(text, ids, record))
    publish(cfg.output, quarantine)
    if not prompts:
        raise DataQualityError(
            f"eval.generation.prompts: none of the {len(rows)} records of {settings.prompts} has a usable `prompt` "
            f"(reasons: {dict(reasons)}); see {quarantine}"
        )
    return PromptSet(prompts[: settings.max_prompts], str(settings.prompts), model, dict(reasons))
