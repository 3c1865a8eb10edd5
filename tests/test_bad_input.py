"""Bad input: every record is counted (usable or quarantined with its reason), never lost, never a traceback."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import GOOD, read_quarantine, run_stage

from rayalign.data.parsing import RecordError, parse_record
from rayalign.errors import DataQualityError

pytestmark = pytest.mark.e2e
GOOD_LINE = json.dumps(GOOD).encode()


def _good(i: int) -> bytes:
    return json.dumps({**GOOD, "prompt": f"Q{i}: 1+1=?\nA:"}).encode()


def test_invalid_utf8_is_quarantined_with_its_line_not_altered(ray_cluster, tmp_path, tiny_model_dir):
    bad = json.dumps({**GOOD, "chosen": "XX"}).encode().replace(b"XX", b"\xff\xfe 2")
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join([_good(1), bad, _good(3)]) + b"\n")
    _, report = run_stage(tmp_path, tiny_model_dir, [path], max_quarantine_fraction=0.5)
    assert report.ok == 2 and report.quarantined == {"bad_utf8": 1}
    (row,) = read_quarantine(report)
    assert row["row"] == 2 and row["source"].endswith("bytes.jsonl") and "byte" in row["detail"]
    assert "\\xff\\xfe" in row["record"]  # the bytes as they were, escaped, not replaced by U+FFFD


def test_a_byte_order_mark_does_not_cost_the_first_record(ray_cluster, tmp_path, tiny_model_dir):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([_good(1), _good(2)]) + b"\n")
    _, report = run_stage(tmp_path, tiny_model_dir, [path])
    assert report.ok == 2 and report.num_quarantined == 0


def test_a_truncated_gz_keeps_what_came_before_and_quarantines_the_damage(ray_cluster, tmp_path, tiny_model_dir):
    lines = [_good(i) for i in range(3000)]
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    _, report = run_stage(tmp_path, tiny_model_dir, [path], max_quarantine_fraction=0.5)
    assert report.quarantined == {"damaged_file": 1}
    (row,) = read_quarantine(report)
    assert row["source"].endswith("cut.jsonl.gz") and row["row"] == report.ok + 1
    assert f"the {report.ok} lines before were read" in row["detail"]
    assert 500 < report.ok < 3000 and report.total == report.ok + 1


def test_json_arrays_are_read_as_records(ray_cluster, tmp_path, tiny_model_dir):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{**GOOD, "prompt": f"Q{i}"} for i in range(5)] + [{"prompt": "x", "chosen": "a"}]))
    _, report = run_stage(tmp_path, tiny_model_dir, [path], max_quarantine_fraction=0.5)
    assert report.ok == 5 and report.quarantined == {"missing_field": 1}
    assert read_quarantine(report)[0]["row"] == 5  # the item's index in the array


def test_directories_read_only_data_files_and_say_what_they_skipped(ray_cluster, tmp_path, tiny_model_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(_good(1) + b"\n")
    (folder / "notes.txt").write_text("not data\n")
    (folder / "b.json").write_text(json.dumps([GOOD]))
    (folder / ".git" / "objects").mkdir(parents=True)  # a dot-directory is not walked
    (folder / ".git" / "objects" / "c.jsonl").write_bytes(_good(2) + b"\n")
    secret = tmp_path / "outside.jsonl"  # a link to a file outside the directory is never read (or quarantined)
    secret.write_text('{"password": "hunter2"}\n')
    (folder / "linked.jsonl").symlink_to(secret)
    _, report = run_stage(tmp_path, tiny_model_dir, [folder])
    assert report.ok == 2 and report.num_quarantined == 0
    skipped = report.skipped_files
    assert (skipped.not_data, skipped.links_outside) == (1, 1)
    assert sorted(Path(p).name for p in skipped.examples) == ["linked.jsonl", "notes.txt"]
    line = report.summary_line()
    assert "2 files skipped (1 not .jsonl/.json/.gz/.parquet, 1 links to outside the directory)" in line
    assert report.total == 2  # the linked file's line was never read, so never copied into the quarantine


def test_a_record_over_max_record_bytes_is_quarantined_and_the_next_one_read(ray_cluster, tmp_path, tiny_model_dir):
    path = tmp_path / "big.jsonl"
    huge = json.dumps({**GOOD, "chosen": "x" * 200_000}).encode()
    path.write_bytes(_good(1) + b"\n" + huge + b"\n" + _good(2) + b"\n")
    _, report = run_stage(tmp_path, tiny_model_dir, [path], max_quarantine_fraction=0.5, max_record_bytes=100_000)
    assert report.ok == 2 and report.quarantined == {"too_large": 1}
    [entry] = read_quarantine(report)
    assert entry["row"] == 2 and "over data.max_record_bytes=100000" in entry["detail"]
    assert len(entry["record"]) <= 10_000 + 40  # the head only, never the whole record


def test_expanding_a_directory_is_linear_in_its_files(tmp_path):
    """8,000 files (2,000 data files): every data file kept once, the rest counted, not listed."""
    from rayalign.data.reading import input_files

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8_000):
        (folder / (f"{i:05d}.jsonl" if i % 4 == 0 else f"{i:05d}.txt")).touch()
    inputs = input_files([str(folder)])
    assert len(inputs.files) == 2_000 and inputs.files == sorted(inputs.files)
    assert inputs.skipped.not_data == 6_000 and len(inputs.skipped.examples) == 3


def test_unreadable_inputs_are_one_line_errors_before_any_record_is_read(ray_cluster, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataQualityError, match="is a directory with no .jsonl.*it is empty"):
        run_stage(tmp_path, tiny_model_dir, [empty])
    table = pa.table({"question": ["q"], "answer": ["a"]})
    pq.write_table(table, tmp_path / "wrong.parquet")
    with pytest.raises(
        DataQualityError, match=r"wrong.parquet: no 'chosen' or 'rejected' column \(the file has: answer, "
    ):
        run_stage(tmp_path, tiny_model_dir, [tmp_path / "wrong.parquet"])


def test_an_hh_transcript_without_an_assistant_turn_says_so():
    record = json.dumps({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi\n\nAssistant: no"})
    with pytest.raises(RecordError) as err:
        parse_record(record, "auto")
    assert err.value.reason == "hh_no_assistant_turn" and err.value.field == "chosen"


# ------------------------------------------------------------------ fuzz


def _malformed(rng: random.Random, i: int) -> bytes:
    """One record, good or broken in one of many ways."""
    good = {"prompt": f"Q{i}: {rng.randint(0, 99)}+1=?", "chosen": f" {i}", "rejected": f" {i + 1}"}
    kind = rng.randrange(12)
    if kind == 0:
        return json.dumps(good).encode()
    if kind == 1:
        text = json.dumps(good).encode()
        return text[: rng.randrange(1, len(text))]  # cut anywhere
    if kind == 2:
        return json.dumps(
            {**good, rng.choice(["prompt", "chosen", "rejected"]): rng.choice([None, 7, [], {}, 1.5])}
        ).encode()
    if kind == 3:
        return json.dumps(good).encode().replace(b"Q", bytes([rng.randrange(0x80, 0x100)]))  # bad UTF-8
    if kind == 4:
        return json.dumps({**good, "chosen": "x" * rng.randrange(10_000, 100_000)}).encode()  # huge field
    if kind == 5:
        return json.dumps({"a": {"b": [good, {"c": None}]}, "chosen": {"nested": good}}).encode()  # nested junk
    if kind == 6:
        return rng.choice([b"[1, 2]", b"null", b"42", b'"text"', b"{}", b"\x00\x01\x02"])
    if kind == 7:
        return json.dumps({**good, "rejected": good["chosen"]}).encode()  # identical
    if kind == 9:  # valid JSON nested past the parser's recursion limit, about 2 KB
        return (json.dumps(good)[:-1] + ', "deep": ' + "[" * 1000 + "]" * 1000 + "}").encode()
    if kind == 10:  # valid JSON, invalid text: a lone surrogate escape
        return json.dumps({**good, rng.choice(["prompt", "chosen", "rejected"]): "ok \ud83d then text"}).encode()
    if kind == 11:  # the tokenizer's special-token text already in the data
        return json.dumps(
            {
                "prompt": "<bos>" + good["prompt"],
                "chosen": good["chosen"] + "<eos>",
                "rejected": good["rejected"] + "<eos><eos>",
            }
        ).encode()
    return json.dumps(
        {"chosen": "\n\nHuman: hi" * rng.randrange(1, 3), "rejected": "\n\nHuman: hi\n\nAssistant: x"}
    ).encode()


def _storable(text: str | None) -> str | None:
    """Parquet holds UTF-8 only: a lone surrogate cannot be written there, so it goes in as its bytes' Latin-1."""
    if text is None:
        return None
    return (
        text.encode("utf-8", "surrogatepass").decode("latin-1")
        if any(0xD800 <= ord(c) < 0xE000 for c in text)
        else text
    )


def test_fuzzed_files_lose_no_record(ray_cluster, tmp_path, tiny_model_dir):
    """Hundreds of generated malformed records in JSONL, gzip and Parquet files: every record ends up usable
    or in the quarantine with a reason, and the stage either succeeds or stops with a one-line error."""
    rng = random.Random(1234)
    records = [_malformed(rng, i) for i in range(300)]
    plain = tmp_path / "fuzz.jsonl"
    plain.write_bytes(b"\n".join(records[:120]) + b"\n")
    zipped = tmp_path / "fuzz.jsonl.gz"
    zipped.write_bytes(gzip.compress(b"\n".join(records[120:240]) + b"\n"))
    rows = []
    for raw in records[240:]:
        try:
            obj = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            obj = {"chosen": raw.decode("latin-1"), "rejected": None}
        obj = obj if isinstance(obj, dict) else {"chosen": json.dumps(obj), "rejected": "r"}
        rows.append(
            {
                k: (_storable(v) if isinstance(v, str) or v is None else json.dumps(v))
                for k, v in obj.items()
                if k in ("prompt", "chosen", "rejected")
            }
        )
    table = pa.Table.from_pylist(
        [{"prompt": r.get("prompt"), "chosen": r.get("chosen"), "rejected": r.get("rejected")} for r in rows]
    )
    pq.write_table(table, tmp_path / "fuzz.parquet")
    expected = {
        "fuzz.jsonl": sum(1 for r in records[:120] if r.strip()),
        "fuzz.jsonl.gz": sum(1 for r in records[120:240] if r.strip()),
        "fuzz.parquet": len(rows),
    }
    checked = []
    for name, count in expected.items():
        work = tmp_path / f"stage-{name.replace('.', '-')}"
        work.mkdir()
        try:
            # A low max_record_bytes: some of the huge-field records are over it (quarantined as too_large).
            _, report = run_stage(
                work, tiny_model_dir, [tmp_path / name], max_quarantine_fraction=1.0, max_record_bytes=60_000
            )
        except DataQualityError as err:  # a one-line error is an allowed outcome; a traceback is not
            assert "\n" not in str(err)
            continue
        quarantine = read_quarantine(report)
        assert report.total == count, name
        assert report.ok + report.num_quarantined == report.total == report.ok + len(quarantine), name
        assert all(q["reason"] and q["source"].endswith(name) for q in quarantine), name
        assert len({q["row"] for q in quarantine}) == len(quarantine), name  # one entry per record
        checked.append(name)
    assert checked == list(expected)  # with max_quarantine_fraction 1.0 no file may stop the stage


# ------------------------------------------------------------------ the command line: one line, exit 2, early


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from rayalign.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _last_line(stderr: str) -> str:
    """rayalign's own message: the last line (libraries may print progress to stderr before it)."""
    return stderr.strip().splitlines()[-1]


def _data_config(tmp_path: Path, lines: list[bytes], **data) -> Path:
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = {
        "model": {"tiny": {}},
        "data": {"paths": [str(tmp_path / "in.jsonl")], "max_length": 64, "max_prompt_length": 32, **data},
        "train": {"micro_batch_size": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "output": {"root": str(tmp_path / "runs"), "name": "bad"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_validate_counts_without_training_and_ends_with_json(ray_cluster, tmp_path, capsys):
    config = _data_config(
        tmp_path, [_good(i) for i in range(6)] + [b'{"prompt": 1}', b"\xff"], max_quarantine_fraction=0.5
    )
    code, out, err = _cli(capsys, "validate", "--config", str(config), "--json")
    counts = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and counts["records"] == 8 and counts["usable"] == 6 and counts["ok"] is True
    assert counts["quarantined_by_reason"] == {"bad_utf8": 1, "not_a_string": 1} and counts["optimizer_steps"] == 3
    assert "[rayalign] data: 8 records, 6 usable" in out and not (tmp_path / "runs" / "bad" / "model").exists()

    code, out, err = _cli(
        capsys, "validate", "--config", str(config), "--json", "--set", "data.max_quarantine_fraction=0.1"
    )
    assert code == 2 and json.loads(out.strip().splitlines()[-1])["ok"] is False
    assert "above data.max_quarantine_fraction" in _last_line(err) and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.gradient_accumulation_steps=64"], "usable pairs are not enough for one optimizer step"),
        (["data.max_quarantine_fraction=1.0", "data.format=hh"], "none of the 6 records is usable"),
    ],
)
def test_too_few_pairs_stop_train_and_audit_with_one_line(ray_cluster, tmp_path, capsys, overrides, message):
    config = _data_config(tmp_path, [_good(i) for i in range(6)])
    for command in ("train", "audit"):
        args = [command, "--config", str(config)] + [a for o in overrides for a in ("--set", o)]
        code, out, err = _cli(capsys, *args)
        if command == "audit" and "optimizer step" in message:
            assert code == 0  # an audit needs pairs, not optimizer steps
            continue
        assert code == 2 and message in _last_line(err), (command, err)
        assert "Traceback" not in out + err


def test_a_diverging_run_stops_and_saves_no_model(ray_cluster, tmp_path, capsys):
    config = _data_config(tmp_path, [_good(i) for i in range(16)])
    code, out, err = _cli(
        capsys, "train", "--config", str(config), "--set", "train.learning_rate=1e30", "--set", "train.max_grad_norm=0"
    )
    assert code == 1 and "training diverged and was stopped, no model was saved" in _last_line(err)
    assert not (tmp_path / "runs" / "bad" / "model").exists()
