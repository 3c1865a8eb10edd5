"""The run report: PNG figure and terminal table from synthetic run directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import pytest

from rayalign.diagnostics.report import DPI, FIGSIZE, default_out_path, format_runs_table, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = range(2, 42, 2)


def _row(step: int, loss: float, rew_acc: float, abs_acc: float, in_u: float, chosen: float, rejected: float):
    return {
        "step": step, "epoch": 0, "lr": 1e-3, "loss": loss,
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
        "rewards/accuracies": rew_acc, "logps/chosen": -16 + chosen, "logps/rejected": -16 + rejected,
        "pref/absolute_accuracy": abs_acc, "pref/frac_in_U": in_u, "pairs/s": 100.0, "tokens/s": 3000.0,
    }  # fmt: skip


def _write_run(root: Path, name: str, loss_type: str, pathological: bool) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rows = []
    for i, step in enumerate(STEPS):
        t = i / (len(STEPS) - 1)
        if pathological:
            # Loss and reward accuracy improve, yet the policy keeps preferring y_l: U fills up.
            row = _row(step, 0.69 - 0.4 * t, 0.5 + 0.45 * t, 0.45 - 0.1 * t, 0.05 + 0.5 * t, -0.5 * t, -2.0 * t)
        else:
            row = _row(step, 0.69 - 0.3 * t, 0.5 + 0.4 * t, 0.5 + 0.4 * t, 0.02, 0.3 * t, -1.0 * t)
        if step % 10 == 0:
            row.update({f"eval/{k}": v * 0.95 for k, v in row.items() if k not in ("step", "epoch", "lr")})
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text(f"output:\n  name: {name}\n  root: {root}\nloss:\n  type: {loss_type}\n")
    if pathological:
        alarms = [{"step": 24, "reason": "loss fell while pref/absolute_accuracy stayed < 0.5"}]
        (run_dir / "summary.json").write_text(json.dumps({"run": name, "alarms": alarms}))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    return _write_run(tmp_path, "healthy-cpo", "cpo", False), _write_run(tmp_path, "sick-dpo", "dpo", True)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 20_000
    height, width = round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI)
    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_plot_one_run(runs):
    out = plot_runs([runs[1]])
    assert out == runs[1].resolve() / "report.png"
    _assert_png(out)


def test_plot_two_runs(runs):
    out = plot_runs(list(runs))
    assert out == runs[0].resolve().parent / "compare-healthy-cpo-vs-sick-dpo.png"
    _assert_png(out)


def test_plot_explicit_out_path(runs, tmp_path):
    out = plot_runs(list(runs), tmp_path / "figs" / "x.png")
    assert out == tmp_path / "figs" / "x.png"
    _assert_png(out)


def test_default_name_stays_short(tmp_path):
    dirs = [tmp_path / f"run {i} with a very long name, {'x' * 80}" for i in range(6)]
    name = default_out_path(dirs).name
    assert len(name) < 100 and " " not in name and name.endswith("-and-4-more.png")


def test_missing_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        plot_runs([tmp_path])


def test_empty_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "metrics.jsonl"))):
        plot_runs([tmp_path])


def test_runs_table(runs):
    table = format_runs_table(list(runs))
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["run", "loss", "reward", "acc", "abs"]
    assert "healthy-cpo (cpo)" in lines[2] and "sick-dpo (dpo)" in lines[3]
    assert "0.690 → 0.290" in lines[3] and "0.450 → 0.350" in lines[3] and "0.050 → 0.550" in lines[3]
