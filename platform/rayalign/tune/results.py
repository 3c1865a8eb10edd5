"""A finished (or interrupted) sweep as files: the results table, the best config, the plot.

Everything here reads Tune's own record of the trials' reports, not the trials' run directories,
which are on whichever node each trial ran.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ray import tune

from rayalign.config import RunConfig, SweepConfig, with_values
from rayalign.diagnostics.report import format_table, plot_sweep
from rayalign.metrics import ABSOLUTE_ACCURACY, OBJECTIVE_MODES, SHORT_NAMES, STEP
from rayalign.storage import Location, replaced_whole, write_local

# Columns of the results table besides the searched keys; the objective comes first.
FINAL_METRICS = tuple(OBJECTIVE_MODES)
TRIAL_STATUSES = ("completed", "stopped_early", "unfinished", "error")  # the table's order
# A trial's own planned steps (a searched key may change them), in each of its Tune reports and in its row.
PLANNED_STEPS = "planned_steps"


def collect_trials(
    results, tune_dir: Location, sweep: SweepConfig, planned: int, trials_storage: str
) -> list[dict[str, Any]]:
    """One row per trial of Tune's ``results``, best completed trial first."""
    # Trial states as saved for resuming: an interrupted sweep leaves trials RUNNING or PENDING.
    saved_status = {
        t.trial_id: t.status for t in tune.ExperimentAnalysis(tune_dir.path, storage_filesystem=tune_dir.fs).trials
    }
    trials = [trial_row(result, saved_status, sweep, planned, trials_storage) for result in results]
    trials.sort(key=lambda t: sort_key(t, sweep))
    return trials


def trial_row(
    result, saved_status: dict[str, str], sweep: SweepConfig, planned: int, trials_storage: str
) -> dict[str, Any]:
    """Status, parameters and final metrics of one trial, from Tune's record of its reports (not
    from the trial's run directory, which is on whichever node the trial ran)."""
    history = result.metrics_dataframe
    rows = [] if history is None else history.to_dict("records")
    trial_id = Path(result.path).name
    tune_status = saved_status.get(trial_id)
    if tune_status == "ERROR" or result.error is not None:
        status = "error"
    elif tune_status != "TERMINATED":
        status = "unfinished"
    elif rows and int(rows[-1][STEP]) >= _planned_steps(rows[-1], planned):  # the last step is always reported
        status = "completed"
    else:  # terminated by the scheduler before its last step
        status = "stopped_early"
    measured = {
        key: [(int(r[STEP]), r[key]) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        for key in FINAL_METRICS
    }
    final = {key: points[-1][1] if points else None for key, points in measured.items()}
    return {
        "trial_id": trial_id,
        "status": status,
        "params": {key: result.config.get(key) for key in sweep.space},
        "steps": int(rows[-1][STEP]) if rows else 0,
        PLANNED_STEPS: _planned_steps(rows[-1], planned) if rows else planned,
        "objective": final[sweep.objective],
        "objective_history": measured[sweep.objective],
        "metrics": final,
        "train_absolute_accuracy": rows[-1].get(ABSOLUTE_ACCURACY) if rows else None,
        # Wall-clock span (Unix seconds) from the trial's start to its last report.
        "started": rows[0]["timestamp"] - rows[0]["time_total_s"] if rows else None,
        "ended": rows[-1]["timestamp"] if rows else None,
        "run_dir": f"{trials_storage}/{trial_id}",  # where the trial's outputs are kept
        "error": str(result.error).splitlines()[0] if result.error is not None else None,
    }


def _planned_steps(report: dict[str, Any], planned: int) -> int:
    """The trial's own planned steps, as its reports carry them (a sweep started before they did: the base's)."""
    value = report.get(PLANNED_STEPS)
    return planned if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def sort_key(trial: dict[str, Any], sweep: SweepConfig) -> tuple:
    """Completed trials first, best objective first; stopped and failed ones after."""
    rank = TRIAL_STATUSES.index(trial["status"])
    value = trial["objective"]
    if value is None:
        return rank, 1, 0.0
    return rank, 0, -value if sweep.objective_mode == "max" else value


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best trial that ran to the end (stopped trials were measured at fewer steps)."""
    completed = [t for t in trials if t["status"] == "completed" and t["objective"] is not None]
    return completed[0] if completed else None  # ``trials`` is sorted best first


def _results_table(trials: list[dict[str, Any]], keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    header = ["trial_id", "status", *keys, "steps", *FINAL_METRICS, "train/pref/absolute_accuracy"]
    rows = [
        [
            t["trial_id"],
            t["status"],
            *(t["params"][k] for k in keys),
            t["steps"],
            *(t["metrics"][m] for m in FINAL_METRICS),
            t["train_absolute_accuracy"],
        ]
        for t in trials
    ]
    return header, rows


def format_sweep_table(summary: dict[str, Any]) -> str:
    """The terminal table: one line per trial, best completed trial first."""
    header, rows = _results_table(summary["trials"], summary["searched"])
    return format_table([_short(h) for h in header], [[_cell(v) for v in row] for row in rows])


def write_results(cfg: RunConfig, sweep_dir: Path, trials: list[dict[str, Any]]) -> dict[str, str | None]:
    sweep = cfg.sweep
    keys = list(sweep.space)
    csv_path = sweep_dir / "sweep_results.csv"
    header, rows = _results_table(trials, keys)
    with replaced_whole(csv_path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    best = best_trial(trials)
    best_path = None
    if best is not None:
        best_cfg = with_values(
            cfg.model_dump(mode="json", exclude={"sweep"}),
            {**best["params"], "output.name": f"{cfg.output.name}-best"},
        )
        best_path = sweep_dir / "best_config.yaml"
        point = ", ".join(f"{k}={v}" for k, v in best["params"].items())
        write_local(
            best_path,
            f"# Best trial {best['trial_id']} of sweep {cfg.output.name}: {sweep.objective} = "
            f"{best['objective']:.4f} ({point})\n#   rayalign train --config {best_path}\n" + best_cfg.to_yaml(),
        )

    x_key = "loss.gamma" if "loss.gamma" in keys else keys[0]
    png = plot_sweep(trials, x_key, sweep.objective, sweep_dir / f"objective_vs_{x_key.split('.')[-1]}.png")
    return {
        "csv": str(csv_path),
        "best_config": str(best_path) if best_path else None,
        "plot": str(png),
    }


def _short(name: str) -> str:
    """``eval/pref/absolute_accuracy`` -> ``eval abs_acc`` (table headers)."""
    split, _, metric = name.partition("/")
    return f"{split} {SHORT_NAMES.get(metric, metric)}" if split in ("eval", "train") else name


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
