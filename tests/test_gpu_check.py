"""`make gpu-check` in its CPU form: it says there is no GPU, the GPU tests skip with their reason, a 3-step
hh-dpo-1gpu run trains, and bench/gpu_throughput.py measures every contender on the same pairs, in one JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
from conftest import REPO, SHARED_DATA

# In `make test`'s second pytest process, beside the main suite: a `make gpu-check` subprocess, self-contained.
pytestmark = [pytest.mark.e2e, pytest.mark.second_stream]

HH = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
TRL_CONTENDERS = ("trl_precomputed_ref",)  # CI-sized: TRL without a precomputed reference is left out


def _trl_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("trl", "datasets"))


@pytest.fixture(scope="module")
def cpu_check(ray_cluster, tmp_path_factory):
    """One `make gpu-check` run; its subprocesses join the session's Ray cluster instead of starting their own."""
    import ray

    work = tmp_path_factory.mktemp("gpu-check")
    out = work / "gpu-check.json"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "gpu-check",
            f"GPU_CHECK_OUT={out}",
            f"GPU_CHECK_ARGS=--work-dir {work / 'work'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, (json.loads(out.read_text()) if out.is_file() else None)


@pytest.mark.skipif(not HH.is_file(), reason=f"shared HH-RLHF file not found: {HH} (see ../shared/data/README.md)")
@pytest.mark.timeout(660)
def test_gpu_check_runs_its_cpu_form_and_exits_0(cpu_check):
    done, report = cpu_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no GPU here" in done.stdout and report["table"] in done.stdout
    assert report["form"] == "cpu" and report["status"] == "ok" and report["device"]["type"] == "cpu"
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "gpu_tests": "ok",
        "train": "ok",
        "throughput": "ok",
    }
    assert all(part["wall_s"] <= part["budget_s"] for part in report["parts"].values())

    # Every GPU test is collected and skips with its reason.
    tests = report["tests"]
    assert len(tests) >= 7 and {case["outcome"] for case in tests} == {"skipped"}
    assert all("needs a CUDA GPU" in case["message"] for case in tests)

    train = report["train"]
    assert train["complete"] is True and train["steps_logged"] == [1, 2, 3]
    assert train["first"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert train["last_eval"] and "eval/loss" in train["last_eval"]


@pytest.mark.skipif(not HH.is_file(), reason=f"shared HH-RLHF file not found: {HH} (see ../shared/data/README.md)")
@pytest.mark.timeout(660)
def test_the_throughput_bench_measures_every_contender_on_the_same_data(cpu_check):
    report = cpu_check[1]["throughput"]
    assert report["status"] == "ok" and report["device"]["type"] == "cpu"
    for package in ("torch", "transformers", "ray", "deepspeed", "trl"):
        assert package in report["versions"]
    settings = report["settings"]
    assert settings["dtype"] == "float32" and settings["tiny"] is True and settings["shape"] == "tiny"
    # rayalign in passes of at most 256 tokens (several per step): the same steps, so the same numbers to check.
    assert settings["rayalign_overrides"] == ["train.tokens_per_batch=256"]
    assert settings["data"]["max_length"] == 128 and settings["data"]["max_prompt_length"] == 64
    assert settings["micro_batches"] == [8] and settings["steps"] > settings["warmup_steps"] > 0
    assert settings["model"]["parameters"]["non_embedding"] > 0
    assert report["peak_flops"]["flops_per_s"] > 0

    [block] = report["results"]
    contenders = block["contenders"]
    assert set(contenders) == {"rayalign", "bare", *TRL_CONTENDERS}
    ran = ["rayalign", "bare"]
    if _trl_installed():
        ran += TRL_CONTENDERS
    else:
        for name in TRL_CONTENDERS:
            assert contenders[name]["status"] == "skipped" and "install-bench" in contenders[name]["install"]
    for name in ran:
        result = contenders[name]
        assert result["status"] == "ok", (name, result)
        assert result["pairs_per_s"] > 0 and result["real_tokens_per_s"] > result["pairs_per_s"], name
        assert result["measured_steps"] == settings["steps"] - settings["warmup_steps"], name
        flops = 6 * settings["model"]["parameters"]["non_embedding"] * result["real_tokens_per_s"]
        assert result["mfu_real_tokens"] == pytest.approx(flops / report["peak_flops"]["flops_per_s"]), name
        # The same pairs: every contender computed on the same real tokens per pair, in total and
        # over the measured steps (same batches, same order), as the bench counted them itself.
        assert result["data_pairs"] == block["pairs"], name
        assert result["data_real_tokens_per_pair"] == pytest.approx(block["real_tokens_per_pair"], rel=1e-9), name
        assert result["real_tokens_per_pair"] == pytest.approx(contenders["bare"]["real_tokens_per_pair"], rel=1e-9), (
            name
        )
        # Policy = reference at the first step: every DPO loss starts at log 2.
        assert result["loss_first"] == pytest.approx(0.6931, abs=1e-3), name
    rayalign = contenders["rayalign"]
    assert rayalign["data_ok"] == block["pairs"]
    # Timed from outside as its rows appeared, and by its own metrics.jsonl rates: both present.
    assert rayalign["timing"].startswith("wall-clock") and rayalign["from_metrics_jsonl"]["pairs_per_s"] > 0
    for name in ran[1:]:
        assert block["ratios"][f"rayalign/{name}"] > 0
    assert "| rayalign |" in report["table"]


def test_the_bench_knows_the_smollm2_shape_and_rayaligns_layouts():
    """--shape picks a model shape; rayalign's other layouts are contenders of their own, by name."""
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "bench" / "gpu_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = bench  # dataclasses look their module up by name
    spec.loader.exec_module(bench)
    args = bench.parse_args(
        ["--device", "cpu", "--shape", "smollm2-135m", "--contenders", "rayalign,rayalign_flex,bare"]
    )
    assert args.shape == "smollm2-135m" and args.contenders == ["rayalign", "rayalign_flex", "bare"]
    smol = bench.SHAPES["smollm2-135m"]
    assert (smol.layers, smol.hidden, smol.heads, smol.kv_heads, smol.mlp, smol.vocab) == (30, 576, 9, 3, 1536, 49152)
    assert smol.tie_embeddings and bench.parse_args(["--tiny"]).shape == "tiny"
    assert bench.RAYALIGN_VARIANTS["rayalign_flex"] == (
        "model.attn_implementation=flex_attention",
        "train.packing.layout=packed",
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--contenders", "rayalign,nope"])
