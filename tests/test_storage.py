"""Run storage (output.storage: a directory or a URI) and the standalone reference pass."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, make_config

from rayalign.config import ConfigError, config_from_dict
from rayalign.storage import is_same_place, location, publish, read_text, remove, run_location, upload


def test_storage_must_be_a_uri_or_a_path():
    tree = {"model": {"tiny": {}}, "data": {"synthetic": {}}, "output": {"storage": "3s://bucket"}}
    with pytest.raises(ConfigError, match=r"output.storage: .*not a URI: '3s://bucket'"):
        config_from_dict(tree)


@pytest.mark.parametrize("key", ["output.storage", "output.root", "reference.cache_root", "data.paths"])
def test_storage_uris_refuse_credentials_and_unknown_schemes(key):
    def tree(value):
        base = {"model": {"tiny": {}}, "data": {"synthetic": {}}}
        section, name = key.split(".")
        if key == "data.paths":
            return {**base, "data": {"paths": [value]}}
        return {**base, section: {name: value}}

    with pytest.raises(
        ConfigError,
        match=r"credentials in a storage URI \(s3://bucket\.\.\.\) are refused: .*"
        r"AWS_ACCESS_KEY_ID",
    ) as err:
        config_from_dict(tree("s3://AKIA123:hunter2@bucket/runs"))
    assert "hunter2" not in str(err.value) and "AKIA123" not in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown storage scheme 'ftp'"):
        config_from_dict(tree("ftp://host/runs"))
    with pytest.raises(ConfigError, match=r"unknown storage scheme 's3a' in 's3a://\*\*\*@bucket/x'") as err:
        config_from_dict(tree("s3a://AKIA123:hunter2@bucket/x"))  # refused for its scheme, still never shown
    assert "hunter2" not in str(err.value)


def test_an_endpoint_with_credentials_is_refused_without_showing_them():
    with pytest.raises(ConfigError, match=r"host:port only \('\*\*\*@minio:9000'\)") as err:
        config_from_dict(
            {
                "model": {"tiny": {}},
                "data": {"synthetic": {}},
                "output": {"s3": {"endpoint": "user:hunter2@minio:9000"}},
            }
        )
    assert "hunter2" not in str(err.value)


def test_a_new_run_clears_the_previous_runs_results_in_storage(tmp_path):
    from rayalign.storage import prepare_run_dir

    cfg = make_config(tmp_path, output={"storage": f"file://{tmp_path}/store"})
    kept = tmp_path / "store" / "test"
    (kept / "model").mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl", "quarantine.jsonl", "model/model.safetensors"):
        (kept / name).write_text("from the previous run")
    (kept / "ray").mkdir()  # Ray Train's checkpoints stay: a restored sweep trial continues from them
    prepare_run_dir(cfg)
    assert sorted(p.name for p in kept.iterdir()) == ["ray"]


def test_a_storage_uri_as_output_root_names_the_storage(tmp_path):
    cfg = config_from_dict(
        {
            "model": {"tiny": {}},
            "data": {"synthetic": {}},
            "output": {"root": "s3://bucket/runs/", "name": "x", "s3": {"endpoint": "127.0.0.1:9000"}},
        }
    )
    assert (cfg.output.storage, cfg.output.root, cfg.output.run_storage) == (
        "s3://bucket/runs",
        "runs",
        "s3://bucket/runs/x",
    )
    assert cfg.output.is_remote and cfg.reference.cache_root is None
    stored = run_location(cfg.output)
    assert (stored.path, stored.fs.type_name, stored.is_local) == ("bucket/runs/x", "s3", False)
    # The endpoint travels with the filesystem; credentials never do (each node reads its environment).
    assert stored.fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9000"
    assert stored.fs.__reduce__()[1][0]["access_key"] is None
    local = config_from_dict(
        {"model": {"tiny": {}}, "data": {"synthetic": {}}, "output": {"root": f"file://{tmp_path}/runs"}}
    )
    assert local.output.storage is None and local.output.run_dir == tmp_path / "runs" / "run"
    with pytest.raises(ConfigError, match="set only output.storage"):
        config_from_dict(
            {
                "model": {"tiny": {}},
                "data": {"synthetic": {}},
                "output": {"root": "s3://a/runs", "storage": "s3://b/runs"},
            }
        )
    with pytest.raises(ConfigError, match="host:port only"):
        config_from_dict(
            {"model": {"tiny": {}}, "data": {"synthetic": {}}, "output": {"s3": {"endpoint": "http://127.0.0.1:9000"}}}
        )


def test_a_sweep_kept_in_object_storage_refuses_tracker_stores_its_trials_cannot_reach():
    tree = {
        "model": {"tiny": {}},
        "data": {"synthetic": {}, "eval_fraction": 0.2},
        "loss": {"type": "cpo"},
        "sweep": {"space": {"loss.gamma": {"values": [0.5, 1.0]}}, "early_stopping": "none"},
        "output": {"storage": "s3://bucket/runs", "trackers": ["mlflow", "tensorboard"]},
    }
    with pytest.raises(
        ConfigError,
        match=r"output.trackers: mlflow needs a tracking server .*; tensorboard writes "
        r"event files on each trial's node",
    ):
        config_from_dict(tree)
    tree["output"] = {
        **tree["output"],
        "trackers": ["mlflow"],
        "tracking": {"mlflow_tracking_uri": "http://mlflow:5000"},
    }
    config_from_dict(tree)  # a tracking server every node reaches
    tree["output"] = {"storage": "/shared/runs", "trackers": ["mlflow", "tensorboard"]}
    config_from_dict(tree)  # a shared mount: the stores beside it are shared too


def test_run_storage_defaults_to_the_run_directory(tmp_path):
    cfg = make_config(tmp_path)
    assert cfg.output.run_storage == str(cfg.output.run_dir)
    assert is_same_place(cfg.output.run_dir, run_location(cfg.output))
    stored = make_config(tmp_path, output={"storage": f"file://{tmp_path}/store/"})
    assert stored.output.run_storage == f"file://{tmp_path}/store/test"
    assert not is_same_place(stored.output.run_dir, run_location(stored.output))


def test_upload_and_publish_copy_files_and_directories(tmp_path):
    cfg = make_config(tmp_path, output={"storage": f"file://{tmp_path}/store"})
    audit = cfg.output.run_dir / "audit"
    (audit / "nested").mkdir(parents=True)
    (audit / "audit.json").write_text("{}")
    (audit / "nested" / "x.txt").write_text("x")
    assert publish(cfg.output, audit).uri == f"file://{tmp_path}/store/test/audit"
    assert (tmp_path / "store/test/audit/audit.json").read_text() == "{}"
    assert (tmp_path / "store/test/audit/nested/x.txt").read_text() == "x"
    upload(audit / "audit.json", location(f"{tmp_path}/plain/dir/a.json"))
    assert (tmp_path / "plain/dir/a.json").exists()
    assert read_text(location(f"file://{tmp_path}/store/test/audit/nested/x.txt")) == "x"
    assert read_text(location(f"file://{tmp_path}/store/test/audit/missing.txt")) is None
    remove(location(f"file://{tmp_path}/store/test/audit"))
    assert not (tmp_path / "store/test/audit").exists()
    remove(location(f"file://{tmp_path}/store/test/audit"))  # already gone: nothing to do


@pytest.mark.e2e
def test_reference_pass_fills_the_cache_once(ray_cluster, tmp_path):
    from rayalign.pipeline import run_reference

    cfg = make_config(
        tmp_path,
        data={"synthetic": {"num_pairs": 32}},
        reference={"cache_root": str(tmp_path / "refcache")},  # cache: false in the config; the pass forces it
    )
    first = run_reference(cfg)
    assert first["cache"]["hit"] is False and first["scored_pairs"] == first["data"]["ok"] > 0
    second = run_reference(cfg)
    assert second["cache"]["hit"] is True and second["cache"]["key"] == first["cache"]["key"]
    written = json.loads((cfg.output.run_dir / "reference" / "reference.json").read_text())
    assert written["cache"]["hit"] is True
    assert list((tmp_path / "refcache" / "refstore" / first["cache"]["key"]).glob("segments/*.parquet"))


def test_models_are_published_by_content_and_fetched_once_per_node(tmp_path, tiny_model_dir, monkeypatch):
    import rayalign.models as models
    from rayalign.models import MODEL_MANIFEST, content_digest, fetch_model, publish_model

    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "driver-cache"))
    store = location(str(tmp_path / "store"))
    source = publish_model(tiny_model_dir, store)
    assert source.key == f"{tiny_model_dir.name}-{content_digest(tiny_model_dir)[:16]}"
    published = tmp_path / "store" / "_models" / source.key
    assert (published / MODEL_MANIFEST).is_file() and (published / "config.json").is_file()
    stamp = (published / MODEL_MANIFEST).stat().st_mtime_ns
    # The same content again: the digest comes from the memo (no file is read) and nothing is uploaded.
    monkeypatch.setattr(models, "_sha256", lambda path: pytest.fail(f"{path} read again"))
    assert publish_model(tiny_model_dir, store) == source
    assert (published / MODEL_MANIFEST).stat().st_mtime_ns == stamp
    monkeypatch.undo()

    node_copy = tmp_path / "node-cache" / source.key
    assert fetch_model(source.stored, node_copy) == node_copy
    assert (node_copy / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    (published / "model.safetensors").unlink()  # a second fetch on this node never reads storage again
    assert fetch_model(source.stored, node_copy) == node_copy

    # A copy that arrives short is refused and leaves nothing that looks complete.
    (published / "model.safetensors").write_bytes(b"truncated")
    other = tmp_path / "other-node" / source.key
    with pytest.raises(OSError, match="arrived incomplete"):
        fetch_model(source.stored, other)
    assert not other.exists() and not list(other.parent.glob("*.partial"))


@pytest.mark.e2e
def test_the_storage_check_names_the_node_and_what_it_cannot_reach(ray_cluster, tmp_path, tiny_model_dir):
    from rayalign.errors import StorageError
    from rayalign.models import ModelSource, publish_model
    from rayalign.probe import PROBE_DIR, check_storage

    cfg = make_config(tmp_path, output={"storage": f"file://{tmp_path}/store"})
    model = publish_model(tiny_model_dir, location(f"file://{tmp_path}/store"))
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    check_storage(cfg, model, [str(data)])  # one machine: every node sees everything
    assert not list((tmp_path / "store" / PROBE_DIR).iterdir())  # no probe is left behind
    with pytest.raises(
        StorageError,
        match=r"^data.paths: .*/gone.jsonl is not visible from node \S+ \(\w{8}\): "
        r"the nodes do not share this filesystem: set output.storage",
    ):
        check_storage(cfg, model, [str(tmp_path / "gone.jsonl")])
    lost = ModelSource(tmp_path / "nowhere", "nowhere-0")
    with pytest.raises(StorageError, match=r"^model: .*/nowhere is not visible from node \S+ \(\w{8}\)"):
        check_storage(cfg, lost, [str(data)])


def test_run_files_are_replaced_whole_never_written_in_place(tmp_path):
    """A file is written beside its name and moved onto it when complete: a write that fails (a killed run)
    leaves the previous file as it was and no half-written one; and no module writes a run file in place."""
    import re

    from rayalign.storage import replaced_whole, write_local

    target = tmp_path / "summary.json"
    write_local(target, '{"complete": true}')
    with pytest.raises(RuntimeError):
        with replaced_whole(target) as f:
            f.write('{"comp')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"complete": true}' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]

    in_place = re.compile(r"\.write_text\(|\.write_bytes\(|\.open\([\"']w|savefig\((?!f,)")
    package = REPO / "platform" / "rayalign"
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py")
        if path.name not in ("storage.py", "models.py")  # the writers themselves (staging folders)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if in_place.search(line)
    ]
    assert offenders == []
