"""Tokenizing one pair: prompt and responses to token ids, truncated as ``data.truncation`` says;
:class:`PairTokenizer` does it to a batch of records, and :func:`tokenize_records` in a Ray Data task. Unpaired
completions (KTO's data) are tokenized the same way, and :func:`with_kl_completions` gives each its KL completion.

Text pairs: one BOS per sequence and one EOS per response, whatever the text holds. Chat pairs (the prompt is a
list of messages) with a chat template: what the template renders, token for token, as inference will see it:
the prompt is the conversation rendered with the generation prompt, and a response is the rest of the whole
conversation's rendering (its end-of-turn tokens included, and scored)."""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from rayalign.config import DataConfig
from rayalign.data.parsing import Completion, Pair, RecordError, parse_record
from rayalign.models import ModelSource
from rayalign.schema import (
    COMPLETION_IDS,
    DESIRABLE,
    DETAIL,
    FIELD,
    KL_COMPLETION_IDS,
    OK,
    PROMPT_IDS,
    READ_ERROR,
    RECORD,
    ROW,
    SOURCE,
    STATUS,
    TOKEN_COLUMNS,
    TRUNCATED,
)


class TokenizedPair(NamedTuple):
    """A pair's token ids as training reads them."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool  # the prompt's start or a response's end was cut to fit data.max_length


def tokenize_pair(pair: Pair, tokenizer, cfg: DataConfig) -> TokenizedPair:
    """Token ids of (prompt, chosen, rejected) and whether anything was truncated.

    A sequence starts with one BOS (when the tokenizer adds one). A text response ends with one EOS, so the
    model learns where an answer stops, whatever special-token text the data already holds; a chat response
    is what the chat template renders for it, up to and including its end-of-turn tokens. Raises RecordError
    (``template_not_prefix``, ``too_long``, ``identical_after_truncation``). Over-long
    pairs follow ``cfg.truncation``: keep the end of the prompt (at most
    ``max_prompt_length`` tokens) and then cut responses to fit ``max_length``,
    or quarantine the pair as ``too_long``.
    """
    prompt_ids = tokenize_prompt(pair.prompt, tokenizer)
    chosen_ids, rejected_ids = _responses_ids(
        pair.prompt, prompt_ids, {"chosen": pair.chosen, "rejected": pair.rejected}, tokenizer
    )
    return _fitted(prompt_ids, chosen_ids, rejected_ids, cfg)


def tokenize_completion(completion: Completion, tokenizer, cfg: DataConfig) -> TokenizedPair:
    """An unpaired completion's ids as :func:`tokenize_pair` makes a pair's, its completion where the chosen
    response goes and no rejected one yet (:func:`with_kl_completions` puts the KL completion there)."""
    prompt_ids = tokenize_prompt(completion.prompt, tokenizer)
    (completion_ids,) = _responses_ids(completion.prompt, prompt_ids, {"completion": completion.completion}, tokenizer)
    return _fitted(prompt_ids, completion_ids, [], cfg)


def _responses_ids(
    prompt: str | list[dict[str, str]], prompt_ids: list[int], responses: dict[str, str], tokenizer
) -> list[list[int]]:
    """Each of ``responses`` (field name → text) as the ids that follow ``prompt_ids``: the chat template's
    rendering for a chat prompt, else the text and one EOS."""
    if isinstance(prompt, list) and tokenizer.chat_template:
        return [_rendered_response_ids(prompt, prompt_ids, text, tokenizer, key) for key, text in responses.items()]
    return [_response_ids(text, tokenizer) for text in responses.values()]


def with_kl_completions(batch: pa.Table, max_length: int) -> pa.Table:
    """Ray Data task: each unpaired row's KL completion, the completion of the row before it in ``batch`` (the
    first row takes the last's), cut to fit ``max_length`` after this row's prompt. As TRL does within a batch of
    ``per_device_train_batch_size`` (Ethayarajh et al., 2024, §4.1): (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
    A batch of one row gets its own completion."""
    completions = batch.column(COMPLETION_IDS).to_pylist()
    prompt_lengths = pc.list_value_length(batch.column(PROMPT_IDS)).to_pylist()
    rotated = completions[-1:] + completions[:-1]
    kl = [ids[: max_length - length] for ids, length in zip(rotated, prompt_lengths)]
    index = batch.schema.get_field_index(KL_COMPLETION_IDS)
    return batch.set_column(index, KL_COMPLETION_IDS, pa.array(kl, batch.schema.field(index).type))


def tokenize_pairs(pairs: list[Pair], tokenizer, cfg: DataConfig) -> list[TokenizedPair | RecordError]:
    """:func:`tokenize_pair` of each pair (the same ids), or the RecordError it raises. The text pairs' prompts
    and responses go through the tokenizer in two batched calls: a fast tokenizer encodes a batch in parallel,
    without a Python round trip per text. Chat pairs are rendered one by one (the template is per conversation)."""
    text = [i for i, pair in enumerate(pairs) if not isinstance(pair.prompt, list)]
    try:
        prompts = tokenizer([pairs[i].prompt for i in text]).input_ids if text else []
        responses = (
            tokenizer(
                [pairs[i].chosen for i in text] + [pairs[i].rejected for i in text], add_special_tokens=False
            ).input_ids
            if text
            else []
        )
    except Exception:  # noqa: BLE001  one text the batch cannot take: each pair alone, so only it is quarantined
        text, prompts, responses = [], [], []
    batched = {i: j for j, i in enumerate(text)}
    out: list[TokenizedPair | RecordError] = []
    for i, pair in enumerate(pairs):
        try:
            if i in batched:
                j = batched[i]
                chosen, rejected = (_closed(responses[k], tokenizer) for k in (j, len(text) + j))
                out.append(_fitted(_one_leading(list(prompts[j]), tokenizer.bos_token_id), chosen, rejected, cfg))
            else:
                out.append(tokenize_pair(pair, tokenizer, cfg))
        except Exception as exc:  # noqa: BLE001  one pair never stops the batch: it is quarantined with why
            out.append(as_record_error(exc))
    return out


def as_record_error(exc: Exception) -> RecordError:
    """``exc`` itself when it is a RecordError, else an ``unprocessable`` one naming it."""
    return exc if isinstance(exc, RecordError) else RecordError("unprocessable", f"{type(exc).__name__}: {exc}"[:500])


def _fitted(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], cfg: DataConfig) -> TokenizedPair:
    """The ids fitted to ``cfg.max_length`` as ``cfg.truncation`` says (see :func:`tokenize_pair`)."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= cfg.max_length:
        return TokenizedPair(list(prompt_ids), chosen_ids, rejected_ids, False)
    if cfg.truncation == "drop":
        raise RecordError(
            "too_long",
            f"{len(prompt_ids)} prompt + {longest} response tokens > data.max_length={cfg.max_length}",
        )
    if len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = prompt_ids[-cfg.max_prompt_length :]
    budget = cfg.max_length - len(prompt_ids)
    chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    if chosen_ids == rejected_ids:
        raise RecordError("identical_after_truncation", "responses are identical once truncated to max_length")
    return TokenizedPair(list(prompt_ids), chosen_ids, rejected_ids, True)


def tokenize_prompt(prompt: str | list[dict[str, str]], tokenizer) -> list[int]:
    """A prompt's token ids as training sees them: text as is, chat messages through the tokenizer's chat
    template (with the generation prompt; ``role: content`` lines without a template); one leading BOS."""
    if isinstance(prompt, list):
        if tokenizer.chat_template:
            ids = _rendered(prompt, tokenizer, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
            ids = tokenizer(text).input_ids
    else:
        ids = tokenizer(prompt).input_ids
    return _one_leading(list(ids), tokenizer.bos_token_id)


def _rendered(messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> list[int]:
    """The chat template's token ids for ``messages`` (the special tokens it writes are not added twice)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _rendered_response_ids(
    prompt: list[dict[str, str]], prompt_ids: list[int], response: str, tokenizer, key: str
) -> list[int]:
    """A response's ids as the template renders it after the prompt: the whole conversation's ids less the
    prompt's (rendered with the generation prompt; ``prompt_ids``, leading BOS already deduplicated).

    Raises RecordError ``template_not_prefix`` when the prompt's rendering is not where the whole one starts
    (a template that renders earlier turns differently once an answer follows): splitting there would train
    on ids inference never produces."""
    whole = _one_leading(
        _rendered([*prompt, {"role": "assistant", "content": response}], tokenizer, False), tokenizer.bos_token_id
    )
    if whole[: len(prompt_ids)] != prompt_ids or len(whole) == len(prompt_ids):
        raise RecordError(
            "template_not_prefix",
            f"the chat template's rendering of the prompt is not the start of its rendering of prompt + {key}, "
            "so the response's tokens cannot be told apart",
            key,
        )
    return whole[len(prompt_ids) :]


def _one_leading(ids: list[int], token: int | None) -> list[int]:
    """``ids`` with a run of leading ``token`` (BOS added by the tokenizer and BOS text in the data) cut to one."""
    start = 0
    while token is not None and start + 1 < len(ids) and ids[start] == ids[start + 1] == token:
        start += 1
    return ids[start:]


def _response_ids(text: str, tokenizer) -> list[int]:
    """A response's ids: no BOS in front, and exactly one EOS at the end (EOS text in the data not doubled)."""
    return _closed(tokenizer(text, add_special_tokens=False).input_ids, tokenizer)


def _closed(ids: list[int], tokenizer) -> list[int]:
    """A text response's ids without BOS in front and with exactly one EOS at the end."""
    ids = list(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while ids and ids[0] == bos:
        ids = ids[1:]
    if eos is None:
        return ids
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    return ids + [eos]


class PairTokenizer:
    """Raw records -> tokenized pairs (with ``unpaired``: tokenized completions, and their ``desirable`` column),
    or a reason they were rejected (a ``pyarrow.Table`` batch in and out)."""

    def __init__(self, model: ModelSource, data_cfg: DataConfig, unpaired: bool = False):
        from rayalign.models import load_tokenizer

        self.tokenizer = load_tokenizer(model.local_dir())
        self.cfg = data_cfg
        self.unpaired = unpaired

    def _parsed(self, record: str, read_error: str | None) -> Pair | Completion | RecordError:
        if read_error is not None:
            reason, _, detail = read_error.partition(": ")
            return RecordError(reason, detail)
        try:
            return parse_record(record, self.cfg.format, self.cfg.columns, self.unpaired)
        except Exception as exc:  # noqa: BLE001  one record never stops the stage: it is quarantined with why
            return as_record_error(exc)

    def _tokenized_completion(self, completion: Completion) -> TokenizedPair | RecordError:
        try:
            return tokenize_completion(completion, self.tokenizer, self.cfg)
        except Exception as exc:  # noqa: BLE001  as in tokenize_pairs
            return as_record_error(exc)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.column(RECORD).to_pylist()
        parsed = [self._parsed(r, e) for r, e in zip(records, batch.column(READ_ERROR).to_pylist())]
        tokenized = iter(tokenize_pairs([p for p in parsed if isinstance(p, Pair)], self.tokenizer, self.cfg))
        results = [
            next(tokenized)
            if isinstance(p, Pair)
            else self._tokenized_completion(p)
            if isinstance(p, Completion)
            else p
            for p in parsed
        ]
        out: dict[str, list] = {k: [] for k in (STATUS, FIELD, DETAIL, RECORD, TRUNCATED, *TOKEN_COLUMNS)}
        for record, result in zip(records, results):
            if isinstance(result, RecordError):  # the raw text is only kept for the quarantine
                ids, truncated = ([], [], []), False
                status, fld, detail, kept = result.reason, result.field, result.detail, record
            else:
                ids, truncated = result[:3], result.truncated
                status, fld, detail, kept = OK, None, None, None
            for name, value in zip((STATUS, FIELD, DETAIL, RECORD, TRUNCATED), (status, fld, detail, kept, truncated)):
                out[name].append(value)
            for name, value in zip(TOKEN_COLUMNS, ids):
                out[name].append(value)
        ids_type = pa.list_(pa.int32())
        labels = {}
        if self.unpaired:
            labels[DESIRABLE] = pa.array([p.desirable if isinstance(p, Completion) else None for p in parsed])
        return pa.table(
            {
                SOURCE: batch.column(SOURCE),
                ROW: batch.column(ROW),
                **{name: pa.array(out[name], pa.string()) for name in (STATUS, FIELD, DETAIL, RECORD)},
                TRUNCATED: pa.array(out[TRUNCATED], pa.bool_()),
                **{name: pa.array(out[name], ids_type) for name in TOKEN_COLUMNS},
                **{name: values.cast(pa.bool_()) for name, values in labels.items()},
            }
        )


# The tokenizer a task worker loaded last, by the model's content key and the data settings (see tokenize_records).
_loaded: tuple[tuple[str, str, bool], PairTokenizer] | None = None


def tokenize_records(batch: pa.Table, model: ModelSource, data_cfg: DataConfig, unpaired: bool = False) -> pa.Table:
    """Ray Data task: :class:`PairTokenizer` on ``batch`` (``unpaired``: the loss takes unpaired completions).

    Ray reuses a task's worker process for later tasks, of this run and of later runs on the same cluster; it
    keeps the tokenizer it loaded (one, keyed by the model's content and ``data_cfg``), so a warm cluster
    tokenizes a small run in a fraction of a second where a new actor took about 4.5 s to start."""
    global _loaded
    key = (model.key, data_cfg.model_dump_json(), unpaired)
    if _loaded is None or _loaded[0] != key:
        _loaded = (key, PairTokenizer(model, data_cfg, unpaired))
    return _loaded[1](batch)
