"""Parsing one record into a :class:`Pair` of texts, in the layouts ``data.format`` names (``pairs``,
``conversational``, ``hh``, LLaMA-Factory's ``sharegpt`` and ``alpaca``, or ``auto``), its fields named as
``data.columns`` says, or, for a loss that takes unpaired data (KTO), into a labelled :class:`Completion`
(TRL's unpaired layout, ``unpaired``); an unusable record raises :class:`RecordError` with a stable reason."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayalign.config import ColumnsConfig

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


class RecordError(ValueError):
    """One record is unusable; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field


@dataclass
class Pair:
    """A normalised preference pair; ``prompt`` is text or a list of chat messages."""

    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str


@dataclass
class Completion:
    """A normalised unpaired record (KTO's data): one completion of a prompt, labelled desirable or not."""

    prompt: str | list[dict[str, str]]
    completion: str
    desirable: bool


def _require_str(obj: dict, key: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise RecordError("missing_field", f"field {key!r} is missing", key)
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("not_a_string", f"field {key!r} must be a string, got {type(value).__name__}", key)
    if not allow_empty and not value.strip():
        raise RecordError("empty_response", f"field {key!r} is empty", key)
    return value


def _check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("bad_messages", f"field {key!r} must be a non-empty list of messages", key)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RecordError("bad_messages", f"{key}[{i}] must be {{role: str, content: str}}", key)
    return messages


def _final_assistant_text(messages: list[dict[str, str]], key: str) -> str:
    last = messages[-1]
    if last["role"] != "assistant":
        raise RecordError("bad_messages", f"the last message of {key!r} must be from the assistant", key)
    if not last["content"].strip():
        raise RecordError("empty_response", f"the final assistant message of {key!r} is empty", key)
    return last["content"]


def _shared_dialogue(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> list[dict[str, str]]:
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("prompt_mismatch", "chosen and rejected dialogues differ before the final turn", "chosen")
    return chosen[:-1]


def _parse_conversational(obj: dict) -> Pair:
    chosen = _check_messages(obj.get("chosen"), "chosen")
    rejected = _check_messages(obj.get("rejected"), "rejected")
    text_prompt = obj.get("prompt")
    if isinstance(text_prompt, str):
        # UltraFeedback-binarized: the prompt's text beside whole dialogues. The messages are what is trained on;
        # the text must be their last user turn (or the whole prompt, when the dialogues hold only the answer).
        shared = _shared_dialogue(chosen, rejected)
        users = [m["content"] for m in shared if m["role"] == "user"]
        if shared and (not users or users[-1].strip() != text_prompt.strip()):
            raise RecordError(
                "prompt_mismatch",
                "field 'prompt' is not the last user message of the chosen/rejected dialogue",
                "prompt",
            )
        prompt = shared or [{"role": "user", "content": text_prompt}]
    elif text_prompt is not None:
        prompt = _check_messages(text_prompt, "prompt")
        if len(chosen) != 1 or len(rejected) != 1:
            raise RecordError("bad_messages", "with an explicit prompt, chosen and rejected must each be one message")
    else:
        prompt = _shared_dialogue(chosen, rejected)
    if not prompt:
        raise RecordError("bad_messages", "no prompt: the dialogue has only the final turn", "chosen")
    return Pair(prompt, _final_assistant_text(chosen, "chosen"), _final_assistant_text(rejected, "rejected"))


def _split_hh(transcript: str, key: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RecordError("hh_no_assistant_turn", f"{key!r} has no '\\n\\nAssistant:' turn", key)
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _parse_hh(obj: dict) -> Pair:
    chosen_prompt, chosen = _split_hh(_require_str(obj, "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh(_require_str(obj, "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        raise RecordError(
            "prompt_mismatch",
            "the dialogue before the last Assistant turn differs between chosen and rejected",
            "rejected",
        )
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordError("empty_response", f"the final Assistant response of {key!r} is empty", key)
    return Pair(chosen_prompt, chosen, rejected)


def _implicit_prompt_cut(chosen: str, rejected: str) -> int:
    """Where the start chosen and rejected share ends, backed off to the start of the word they differ in and
    before the space ahead of it (tokenizers attach a space to the word after it): "I like cats" / "I like cars"
    cut at 6, giving "I like" and " cats" / " cars"; "2+2=4" / "2+2=5" at 4."""
    cut = 0
    while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
        cut += 1
    in_a_word = cut < len(chosen) and chosen[cut].isalnum() or cut < len(rejected) and rejected[cut].isalnum()
    while in_a_word and cut > 0 and chosen[cut - 1].isalnum():
        cut -= 1
    return cut - 1 if cut > 0 and chosen[cut - 1].isspace() else cut


def _parse_pairs(obj: dict) -> Pair:
    if "prompt" in obj:
        return Pair(
            _require_str(obj, "prompt", allow_empty=True), _require_str(obj, "chosen"), _require_str(obj, "rejected")
        )
    chosen, rejected = _require_str(obj, "chosen"), _require_str(obj, "rejected")
    # TRL's implicit prompt: no prompt field, the prompt being the start the two texts share.
    cut = _implicit_prompt_cut(chosen, rejected)
    if not chosen[:cut].strip():
        raise RecordError(
            "missing_field",
            "field 'prompt' is missing and chosen and rejected share no start to take it from",
            "prompt",
        )
    return Pair(chosen[:cut], chosen[cut:], rejected[cut:])


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt_text(turn: Any, key: str) -> str:
    if not (isinstance(turn, dict) and isinstance(turn.get("value"), str) and turn.get("from") == "gpt"):
        raise RecordError("bad_messages", f"field {key!r} must be {{from: gpt, value: str}}", key)
    if not turn["value"].strip():
        raise RecordError("empty_response", f"field {key!r} is empty", key)
    return turn["value"]


def _parse_sharegpt(obj: dict) -> Pair:
    """LLaMA-Factory's sharegpt preference layout: ``conversations`` ({from, value} turns, the last one the
    human's) and ``chosen``/``rejected`` as one {from: gpt, value} turn each."""
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_messages", "field 'conversations' must be a non-empty list of turns", "conversations")
    prompt = []
    for i, turn in enumerate(turns):
        role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise RecordError(
                "bad_messages", f"conversations[{i}] must be {{from: human|gpt|system, value: str}}", "conversations"
            )
        prompt.append({"role": role, "content": turn["value"]})
    if prompt[-1]["role"] != "user":
        raise RecordError("bad_messages", "the last turn of 'conversations' must be from the human", "conversations")
    return Pair(prompt, _sharegpt_text(obj.get("chosen"), "chosen"), _sharegpt_text(obj.get("rejected"), "rejected"))


def _parse_alpaca(obj: dict) -> Pair:
    """LLaMA-Factory's alpaca preference layout: the user turn is ``instruction`` and ``input`` joined by a
    newline, after the ``history`` ([[user, assistant], ...]) turns."""
    query = "\n".join(t for t in (_require_str(obj, "instruction"), obj.get("input") or "") if t)
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
    ):
        raise RecordError("bad_messages", "field 'history' must be a list of [user, assistant] texts", "history")
    prompt = [{"role": role, "content": text} for turn in history for role, text in zip(("user", "assistant"), turn)]
    return Pair(
        [*prompt, {"role": "user", "content": query}], _require_str(obj, "chosen"), _require_str(obj, "rejected")
    )


def _parse_rated(obj: dict, columns: ColumnsConfig | None) -> Pair:
    """A prompt's rated completions (raw UltraFeedback: ``instruction``, ``completions`` with ``response`` and
    ``overall_score``; names from ``data.columns``) as one pair: the best-rated against the worst-rated, the first
    of equals; quarantined when fewer than two are rated or all ratings tie (no preference to learn)."""
    defaults = {"completions": "completions", "response": "response", "rating": "overall_score"}  # ColumnsConfig's
    field, response, rating = (getattr(columns, k, default) for k, default in defaults.items())
    prompt = _require_str(obj, "prompt", allow_empty=True)
    completions = obj.get(field)
    if not isinstance(completions, list):
        raise RecordError("missing_field", f"field {field!r} must be a list of rated completions", field)
    rated = [
        (c[rating], c[response])
        for c in completions
        if isinstance(c, dict)
        and isinstance(c.get(rating), (int, float))
        and not isinstance(c.get(rating), bool)
        and isinstance(c.get(response), str)
        and c[response].strip()
    ]
    if len(rated) < 2:
        raise RecordError(
            "too_few_rated", f"{len(rated)} completion(s) have a {response!r} and a numeric {rating!r}; 2 needed", field
        )
    best, worst = max(rated, key=lambda r: r[0]), min(rated, key=lambda r: r[0])
    if best[0] == worst[0]:
        raise RecordError("tied_ratings", f"every completion is rated {best[0]}: no preference", field)
    return Pair(prompt, best[1], worst[1])


def detect_format(obj: dict) -> str:
    """The layout of one record (``data.format: auto``); raises RecordError for data that is not preference
    pairs or whose fields no layout names, with the fields it has and the setting that would read it."""
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "chosen" in obj:
        return "alpaca"
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("prompt"), list):
        return "conversational"
    if "chosen" not in obj and "completion" in obj and "label" in obj:
        return "unpaired"
    if "chosen" not in obj and "completions" in obj:
        raise RecordError(
            "rated_completions",
            "rated completions with no chosen/rejected (raw UltraFeedback): set data.format: rated for the best- "
            "against the worst-rated completion of each prompt (ties dropped; names in data.columns)",
        )
    if "prompt" in obj:
        return "pairs"
    if isinstance(obj.get("chosen"), str) and (HH_ASSISTANT in obj["chosen"] or HH_HUMAN in obj["chosen"]):
        return "hh"  # a transcript, even one without an Assistant turn (reported as such)
    if "chosen" in obj and "rejected" in obj:
        return "pairs"  # TRL's implicit prompt
    raise RecordError(
        "unknown_layout",
        f"no known layout has the fields {', '.join(sorted(obj)) or '(none)'}: name them with data.columns "
        "{prompt, chosen, rejected, system} or set data.format (pairs, conversational, hh, sharegpt, alpaca)",
    )


_PARSERS = {
    "pairs": _parse_pairs,
    "conversational": _parse_conversational,
    "hh": _parse_hh,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
}


def required_fields(fmt: str, columns: ColumnsConfig | None = None) -> list[str]:
    """The fields every record of layout ``fmt`` has, as the data names them (a Parquet file's columns)."""
    named = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    if columns is not None:
        named = {part: getattr(columns, part) for part in named}
    return {
        "sharegpt": ["conversations", named["chosen"], named["rejected"]],
        "alpaca": ["instruction", named["chosen"], named["rejected"]],
        "rated": [named["prompt"], getattr(columns, "completions", "completions")],
        "unpaired": [named["prompt"], "completion", "label"],
    }.get(fmt, [named["chosen"], named["rejected"]])


def _parse_unpaired(obj: dict) -> Completion:
    """TRL's unpaired layout: ``prompt`` (text, or messages), ``completion`` (text, or one assistant message as a
    list) and ``label`` (true: desirable)."""
    label = obj.get("label")
    if not isinstance(label, bool):
        raise RecordError("not_a_bool", f"field 'label' must be true or false, got {json.dumps(label)}", "label")
    if isinstance(obj.get("completion"), list):
        completion = _final_assistant_text(_check_messages(obj["completion"], "completion"), "completion")
    else:
        completion = _require_str(obj, "completion")
    prompt = obj.get("prompt")
    prompt = _check_messages(prompt, "prompt") if isinstance(prompt, list) else _require_str(obj, "prompt", True)
    return Completion(prompt, completion, label)


def _renamed(obj: dict, columns: ColumnsConfig | None) -> dict:
    """The record with ``data.columns``' fields under the standard names."""
    if columns is None:
        return obj
    mapping = {columns.prompt: "prompt", columns.chosen: "chosen", columns.rejected: "rejected"}
    mapping[columns.system] = "system"
    if all(source == part for source, part in mapping.items()):
        return obj
    for source, part in mapping.items():
        if source != part and source not in obj and part != "system":
            raise RecordError("missing_field", f"field {source!r} (data.columns.{part}) is missing", source)
    out = {k: v for k, v in obj.items() if k not in mapping.values()}
    out.update({mapping[k]: v for k, v in obj.items() if k in mapping})
    return out


def _with_system(pair: Pair | Completion, system: Any) -> Pair | Completion:
    """A system text (Intel orca's, LLaMA-Factory's ``system``) as the prompt's first message."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return pair
    if not isinstance(system, str):
        raise RecordError("not_a_string", f"field 'system' must be a string, got {type(system).__name__}", "system")
    messages = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
    if messages and messages[0]["role"] == "system":
        return pair
    return replace(pair, prompt=[{"role": "system", "content": system}, *messages])


def _json_object(record: str) -> dict:
    try:
        obj = json.loads(record)
    except json.JSONDecodeError as exc:
        raise RecordError("bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise RecordError("too_deeply_nested", "JSON nested deeper than the parser's recursion limit") from None
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_prompt_record(record: str) -> tuple[str | list[dict[str, str]], dict[str, Any]]:
    """One record of a prompt file (JSON text): its ``prompt`` (text, or chat messages) and the whole record
    (what a verifier receives). Raises RecordError."""
    obj = _json_object(record)
    prompt = obj.get("prompt")
    prompt = _check_messages(prompt, "prompt") if isinstance(prompt, list) else _require_str(obj, "prompt", True)
    if isinstance(prompt, str) and not prompt.strip():
        raise RecordError("empty_prompt", "field 'prompt' is empty", "prompt")
    _check_encodable(Pair(prompt, "", ""))
    return prompt, obj


def parse_record(
    record: str, fmt: str, columns: ColumnsConfig | None = None, unpaired: bool = False
) -> Pair | Completion:
    """Parse one raw record (JSON text) in layout ``fmt`` ('auto' detects), its fields named as ``columns``
    says (None: the standard names): a Pair, or with ``unpaired`` (the loss takes unpaired data) a Completion.
    Raises RecordError, among others ``unpaired_record`` (a completion where the loss takes pairs) and
    ``paired_record`` (the reverse)."""
    obj = _renamed(_json_object(record), columns)
    fmt = detect_format(obj) if fmt == "auto" else fmt
    if unpaired != (fmt == "unpaired"):
        if unpaired:
            raise RecordError(
                "paired_record",
                f"a {fmt} preference record; the loss (kto) takes unpaired prompt/completion/label records",
            )
        raise RecordError(
            "unpaired_record",
            "an unpaired prompt/completion/label record (KTO's data); preference losses take a chosen and a "
            "rejected response per prompt: set loss.type: kto, or pair them first",
            "completion",
        )
    if fmt == "unpaired":
        parsed = _parse_unpaired(obj)
    else:
        parsed = _parse_rated(obj, columns) if fmt == "rated" else _PARSERS[fmt](obj)
    if fmt != "hh":
        parsed = _with_system(parsed, obj.get("system"))
    _check_encodable(parsed)
    if isinstance(parsed, Pair) and parsed.chosen == parsed.rejected:
        raise RecordError("identical_responses", "chosen and rejected responses are identical", "rejected")
    return parsed


def _check_encodable(pair: Pair | Completion) -> None:
    """Valid JSON can still hold text no tokenizer or Arrow column takes: a lone UTF-16 surrogate (``\\ud83d``)."""
    names = ("prompt", "completion") if isinstance(pair, Completion) else ("prompt", "chosen", "rejected")
    for name in names:
        value = getattr(pair, name)
        texts = [m.get("content", "") for m in value] if isinstance(value, list) else [value]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise RecordError(
                    "bad_text",
                    f"not valid Unicode text: {err.reason} ({text[err.start]!r}) at character {err.start}",
                    name,
                ) from None
