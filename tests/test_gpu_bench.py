"""bench/gpu_throughput.py end to end in its CPU form: every contender trains on the same pairs, one run."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.e2e

HH = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
TRL_CONTENDERS = ("trl_precomputed_ref", "trl")


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "bench" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _trl_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("trl", "datasets"))


@pytest.mark.skipif(not HH.is_file(), reason=f"shared HH-RLHF file not found: {HH} (see ../shared/data/README.md)")
@pytest.mark.timeout(300)
def test_cpu_tiny_run_measures_every_contender_on_the_same_data(ray_cluster, tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "gpu.json"
    # rayalign in passes of at most 256 tokens (several per step): the same steps, so the same numbers to check.
    rc = bench.main(["--device", "cpu", "--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work"),
                     "--rayalign-set", "train.tokens_per_batch=256"])
    assert rc == 0, capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["status"] == "ok" and report["device"]["type"] == "cpu"
    for package in ("torch", "transformers", "ray", "deepspeed", "trl"):
        assert package in report["versions"]
    settings = report["settings"]
    assert settings["dtype"] == "float32" and settings["tiny"] is True
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
        assert result["real_tokens_per_pair"] == pytest.approx(contenders["bare"]["real_tokens_per_pair"], rel=1e-9), name
        # Policy = reference at the first step: every DPO loss starts at log 2.
        assert result["loss_first"] == pytest.approx(0.6931, abs=1e-3), name
    rayalign = contenders["rayalign"]
    assert rayalign["data_ok"] == block["pairs"]
    # Timed from outside as its rows appeared, and by its own metrics.jsonl rates: both present.
    assert rayalign["timing"].startswith("wall-clock") and rayalign["from_metrics_jsonl"]["pairs_per_s"] > 0
    for name in ran[1:]:
        assert block["ratios"][f"rayalign/{name}"] > 0
    assert "| rayalign |" in report["table"] and report["table"] in capsys.readouterr().out
