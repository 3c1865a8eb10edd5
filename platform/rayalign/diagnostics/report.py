"""Plots and a terminal table for one or more run directories.

The figure puts the loss next to the metrics that expose DPO's failure mode: a loss that
keeps falling while the absolute preference accuracy stays below 0.5 and the fraction of
pairs in U = {δ_ref < δ_θ < 0} grows. Held-out ("eval/...") values are drawn dashed, and
alarm steps from summary.json as red vertical lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rayalign.config import S3Config
from rayalign.metrics import (
    ABSOLUTE_ACCURACY,
    ACTION,
    FRAC_IN_U,
    LOSS,
    REWARD_ACCURACY,
    REWARDS_CHOSEN,
    REWARDS_REJECTED,
    STEP,
    eval_key,
    is_eval,
)
from rayalign.storage import RUN_PLOT, read_jsonl, replaced_whole, write_local

# (metric key, panel title, draw the 0.5 chance line), in reading order: the top row is the
# failure-mode story (loss vs. both accuracies), the bottom row explains it.
PANELS: tuple[tuple[str, str, bool], ...] = (
    (LOSS, "loss", False),
    (REWARD_ACCURACY, "reward accuracy", True),
    (ABSOLUTE_ACCURACY, r"absolute preference accuracy, $\delta_\theta > 0$", True),
    (FRAC_IN_U, r"fraction in U = $\{\delta_{ref} < \delta_\theta < 0\}$", False),
    (REWARDS_CHOSEN, "chosen reward", False),
    (REWARDS_REJECTED, "rejected reward", False),
)
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    (LOSS, "loss"),
    (REWARD_ACCURACY, "reward acc"),
    (ABSOLUTE_ACCURACY, "abs acc"),
    (FRAC_IN_U, "frac_in_U"),
)
FIGSIZE = (16.0, 9.0)
DPI = 110
_MAX_NAME_CHARS = 32


@dataclass
class Run:
    """What the report needs from one run directory."""

    path: Path
    label: str
    rows: list[dict[str, Any]]
    alarms: list[dict[str, Any]] = field(default_factory=list)


def fetch_run(uri: str, local: Path, s3: S3Config | None = None) -> Path:
    """A run directory kept in storage (a URI), copied to ``local``: the files a report reads."""
    from rayalign.storage import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, location, read_bytes

    stored = location(uri, s3)
    local.mkdir(parents=True, exist_ok=True)
    for name in (METRICS_FILE, SUMMARY_FILE, CONFIG_FILE):
        data = read_bytes(stored / name)
        if data is not None:
            write_local(local / name, data)
    if not (local / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no metrics file: {uri}/{METRICS_FILE}")
    return local


def load_run(run_dir: Path) -> Run:
    """Reads metrics.jsonl (required), config.yaml and summary.json (both optional)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"no metrics file: {metrics}")
    try:
        rows = read_jsonl(metrics)
    except json.JSONDecodeError as exc:
        # A run killed mid-write leaves a truncated last line.
        raise ValueError(f"{metrics} is not valid JSONL: {exc}") from exc
    if not rows:
        raise ValueError(f"metrics file is empty: {metrics}")
    return Run(run_dir, _run_label(run_dir), rows, _read_alarms(run_dir / "summary.json"))


def _run_label(run_dir: Path) -> str:
    """'<output.name> (<loss.type>)' from config.yaml, else the directory name."""
    fallback = run_dir.resolve().name
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        name = cfg.get("output", {}).get("name") or fallback
        loss_type = cfg.get("loss", {}).get("type")
    except (OSError, yaml.YAMLError, AttributeError):
        # The label is cosmetic: a missing or odd config must not stop the report.
        return fallback
    return f"{name} ({loss_type})" if loss_type else str(name)


def _read_alarms(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    alarms = summary.get("alarms") if isinstance(summary, dict) else None
    return [a for a in alarms or [] if isinstance(a, dict) and isinstance(a.get(STEP), (int, float))]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of the rows that carry ``key`` (eval/ keys appear only on some rows)."""
    points = [(r[STEP], r[key]) for r in rows if r.get(key) is not None and STEP in r]
    return [s for s, _ in points], [v for _, v in points]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[:_MAX_NAME_CHARS] or "run"


def default_out_path(run_dirs: list[Path]) -> Path:
    """``<run>/report.png`` for one run; ``<parent of first>/compare-a-vs-b.png`` for several."""
    first = Path(run_dirs[0]).resolve()
    if len(run_dirs) == 1:
        return first / RUN_PLOT
    names = [_safe_name(Path(d).resolve().name) for d in run_dirs]
    # Beyond three runs the file name would stop being readable; count the rest instead.
    stem = "-vs-".join(names) if len(names) <= 3 else "-vs-".join(names[:2]) + f"-and-{len(names) - 2}-more"
    return first.parent / f"compare-{stem}.png"


def _draw_panel(ax: Axes, runs: list[Run], colors: list[str], key: str, title: str, chance: bool) -> None:
    for run, color in zip(runs, colors):
        ax.plot(*_series(run.rows, key), color=color, linewidth=1.6)
        eval_steps, eval_values = _series(run.rows, eval_key(key))
        if eval_steps:
            ax.plot(eval_steps, eval_values, color=color, linestyle="--", marker="o", markersize=4)
        for alarm in run.alarms:
            ax.axvline(alarm[STEP], color="red", linewidth=1.0, alpha=0.7)
            # A tick in the run's colour says whose alarm it is when several runs share a panel.
            ax.plot(
                alarm[STEP],
                1.0,
                marker="v",
                color=color,
                markeredgecolor="red",
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        for row in run.rows:
            if ACTION in row:  # what the run did about an alarm (monitor.on_alarm): switch or stop
                ax.axvline(row[STEP], color="purple", linestyle="--", linewidth=1.2, alpha=0.8)
    if chance:
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1.2)
    ax.set_title(title, fontsize=11, pad=9)  # room for the alarm ticks above the axes
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(key, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.25)


def _legend_handles(runs: list[Run], colors: list[str]) -> list[Line2D]:
    handles = [Line2D([], [], color=c, linewidth=2, label=r.label) for r, c in zip(runs, colors)]
    if any(is_eval(k) for r in runs for row in r.rows for k in row):
        handles.append(Line2D([], [], color="gray", linestyle="--", marker="o", markersize=4, label="held-out (eval/)"))
    handles.append(Line2D([], [], color="gray", linestyle=":", label="0.5 (chance)"))
    if any(r.alarms for r in runs):
        handles.append(Line2D([], [], color="red", linewidth=1.0, label="alarm (summary.json)"))
    actions = sorted({row[ACTION].split(" (")[0] for r in runs for row in r.rows if ACTION in row})
    if actions:
        handles.append(Line2D([], [], color="purple", linestyle="--", label=f"action: {', '.join(actions)}"))
    return handles


def plot_runs(run_dirs: list[Path], out_path: Path | None = None) -> Path:
    """Writes one 2x3 PNG of the training curves of ``run_dirs`` and returns its path."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    out = Path(out_path) if out_path is not None else default_out_path([Path(d) for d in run_dirs])
    colors = [f"C{i % 10}" for i in range(len(runs))]

    # A bare Figure on an Agg canvas: no pyplot, so no display and no global backend switch.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, (key, title, chance) in zip(axes.flat, PANELS):
        _draw_panel(ax, runs, colors, key, title, chance)
    title = " vs ".join(r.label for r in runs)
    fig.suptitle(title if len(title) <= 100 else f"{len(runs)} runs", fontsize=13)
    handles = _legend_handles(runs, colors)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=10, frameon=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(out, "wb") as f:
        fig.savefig(f, dpi=DPI, format="png")
    return out


def _first_last(rows: list[dict[str, Any]], key: str) -> str:
    _, values = _series(rows, key)
    return f"{values[0]:.3f} → {values[-1]:.3f}" if values else "-"


def format_runs_table(run_dirs: list[Path]) -> str:
    """A plain-text table: per run, first → last value of loss and the preference metrics."""
    runs = [load_run(Path(d)) for d in run_dirs]
    header = ["run", *(title for _, title in TABLE_COLUMNS), "steps"]
    body = [
        [r.label, *(_first_last(r.rows, key) for key, _ in TABLE_COLUMNS), str(r.rows[-1].get(STEP, "-"))] for r in runs
    ]
    return format_table(header, body)


def format_table(header: list[str], body: list[list[str]]) -> str:
    """Left-aligned plain-text columns with a rule under the header."""
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SWEEP_MARKERS = {"completed": "o", "stopped_early": "x", "error": "s", "unfinished": "s"}


def plot_sweep(trials: list[dict[str, Any]], x_key: str, objective: str, out: Path) -> Path:
    """Two panels: each trial's final ``objective`` against ``x_key`` (e.g. γ), and the
    objective over training steps per trial (ASHA's early stops show as short curves).

    ``trials`` are rows of ``rayalign.tune.sweep`` (params, status, objective, objective_history)."""
    fig = Figure(figsize=(13.0, 5.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    final_ax, curve_ax = fig.subplots(1, 2)
    for status, marker in SWEEP_MARKERS.items():
        points = [
            (t["params"][x_key], t["objective"]) for t in trials if t["status"] == status and t["objective"] is not None
        ]
        if points:
            final_ax.scatter(
                [x for x, _ in points], [y for _, y in points], marker=marker, s=60, label=status.replace("_", " ")
            )
    final_ax.set_xlabel(x_key)
    final_ax.set_ylabel(f"{objective} (last measured)")
    final_ax.set_title(f"{objective} vs {x_key}")
    final_ax.legend(fontsize=9)
    for i, trial in enumerate(trials):
        steps = [step for step, _ in trial["objective_history"]]
        values = [value for _, value in trial["objective_history"]]
        if steps:
            curve_ax.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                color=f"C{i % 10}",
                label=f"{x_key.split('.')[-1]}={_format_param(trial['params'][x_key])}",
            )
    curve_ax.set_xlabel("step")
    curve_ax.set_ylabel(objective)
    curve_ax.set_title("held-out objective during training")
    curve_ax.legend(fontsize=8, ncols=2)
    for ax in (final_ax, curve_ax):
        if "accurac" in objective:
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1.2)
        ax.grid(True, alpha=0.25)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(out, "wb") as f:
        fig.savefig(f, dpi=DPI, format="png")
    return out


def _format_param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
