"""Parsing one record into a :class:`Pair` of texts, in the formats ``data.format`` names (``pairs``,
``conversational``, ``hh``, or ``auto``); an unusable record raises :class:`RecordError` with a stable reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


def _parse_conversational(obj: dict) -> Pair:
    chosen = _check_messages(obj.get("chosen"), "chosen")
    rejected = _check_messages(obj.get("rejected"), "rejected")
    if obj.get("prompt") is not None:
        prompt = _check_messages(obj["prompt"], "prompt")
        if len(chosen) != 1 or len(rejected) != 1:
            raise RecordError("bad_messages", "with an explicit prompt, chosen and rejected must each be one message")
    else:
        if chosen[:-1] != rejected[:-1]:
            raise RecordError("prompt_mismatch", "chosen and rejected dialogues differ before the final turn", "chosen")
        prompt = chosen[:-1]
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


def _parse_pairs(obj: dict) -> Pair:
    return Pair(
        _require_str(obj, "prompt", allow_empty=True), _require_str(obj, "chosen"), _require_str(obj, "rejected")
    )


def detect_format(obj: dict) -> str:
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("prompt"), list):
        return "conversational"
    if "prompt" in obj:
        return "pairs"
    if isinstance(obj.get("chosen"), str) and (HH_ASSISTANT in obj["chosen"] or HH_HUMAN in obj["chosen"]):
        return "hh"  # a transcript, even one without an Assistant turn (reported as such)
    return "pairs"  # reports the missing prompt field


_PARSERS = {"pairs": _parse_pairs, "conversational": _parse_conversational, "hh": _parse_hh}


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


def parse_record(record: str, fmt: str) -> Pair:
    """Parse one raw record (JSON text) in ``fmt`` ('auto' detects); raises RecordError."""
    obj = _json_object(record)
    pair = _PARSERS[detect_format(obj) if fmt == "auto" else fmt](obj)
    _check_encodable(pair)
    if pair.chosen == pair.rejected:
        raise RecordError("identical_responses", "chosen and rejected responses are identical", "rejected")
    return pair


def _check_encodable(pair: Pair) -> None:
    """Valid JSON can still hold text no tokenizer or Arrow column takes: a lone UTF-16 surrogate (``\\ud83d``)."""
    for name in ("prompt", "chosen", "rejected"):
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
