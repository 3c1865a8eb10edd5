"""Run storage (output.storage: a directory or a URI) and the standalone reference pass."""

from __future__ import annotations

import json

import pytest

from conftest import make_config
from rayalign.config import ConfigError, config_from_dict
from rayalign.storage import is_same_place, publish, read_text, remove, upload


def test_storage_must_be_a_uri_or_a_path():
    tree = {"model": {"tiny": {}}, "data": {"synthetic": {}}, "output": {"storage": "3s://bucket"}}
    with pytest.raises(ConfigError, match=r"output.storage: not a URI: '3s://bucket'"):
        config_from_dict(tree)


def test_run_storage_defaults_to_the_run_directory(tmp_path):
    cfg = make_config(tmp_path)
    assert cfg.output.run_storage == str(cfg.output.run_dir)
    assert is_same_place(cfg.output.run_dir, cfg.output.run_storage)
    stored = make_config(tmp_path, output={"storage": f"file://{tmp_path}/store/"})
    assert stored.output.run_storage == f"file://{tmp_path}/store/test"
    assert not is_same_place(stored.output.run_dir, stored.output.run_storage)


def test_upload_and_publish_copy_files_and_directories(tmp_path):
    cfg = make_config(tmp_path, output={"storage": f"file://{tmp_path}/store"})
    audit = cfg.output.run_dir / "audit"
    (audit / "nested").mkdir(parents=True)
    (audit / "audit.json").write_text("{}")
    (audit / "nested" / "x.txt").write_text("x")
    assert publish(cfg.output, audit) == f"file://{tmp_path}/store/test/audit"
    assert (tmp_path / "store/test/audit/audit.json").read_text() == "{}"
    assert (tmp_path / "store/test/audit/nested/x.txt").read_text() == "x"
    upload(audit / "audit.json", f"{tmp_path}/plain/dir/a.json")
    assert (tmp_path / "plain/dir/a.json").exists()
    assert read_text(f"file://{tmp_path}/store/test/audit/nested/x.txt") == "x"
    assert read_text(f"file://{tmp_path}/store/test/audit/missing.txt") is None
    remove(f"file://{tmp_path}/store/test/audit")
    assert not (tmp_path / "store/test/audit").exists()
    remove(f"file://{tmp_path}/store/test/audit")  # already gone: nothing to do


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
    assert list((tmp_path / "refcache" / first["cache"]["key"] / "data").glob("*.parquet"))
