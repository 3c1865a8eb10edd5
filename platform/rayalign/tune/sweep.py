"""Sweep stage: Ray Tune searches the constraint strength; every trial is a full training run.

    data stage ─▶ reference, once, through the reference store ─▶ Ray Tune ─▶ trial: Ray Train + DeepSpeed
                                                                          on the cached scores

The reference log-probs depend on the model and the data, not on γ, α, τ, β or the learning
rate, so the sweep scores them once (``rayalign.reference.store``), keeps the scored set in the
object store, and hands that dataset to every trial: no trial starts a reference engine. Trials
report each held-out evaluation to Tune (Ray Train's ``TuneReportCallback``); ASHA compares them
on the held-out objective and stops the weak ones. A generation objective (``eval/gen/score``,
``eval/gen/win_rate``) is measured once, when a trial's training ends: the trial evaluates its policy by
generation (``rayalign.evaluation``) and reports that as its result.

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

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
from ray import tune
from ray.data import Dataset
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from rayalign.config import ConfigError, RunConfig, SearchDimension, SweepConfig, hub_repo_id, with_values
from rayalign.data.records import split_heldout
from rayalign.data.stage import PreparedData, prepare_data
from rayalign.evaluation.stage import check_scorer, evaluate_trained
from rayalign.metrics import GENERATION_PREFIX, STEP
from rayalign.models import ModelSource
from rayalign.reference.stage import (
    ReferenceSource,
    kept_heldout,
    score_into_cache,
    scored_heldout_only,
    split_scored,
)
from rayalign.run_dir import held_run_name
from rayalign.runtime import Workload
from rayalign.storage import (
    CONFIG_FILE,
    cache_location,
    prepare_run_dir,
    read_text,
    remove,
    run_location,
    upload,
    write_local,
)
from rayalign.tracking import (
    SweepMembership,
    default_mlflow_uri,
    finish_sweep_parent,
    open_sweep_parent,
    tensorboard_root,
    wandb_root,
)
from rayalign.train.stage import TrainingHooks, preflight, train_stage
from rayalign.train.steps import step_plan
from rayalign.train.trainer import TrainingInputs
from rayalign.tune.results import PLANNED_STEPS, collect_trials, format_sweep_table, write_results

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
SUMMARY_FILE = "sweep_summary.json"
__all__ = ["run_sweep", "format_sweep_table"]


class HeldoutReportCallback(TuneReportCallback):
    """Forwards to Tune only the reports that carry held-out metrics (every ``monitor.eval_every``
    steps and the last step): Tune requires the objective in every result it receives, and the
    per-step training metrics are in the trial's metrics.jsonl anyway. Each report also carries the
    trial's planned steps, which tell a finished trial from one the scheduler stopped."""

    def __init__(self, objective: str, planned_steps: int):
        super().__init__()
        self.objective = objective
        self.planned_steps = planned_steps

    def after_report(self, run_context, metrics, checkpoint):
        if self.objective in metrics[0]:
            metrics = [{**metrics[0], PLANNED_STEPS: self.planned_steps}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)


class TrialLines(tune.Callback):
    """One console line per finished trial: what it searched and the objective it reached."""

    def __init__(self, objective: str):
        self.objective = objective

    def on_trial_complete(self, iteration, trials, trial, **info):
        value = (trial.last_result or {}).get(self.objective)
        searched = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        log.info(
            "trial %s (%s): %s = %s",
            trial.trial_id,
            searched,
            self.objective,
            "n/a" if value is None else f"{value:.4f}",
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("trial %s failed; see its error in the log", trial.trial_id)


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    objective: str,
    model: ModelSource,
    scored: Dataset,
    scored_heldout: Dataset | None,
    num_scored: int,
    source: ReferenceSource,
    data_report: dict[str, Any],
    cost: dict[str, Any],
    sweep: SweepMembership,
) -> None:
    """One Tune trial: train on the sweep's reference-scored pairs with the trial's settings."""
    started = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(base, {**params, "output.name": trial_id}, origin=f"sweep trial {trial_id}")
    prepare_run_dir(cfg)
    # The trial's run directory is its own: a trial that Tune restores (resumed sweep, errored trial) finds its
    # Ray Train run there and continues from its last checkpoint.
    # A loss that needs no reference: the driver scored the held-out pairs alone (scored_heldout).
    split = split_scored(cfg, scored, source, num_scored, scored_heldout)
    inputs = TrainingInputs(model, split, data_report, cost, started)
    heldout = inputs.scored.heldout
    # The trial's own plan: a searched key (train.max_steps, train.epochs, batch sizes) may change it.
    planned_steps = step_plan(cfg.train, cfg.scaling.num_workers, inputs.scored.num_train).total
    summary = train_stage(
        cfg,
        inputs,
        TrainingHooks(
            callbacks=(HeldoutReportCallback(objective, planned_steps),),
            sweep=SweepMembership(sweep.sweep, dict(params), sweep.mlflow_parent),
            after_training=(lambda: evaluate_trained(cfg, model, heldout)) if cfg.evaluates_after_training else None,
        ),
    )
    if objective.startswith(GENERATION_PREFIX):
        # Measured once, now that training ended: the trial's one result (no prompt scored on both sides: NaN).
        value = summary["generation"].get(objective)
        heldout = summary["heldout"] or {}
        tune.report(
            {
                **heldout,
                objective: math.nan if value is None else value,
                STEP: summary["steps"],
                PLANNED_STEPS: planned_steps,
            }
        )


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
        time_attr=STEP,
        max_t=steps - 1,
        grace_period=sweep.asha.grace_period,
        reduction_factor=sweep.asha.reduction_factor,
        stop_last_trials=False,
    )


def _absolute_paths(cfg: RunConfig, trials_root: Path) -> dict[str, Any]:
    """The trials' base config: Tune runs each trial in its own working directory."""
    tree = cfg.model_dump(mode="json", exclude={"sweep"})
    if cfg.model.path and not cfg.model.path.startswith("package:") and cfg.model.hub_repo_id() is None:
        tree["model"]["path"] = str(Path(cfg.model.path).expanduser().resolve())
    tree["data"]["paths"] = [
        p if "://" in p or hub_repo_id(p) else str(Path(p).expanduser().resolve()) for p in cfg.data.paths
    ]
    tree["reference"]["cache_root"] = cache_location(cfg).uri
    tree["output"]["root"] = str(trials_root)
    # The trials' tracker runs go where the sweep's own run does, not under the trials' root.
    tracking = tree["output"]["tracking"]
    tracking["mlflow_tracking_uri"] = cfg.output.tracking.mlflow_tracking_uri or default_mlflow_uri(cfg)
    tracking["tensorboard_dir"] = str(tensorboard_root(cfg))
    tracking["wandb_dir"] = str(wandb_root(cfg))
    if cfg.output.storage is not None:
        tree["output"]["storage"] = f"{cfg.output.run_storage}/{TRIALS_DIR}"
    # A generation objective is measured by each trial's own evaluation once its training ends.
    tree["eval"]["generation"]["after_training"] = cfg.evaluates_after_training
    return tree


def _check_resumable(cfg: RunConfig) -> None:
    saved = run_location(cfg.output) / CONFIG_FILE
    text = read_text(saved)
    if text is not None and text != cfg.to_yaml():
        raise ConfigError(
            f"{cfg.output.run_storage} holds an unfinished sweep with a different config ({saved}); "
            "rerun with --fresh to discard it, or set another output.name"
        )


@dataclass(frozen=True)
class SharedScores:
    """The reference scores every trial trains on, scored once by the sweep's driver."""

    data: PreparedData
    cost: dict[str, Any]  # the pre-flight LayoutCost, the same for every trial unless the trials search it
    scored: Dataset  # every usable pair, in the object store: scored, unless the trials score none (below)
    num_train: int  # the trials' training split
    source: ReferenceSource
    scored_now: bool  # False: read from the reference cache
    # Trials whose loss needs no reference: their held-out pairs, scored (monitor.reference_for_heldout), else None.
    heldout: Dataset | None = None


def run_sweep(cfg: RunConfig, fresh: bool = False, on_claimed: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep in ``cfg.sweep``; writes the sweep directory, returns its summary.
    ``on_claimed``: called once the sweep holds its name and its directory passed the checks (the console's log
    moves in then)."""
    if cfg.sweep is None:
        raise ConfigError("this config has no `sweep` section (see jobs/configs/sweep-gamma.yaml)")
    check_scorer(cfg)
    with held_run_name(cfg.output):
        started = time.perf_counter()
        resuming = _open_sweep_dir(cfg, fresh)
        if on_claimed is not None:
            on_claimed()
        shared = _score_once(cfg)
        steps = step_plan(cfg.train, cfg.scaling.num_workers, shared.num_train).total
        membership = SweepMembership(cfg.output.name, mlflow_parent=open_sweep_parent(cfg))
        tuner = _tuner(cfg, shared, steps, resuming, membership)
        log.info(
            "%d trial(s) of %d steps each (with the base config; a searched key may change it); one line per "
            "finished trial",
            _num_trials(cfg.sweep),
            steps,
        )
        trials = collect_trials(
            tuner.fit(), run_location(cfg.output) / TUNE_DIR, cfg.sweep, steps, f"{cfg.output.run_storage}/{TRIALS_DIR}"
        )
        summary = _write_summary(cfg, shared, trials, steps, time.perf_counter() - started)
        files = [Path(path) for key, path in summary["files"].items() if key != "tune" and path]
        finish_sweep_parent(cfg, membership.mlflow_parent, summary, files)
        return summary


def _num_trials(sweep: SweepConfig) -> int:
    """Trials the sweep plans: every grid point once per sample."""
    grid = 1
    if sweep.search == "grid":
        for dim in sweep.space.values():
            grid *= len(dim.values) if dim.values is not None else 1
    return grid * sweep.num_samples


def _open_sweep_dir(cfg: RunConfig, fresh: bool) -> bool:
    """Prepare the sweep directory; True when an unfinished sweep with the same config is resumed."""
    sweep_dir, stored = cfg.output.run_dir, run_location(cfg.output)
    if fresh:
        _check_is_a_sweep_dir(sweep_dir)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        for stale in (TUNE_DIR, TRIALS_DIR):
            remove(stored / stale)
    tune_dir = stored / TUNE_DIR
    if tune.Tuner.can_restore(tune_dir.path, storage_filesystem=tune_dir.fs):
        _check_resumable(cfg)
        log.info("resuming the sweep in %s (finished trials are kept)", tune_dir)
        return True
    shutil.rmtree(sweep_dir / TRIALS_DIR, ignore_errors=True)
    prepare_run_dir(cfg)
    upload(sweep_dir / CONFIG_FILE, stored / CONFIG_FILE)  # what a resume checks
    return False


def _check_is_a_sweep_dir(path: Path) -> None:
    """--fresh deletes ``path``: only when it is empty or holds what a sweep writes, never another run's files."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    marks = [name for name in (TUNE_DIR, TRIALS_DIR, SUMMARY_FILE) if (path / name).exists()]
    if not marks:
        raise ConfigError(
            f"--fresh would delete {path}, which is not a sweep directory (no {TUNE_DIR}/, "
            f"{TRIALS_DIR}/ or {SUMMARY_FILE} in it): set another output.name, or remove it yourself"
        )


def _score_once(cfg: RunConfig) -> SharedScores:
    """Whatever reference.cache says, a sweep scores once into the cache and shares the result; with
    ``reference.in_worker`` the trials' workers score it, and the shared pairs are the tokenized ones."""
    workload = Workload(per_trial_cpus=cfg.sweep.trial_cpus, reference_first=not cfg.reference.in_worker)
    data = prepare_data(cfg, cfg.output.run_dir, workload)
    cost = preflight(cfg, data).as_dict()
    if cfg.reference.in_worker or not _trials_need_reference(cfg):
        pairs = data.pairs.materialize()
        train, heldout = split_heldout(pairs, cfg)
        if cfg.reference.in_worker or cfg.reference_scope == "none":
            source = ReferenceSource(cfg.reference.backend, scope="all" if cfg.reference.in_worker else "none")
            return SharedScores(data, cost, pairs, train.count(), source, scored_now=False)
        # A loss that needs no reference: the held-out pairs alone are scored, once for all trials.
        heldout = scored_heldout_only(cfg, kept_heldout(heldout, cfg, data.report.ok), data.model)
        log.info("reference: loss.type %s needs none; only the held-out pairs were scored", cfg.loss.type)
        source = ReferenceSource(cfg.reference.backend, scope="heldout", scored_by_sweep_driver=True)
        return SharedScores(data, cost, pairs, train.count(), source, scored_now=True, heldout=heldout)
    scored, cache = score_into_cache(cfg, data)
    log.info("reference scored once for all trials (%d pairs scored now)", cache.scored)
    # In the object store once for all trials (a Parquet read in each trial would also want a
    # whole CPU for its file listing, which trials on a small machine do not leave free).
    scored = scored.materialize()
    num_train = split_heldout(scored, cfg)[0].count()  # the trials' split; counted, not materialized
    source = ReferenceSource(cfg.reference.backend, cache.as_dict(), scored_by_sweep_driver=True)
    return SharedScores(data, cost, scored, num_train, source, scored_now=not cache.hit)


def _trials_need_reference(cfg: RunConfig) -> bool:
    """Whether the trials train on reference log-probs: their loss needs them, or the search could change the loss
    or the held-out split (which the driver would otherwise have scored for the base config alone)."""
    searched = cfg.sweep.space
    return cfg.reference_scope == "all" or "loss.type" in searched or any(k.startswith("data.") for k in searched)


def _tuner(cfg: RunConfig, shared: SharedScores, steps: int, resuming: bool, membership: SweepMembership) -> tune.Tuner:
    """Tune's tuner over ``run_trial``, each trial with the shared scores; restored when resuming."""
    sweep, sweep_dir = cfg.sweep, cfg.output.run_dir
    stored = run_location(cfg.output)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=_absolute_paths(cfg, sweep_dir / TRIALS_DIR),
            objective=sweep.objective,
            model=shared.data.model,
            scored=shared.scored,
            scored_heldout=shared.heldout,
            num_scored=shared.data.report.ok,
            source=shared.source,
            data_report=shared.data.report.as_dict(),
            cost=shared.cost,
            sweep=membership,
        ),
        {"cpu": sweep.trial_cpus},
    )
    if resuming:
        return tune.Tuner.restore(
            (stored / TUNE_DIR).path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=stored.fs,
        )
    return tune.Tuner(
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
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=stored.path,
            storage_filesystem=stored.fs,
            callbacks=[TrialLines(sweep.objective)],
        ),
    )


def _write_summary(
    cfg: RunConfig, shared: SharedScores, trials: list[dict[str, Any]], steps: int, wall_s: float
) -> dict[str, Any]:
    """Results table, best config, plot and ``sweep_summary.json``, locally and in storage."""
    sweep, sweep_dir = cfg.sweep, cfg.output.run_dir
    unfinished = sum(t["status"] == "unfinished" for t in trials)
    results_files = write_results(cfg, sweep_dir, trials)
    summary = {
        "sweep": cfg.output.name,
        "objective": sweep.objective,
        "mode": sweep.objective_mode,
        "search": sweep.search,
        "early_stopping": sweep.early_stopping,
        "planned_steps": steps,
        "interrupted": unfinished > 0,
        "counts": {
            status: sum(t["status"] == status for t in trials)
            for status in ("completed", "stopped_early", "error", "unfinished")
        },
        "searched": list(sweep.space),
        "reference": {**shared.source.as_dict(), "scored_now": shared.scored_now},
        "data": shared.data.report.as_dict(),
        "trials": trials,
        "wall_seconds": round(wall_s, 1),
        # Tune writes its state to storage itself.
        "files": {**results_files, "tune": f"{cfg.output.run_storage}/{TUNE_DIR}"},
    }
    write_local(sweep_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    outputs = [sweep_dir / SUMMARY_FILE, sweep_dir / CONFIG_FILE]
    outputs += [Path(path) for path in results_files.values() if path]
    for path in outputs:
        upload(path, run_location(cfg.output) / path.name)
    return summary
