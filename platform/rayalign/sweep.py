"""Sweep stage: Ray Tune searches the constraint strength; every trial is a full training run.

    data stage ─▶ reference, once, into the reference cache ─▶ Ray Tune ─▶ trial: Ray Train + DeepSpeed
                                                                          on the cached scores

The reference log-probs depend on the model and the data, not on γ, α, τ, β or the learning
rate, so the sweep scores them once (``rayalign.refcache``), keeps the scored set in the
object store, and hands that dataset to every trial: no trial starts a reference engine. Trials
report each held-out evaluation to Tune (Ray Train's ``TuneReportCallback``); ASHA compares them
on the held-out objective and stops the weak ones.

Sweep directory (``<output.root>/<output.name>/``, kept in ``<output.storage>/<output.name>/``)::

    config.yaml             the sweep's config (a resumed sweep must match it)
    quarantine.jsonl        records the data stage rejected
    tune/                   Ray Tune's experiment state, written to the storage path directly:
                            what resuming reads (not the head node's local disk)
    trials/<trial_id>/      one run directory per trial (config.yaml, metrics.jsonl, summary.json, model/)
    sweep_results.csv       one row per trial: status, parameters, final metrics
    best_config.yaml        the best completed trial's config, as `rayalign train --config` takes it
    objective_vs_<key>.png  the objective against γ (or the first searched key)
    sweep_summary.json      all of the above in one file
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import ray.tune
from ray import tune
from ray.data import Dataset
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from rayalign.config import OBJECTIVE_MODES, ConfigError, RunConfig, SearchDimension, SweepConfig, with_values
from rayalign.data import split_heldout
from rayalign.pipeline import ReferenceSource, prepare_data, prepare_run_dir, split_scored, train_stage
from rayalign.refcache import describe, scored_pairs_cached
from rayalign.report import format_table, plot_sweep
from rayalign.runtime import ResourceDemand
from rayalign.storage import open_uri, read_text, remove, upload
from rayalign.train import planned_steps

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# Columns of the results table besides the searched keys; the objective comes first.
FINAL_METRICS = tuple(OBJECTIVE_MODES)


class HeldoutReportCallback(TuneReportCallback):
    """Forwards to Tune only the reports that carry held-out metrics (every ``monitor.eval_every``
    steps and the last step): Tune requires the objective in every result it receives, and the
    per-step training metrics are in the trial's metrics.jsonl anyway."""

    def __init__(self, objective: str):
        super().__init__()
        self.objective = objective

    def after_report(self, run_context, metrics, checkpoint):
        if self.objective in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], objective: str, model_dir: str,
              scored: Dataset, num_scored: int, source: ReferenceSource, data_report: dict[str, Any]) -> None:
    """One Tune trial: train on the sweep's reference-scored pairs with the trial's settings."""
    started = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(base, {**params, "output.name": trial_id}, origin=f"sweep trial {trial_id}")
    run_dir = prepare_run_dir(cfg)
    train_stage(cfg, run_dir, Path(model_dir), split_scored(cfg, scored, source, num_scored), data_report, started,
                # The trial's run directory is its own: a fixed Ray Train run name lets a trial that
                # Tune restores (resumed sweep, errored trial) continue from its last checkpoint.
                callbacks=[HeldoutReportCallback(objective)], resume_name="train")


def trial_dirname(trial) -> str:
    """Tune's folder for a trial is named by its id, like the trial's run directory."""
    return trial.trial_id


def _tune_domain(dim: SearchDimension, search: str):
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    return tune.grid_search(dim.values) if search == "grid" else tune.choice(dim.values)


def _searcher(sweep: SweepConfig):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)  # metric, mode and concurrency come from TuneConfig
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)


def _scheduler(sweep: SweepConfig, steps: int):
    if sweep.early_stopping == "none":
        return None
    if sweep.asha.grace_period >= steps:
        raise ConfigError(
            f"sweep.asha.grace_period ({sweep.asha.grace_period}) must be below the {steps} steps each trial plans"
        )
    # Rungs end before the last step, so a trial that survives them finishes and exports its
    # model instead of being stopped at its final report.
    return ASHAScheduler(
        time_attr="step",
        max_t=steps - 1,
        grace_period=sweep.asha.grace_period,
        reduction_factor=sweep.asha.reduction_factor,
        stop_last_trials=False,
    )


def _absolute_paths(cfg: RunConfig, trials_root: Path) -> dict[str, Any]:
    """The trials' base config: Tune runs each trial in its own working directory."""
    tree = cfg.model_dump(mode="json", exclude={"sweep"})
    if cfg.model.path and not cfg.model.path.startswith("package:"):
        tree["model"]["path"] = str(Path(cfg.model.path).expanduser().resolve())
    tree["data"]["paths"] = [str(Path(p).expanduser().resolve()) for p in cfg.data.paths]
    tree["reference"]["cache_root"] = str(Path(cfg.reference.cache_root).expanduser().resolve())
    tree["output"]["root"] = str(trials_root)
    if cfg.output.storage is not None:
        tree["output"]["storage"] = f"{cfg.output.run_storage}/{TRIALS_DIR}"
    return tree


def _check_resumable(cfg: RunConfig) -> None:
    saved = f"{cfg.output.run_storage}/config.yaml"
    text = read_text(saved)
    if text is not None and text != cfg.to_yaml():
        raise ConfigError(
            f"{cfg.output.run_storage} holds an unfinished sweep with a different config ({saved}); "
            "rerun with --fresh to discard it, or set another output.name"
        )


def run_sweep(cfg: RunConfig, fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep in ``cfg.sweep``; writes the sweep directory, returns its summary."""
    if cfg.sweep is None:
        raise ConfigError("this config has no `sweep` section (see jobs/configs/sweep-gamma.yaml)")
    sweep = cfg.sweep
    started = time.perf_counter()
    sweep_dir = cfg.output.run_dir
    tune_dir = f"{cfg.output.run_storage}/{TUNE_DIR}"
    if fresh:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        for stale in (TUNE_DIR, TRIALS_DIR):
            remove(f"{cfg.output.run_storage}/{stale}")
    resuming = tune.Tuner.can_restore(tune_dir)
    if resuming:
        _check_resumable(cfg)
        print(f"[rayalign] resuming the sweep in {tune_dir} (finished trials are kept)", flush=True)
    else:
        shutil.rmtree(sweep_dir / TRIALS_DIR, ignore_errors=True)
        prepare_run_dir(cfg)
        upload(sweep_dir / "config.yaml", f"{cfg.output.run_storage}/config.yaml")  # what a resume checks

    # Whatever reference.cache says, a sweep scores once into the cache and shares the result.
    scoring_cfg = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"cache": True})})
    data = prepare_data(cfg, sweep_dir, ResourceDemand.of_run(scoring_cfg, per_trial_cpus=sweep.trial_cpus))
    scored, cache = scored_pairs_cached(data.pairs, scoring_cfg, data.model_dir, data.paths)
    print(f"[rayalign] reference scored once for all trials: cache {'hit' if cache.hit else 'miss'}, "
          f"{cache.path}", flush=True)
    # In the object store once for all trials (a Parquet read in each trial would also want a
    # whole CPU for its file listing, which trials on a small machine do not leave free).
    scored = scored.materialize()
    num_train = split_heldout(scored, cfg)[0].count()  # the trials' split; counted, not materialized
    source = ReferenceSource(cfg.reference.backend, describe(cache), scored_by_sweep_driver=True)
    steps = planned_steps(cfg.train, cfg.scaling.num_workers, num_train)

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=_absolute_paths(cfg, sweep_dir / TRIALS_DIR),
            objective=sweep.objective,
            model_dir=str(data.model_dir),
            scored=scored,
            num_scored=data.report.ok,
            source=source,
            data_report=data.report.as_dict(),
        ),
        {"cpu": sweep.trial_cpus},
    )
    if resuming:
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: _tune_domain(dim, sweep.search) for key, dim in sweep.space.items()},
            tune_config=tune.TuneConfig(
                metric=sweep.objective,
                mode=sweep.objective_mode,
                search_alg=_searcher(sweep),
                scheduler=_scheduler(sweep, steps),
                num_samples=sweep.num_samples,
                # Searchers (optuna) take the limit from here; the variant generator has its own.
                max_concurrent_trials=sweep.max_concurrent_trials if sweep.search == "optuna" else None,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=cfg.output.run_storage),
        )
    results = tuner.fit()

    # Trial states as saved for resuming: an interrupted sweep leaves trials RUNNING or PENDING.
    tune_fs, tune_path = open_uri(tune_dir)
    saved_status = {t.trial_id: t.status
                    for t in tune.ExperimentAnalysis(tune_path, storage_filesystem=tune_fs).trials}
    trials_storage = f"{cfg.output.run_storage}/{TRIALS_DIR}"
    trials = [_trial_row(result, saved_status, sweep, steps, trials_storage) for result in results]
    trials.sort(key=lambda t: _sort_key(t, sweep))
    unfinished = sum(t["status"] == "unfinished" for t in trials)
    results_files = _write_results(cfg, sweep_dir, trials)
    summary = {
        "sweep": cfg.output.name,
        "objective": sweep.objective,
        "mode": sweep.objective_mode,
        "search": sweep.search,
        "early_stopping": sweep.early_stopping,
        "planned_steps": steps,
        "interrupted": unfinished > 0,
        "counts": {status: sum(t["status"] == status for t in trials)
                   for status in ("completed", "stopped_early", "error", "unfinished")},
        "searched": list(sweep.space),
        "reference": {**source.as_dict(), "scored_now": not cache.hit},
        "data": data.report.as_dict(),
        "trials": trials,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "files": {**results_files, "tune": tune_dir},  # Tune writes its state to storage itself
    }
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2))
    outputs = [sweep_dir / "sweep_summary.json", sweep_dir / "config.yaml"]
    outputs += [Path(path) for path in results_files.values() if path]
    for path in outputs:
        upload(path, f"{cfg.output.run_storage}/{path.name}")
    return summary


def _trial_row(result, saved_status: dict[str, str], sweep: SweepConfig, planned: int, trials_storage: str
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
    elif rows and int(rows[-1]["step"]) >= planned:  # the last step is always evaluated and reported
        status = "completed"
    else:  # terminated by the scheduler before its last step
        status = "stopped_early"
    measured = {
        key: [(int(r["step"]), r[key]) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        for key in FINAL_METRICS
    }
    final = {key: points[-1][1] if points else None for key, points in measured.items()}
    return {
        "trial_id": trial_id,
        "status": status,
        "params": {key: result.config.get(key) for key in sweep.space},
        "steps": int(rows[-1]["step"]) if rows else 0,
        "objective": final[sweep.objective],
        "objective_history": measured[sweep.objective],
        "metrics": final,
        "train_absolute_accuracy": rows[-1].get("pref/absolute_accuracy") if rows else None,
        # Wall-clock span (Unix seconds) from the trial's start to its last report.
        "started": rows[0]["timestamp"] - rows[0]["time_total_s"] if rows else None,
        "ended": rows[-1]["timestamp"] if rows else None,
        "run_dir": f"{trials_storage}/{trial_id}",  # where the trial's outputs are kept
        "error": str(result.error).splitlines()[0] if result.error is not None else None,
    }


def _sort_key(trial: dict[str, Any], sweep: SweepConfig) -> tuple:
    """Completed trials first, best objective first; stopped and failed ones after."""
    rank = {"completed": 0, "stopped_early": 1, "unfinished": 2, "error": 3}[trial["status"]]
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
        [t["trial_id"], t["status"], *(t["params"][k] for k in keys), t["steps"],
         *(t["metrics"][m] for m in FINAL_METRICS), t["train_absolute_accuracy"]]
        for t in trials
    ]
    return header, rows


def format_sweep_table(summary: dict[str, Any]) -> str:
    """The terminal table: one line per trial, best completed trial first."""
    header, rows = _results_table(summary["trials"], summary["searched"])
    return format_table([_short(h) for h in header], [[_cell(v) for v in row] for row in rows])


def _write_results(cfg: RunConfig, sweep_dir: Path, trials: list[dict[str, Any]]) -> dict[str, str | None]:
    sweep = cfg.sweep
    keys = list(sweep.space)
    csv_path = sweep_dir / "sweep_results.csv"
    header, rows = _results_table(trials, keys)
    with csv_path.open("w", newline="") as f:
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
        best_path.write_text(
            f"# Best trial {best['trial_id']} of sweep {cfg.output.name}: {sweep.objective} = "
            f"{best['objective']:.4f} ({point})\n#   rayalign train --config {best_path}\n" + best_cfg.to_yaml()
        )

    x_key = "loss.gamma" if "loss.gamma" in keys else keys[0]
    png = plot_sweep(trials, x_key, sweep.objective, sweep_dir / f"objective_vs_{x_key.split('.')[-1]}.png")
    return {
        "csv": str(csv_path),
        "best_config": str(best_path) if best_path else None,
        "plot": str(png),
    }


_ABBREVIATIONS = {"pref/absolute_accuracy": "abs_acc", "rewards/accuracies": "reward_acc",
                  "pref/frac_in_U": "frac_in_U"}


def _short(name: str) -> str:
    """``eval/pref/absolute_accuracy`` -> ``eval abs_acc`` (table headers)."""
    split, _, metric = name.partition("/")
    return f"{split} {_ABBREVIATIONS.get(metric, metric)}" if split in ("eval", "train") else name


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
