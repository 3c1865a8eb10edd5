"""`rayalign evaluate`: what the policy and the reference write, scored by a verifier or a reward model, compared
per prompt. That a policy trained on the arithmetic task writes more correct answers than its reference is shown
by tests/test_pathology_job.py, which evaluates every run after training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_config

from rayalign.evaluation.scoring import arithmetic, load_verifier, score, win_rate


def test_the_arithmetic_verifier_checks_the_sum():
    assert arithmetic("Q: 3+4=?\nA:", " 7", {}) == 1.0
    assert arithmetic("Q: 3+4=?\nA:", " 8 or 7", {}) == 0.0  # the first number is the answer
    assert arithmetic("Q: 3+4=?\nA:", " seven", {}) == 0.0
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        arithmetic("Tell me a joke", "7", {})


def test_a_verifier_that_raises_marks_that_response_only():
    marked = score(load_verifier("json:loads"), "Q: 1+1=?\nA:", "not json", {})
    assert marked.score is None and marked.error.startswith("TypeError")
    assert score(load_verifier("arithmetic"), "Q: 1+1=?\nA:", " 2", {}).score == 1.0
    # One that cannot be loaded stops the command in one line, before anything is generated or trained.
    from rayalign.config import ConfigError

    for name, why in (("nosuchmodule:check", "ModuleNotFoundError"), ("json:nosuchfunction", "AttributeError")):
        with pytest.raises(ConfigError, match=f"cannot load {name} \\({why}: .*PYTHONPATH") as err:
            load_verifier(name)
        assert "\n" not in str(err.value)


def test_the_win_rate_counts_ties_half_and_has_a_bootstrap_interval():
    wins = win_rate([1, 1, 0, 1], [0, 1, 0, 0])
    assert (wins.win, wins.tie, wins.loss, wins.win_rate) == (0.5, 0.5, 0.0, 0.75)
    assert wins.win_rate_low <= 0.75 <= wins.win_rate_high and wins.win_rate_high <= 1.0
    assert win_rate([1] * 20, [0] * 20).win_rate_low == 1.0
    with pytest.raises(ValueError, match="no prompt was scored"):
        win_rate([], [])


def test_one_console_line_per_evaluation():
    from rayalign.evaluation.report import eval_numbers, evaluation_line

    def side(score, tokens):
        return [{"response": " 7", "tokens": tokens, "score": score}]

    records = [{"prompt": "Q", "policy": side(1.0, 2), "reference": side(0.0, 4)} for _ in range(9)]
    unscored = [{"response": " 7", "tokens": 2, "score": None, "error": "TypeError: takes 2 arguments"}]
    records.append({"prompt": "Q", "policy": unscored, "reference": side(0.0, 4)})  # the verifier raised
    report = {**eval_numbers(records, scored=True), "scorer": "arithmetic"}
    assert (report["eval/gen/score"], report["eval/gen/reference_score"]) == (1.0, 0.0)
    assert report["eval/gen/unscored_prompts"] == report["eval/gen/unscored_responses"] == 1
    line = evaluation_line(report)
    assert "\n" not in line and line.startswith(
        "evaluate: 10 prompts, arithmetic policy 1 vs reference 0, win rate 1.00"
    )
    assert line.endswith("2.0 vs 4.0 tokens; 1 response(s) unscored (first: TypeError: takes 2 arguments)")
    assert evaluation_line(eval_numbers(records, scored=False)) == "evaluate: 10 prompts, not scored; 2.0 vs 4.0 tokens"
    failed = evaluation_line({"error": "ModuleNotFoundError: No module named 'mine'"})  # after training: run kept
    assert failed == "evaluate: failed (ModuleNotFoundError: No module named 'mine'); the trained model is kept"


def _reward_model(base: Path, out: Path) -> Path:
    """A randomly initialised one-output classifier with the tiny model's shape and tokenizer: its scores mean
    nothing about quality, it runs the reward-model code path."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from rayalign.models import load_tokenizer

    config = AutoConfig.from_pretrained(base)
    config.num_labels, config.pad_token_id = 1, load_tokenizer(base).pad_token_id
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    load_tokenizer(base).save_pretrained(out)
    return out


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_prompt_file_a_verifier_that_fails_on_one_record_and_a_reward_model(ray_cluster, tmp_path, tiny_model_dir):
    from rayalign.config import ConfigError
    from rayalign.evaluation.stage import run_evaluate

    prompts = tmp_path / "suite.jsonl"
    lines = [json.dumps({"prompt": f"Q: {i}+1=?\nA:", "answer": i + 1}) for i in range(5)]
    lines.insert(2, json.dumps({"prompt": "Q: 9+9=?\nA:"}))  # no answer: the verifier raises on this record
    lines.insert(4, json.dumps({"question": "no prompt field"}))  # quarantined, named by file, record and field
    lines.append(json.dumps({"prompt": "  "}))  # quarantined too: an empty prompt
    prompts.write_text("\n".join(lines) + "\n")
    settings = {"prompts": str(prompts), "max_new_tokens": 4, "cpus_per_actor": 0.5}
    verified = make_config(
        tmp_path,
        model={"tiny": None, "path": str(tiny_model_dir)},
        eval={"generation": {**settings, "verifier": "example_verifiers:answer_field"}},
    )
    report = run_evaluate(verified, str(tiny_model_dir))  # the policy is the reference itself
    assert report["prompts"] == {
        "source": str(prompts),
        "asked": 6,
        "quarantined": {"missing_field": 1, "empty_prompt": 1},
    }
    assert report["eval/gen/unscored_responses"] == 2 and report["eval/gen/unscored_prompts"] == 1
    assert report["eval/gen/win_rate"] == 0.5 and report["eval/gen/tie"] == 1.0  # the same model on both sides
    out = verified.output.run_dir / "evaluate"
    quarantined = [json.loads(line) for line in (out / "quarantine.jsonl").open()]
    assert [(q["row"], q["field"], q["reason"]) for q in quarantined] == [
        (5, "prompt", "missing_field"),
        (8, "prompt", "empty_prompt"),
    ]
    rows = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert rows[2]["policy"][0]["score"] is None and rows[2]["policy"][0]["error"].startswith("KeyError")
    assert (out / "evaluation.png").stat().st_size > 0
    assert rows[0]["record"] == {"prompt": "Q: 0+1=?\nA:", "answer": 1}  # what the verifier saw
    with pytest.raises(ConfigError, match="holds an evaluation already.*give --name NAME to keep both, or --replace"):
        run_evaluate(verified, str(tiny_model_dir))  # refused before anything is generated

    scored = make_config(
        tmp_path,
        model={"tiny": None, "path": str(tiny_model_dir)},
        eval={"generation": {**settings, "reward_model": str(_reward_model(tiny_model_dir, tmp_path / "rm"))}},
        output={"name": "rm"},
    )
    report = run_evaluate(scored, str(tiny_model_dir))
    assert report["scorer"].startswith("reward_model:") and report["eval/gen/unscored_responses"] == 0
    rows = [json.loads(line) for line in (scored.output.run_dir / "evaluate" / "generations.jsonl").open()]
    assert all(isinstance(r["policy"][0]["score"], float) for r in rows)
    assert report["eval/gen/score"] == pytest.approx(report["eval/gen/reference_score"])


def test_the_policy_is_a_model_or_run_directory_local_or_in_storage(tmp_path, tiny_model_dir):
    from rayalign.config import ConfigError
    from rayalign.evaluation.stage import policy_dir

    cfg = make_config(tmp_path)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    assert policy_dir(cfg, str(run)) == run / "model" and policy_dir(cfg, str(tiny_model_dir)) == tiny_model_dir
    fetched = policy_dir(cfg, f"file://{run}")  # a run directory in storage: its model/ is fetched
    assert fetched == cfg.output.run_dir / "evaluate" / "policy" and (fetched / "config.json").is_file()
    with pytest.raises(ConfigError, match="holds neither a model nor a run's model/"):
        policy_dir(cfg, f"file://{tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match="neither a model directory nor a run directory with model/"):
        policy_dir(cfg, str(tmp_path))
    with pytest.raises(ConfigError, match="--policy .*nowhere: no such file or directory"):
        policy_dir(cfg, str(tmp_path / "nowhere"))
