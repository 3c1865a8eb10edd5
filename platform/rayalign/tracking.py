"""Experiment trackers: MLflow, TensorBoard and Weights & Biases, each through its own client library.

A run's tracker runs live in the process that started training (the CLI's driver, or a sweep's
trial): it logs the resolved config as parameters, receives rank 0's rows as they are logged (see
:mod:`rayalign.train.progress`: one process logs, however many workers train), and at the end the
summary and the plots. A sweep's trials are runs of their own, grouped under the sweep: an MLflow
parent run, a W&B group, a TensorBoard folder with the searched values as hyperparameters.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayalign.config import RunConfig
from rayalign.metrics import ACTION, STEP, FirstAlarm

log = logging.getLogger(__name__)

Row = dict[str, Any]


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"beta": 0.1}}`` → ``{"loss.beta": 0.1}``; lists as their JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def step_metrics(row: Row) -> dict[str, float]:
    """The numbers of a logged row (``step`` is the x axis; the alarm's text is not a number)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != STEP and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def default_mlflow_uri(cfg: RunConfig) -> str:
    """The embedded store: an SQLite file under ``output.root``, no server."""
    return f"sqlite:///{Path(cfg.output.root).expanduser().resolve() / 'mlflow.db'}"


def tensorboard_root(cfg: RunConfig) -> Path:
    """Where TensorBoard runs go: ``output.tracking.tensorboard_dir``, or ``<output.root>/tensorboard``."""
    return Path(cfg.output.tracking.tensorboard_dir or Path(cfg.output.root) / "tensorboard").expanduser().resolve()


def wandb_root(cfg: RunConfig) -> Path:
    """Where W&B keeps its files: ``output.tracking.wandb_dir``, or ``output.root``."""
    return Path(cfg.output.tracking.wandb_dir or cfg.output.root).expanduser().resolve()


class MlflowRun:
    """One MLflow run, through ``MlflowClient`` (no global active run: trials may share a process)."""

    def __init__(self, cfg: RunConfig, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(
            tracking_uri=cfg.output.tracking.mlflow_tracking_uri or default_mlflow_uri(cfg)
        )
        self.run_id = run_id
        self.first_alarm = FirstAlarm()

    @classmethod
    def start(cls, cfg: RunConfig, name: str, params: dict[str, Any], tags: dict[str, str]) -> MlflowRun:
        from mlflow.entities import Param

        run = cls(cfg, run_id="")
        tracking = cfg.output.tracking
        experiment = run._experiment(tracking.experiment, None if tracking.mlflow_tracking_uri else cfg)
        run.run_id = run.client.create_run(experiment, run_name=name, tags=tags).info.run_id
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            run.client.log_batch(run.run_id, params=items[start : start + 100])
        log.info("MLflow run %s in %s", run.run_id, run.client.tracking_uri)
        return run

    def _experiment(self, name: str, embedded: RunConfig | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if embedded is not None:  # beside the embedded store, not in the current directory
            artifacts = (Path(embedded.output.root).expanduser().resolve() / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # created meanwhile by a concurrent trial
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_step(self, row: Row) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, row[STEP]) for key, value in step_metrics(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        alarm = self.first_alarm.of(row)
        if alarm:
            self.client.set_tag(self.run_id, "pathology_alarm", f"step {row[STEP]}: {alarm}")
        if ACTION in row:
            self.client.set_tag(self.run_id, "alarm_action", f"step {row[STEP]}: {row[ACTION]}")

    def finish(self, summary: dict[str, Any] | None, files: list[Path], failed: bool) -> None:
        if summary is not None:
            self.client.log_dict(self.run_id, summary, "summary.json")
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class TensorBoardRun:
    """One TensorBoard run directory, written with torch's ``SummaryWriter``."""

    def __init__(self, cfg: RunConfig, name: str, group: str | None, hparams: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        root = tensorboard_root(cfg)
        self.logdir = root / group / name if group else root / name
        self.writer = SummaryWriter(str(self.logdir))
        self.writer.add_text("config", "```\n" + cfg.to_yaml() + "\n```")
        self.hparams = hparams
        self.last: Row = {}
        self.first_alarm = FirstAlarm()
        log.info("TensorBoard run in %s", self.logdir)

    def log_step(self, row: Row) -> None:
        for key, value in step_metrics(row).items():
            self.writer.add_scalar(key, value, row[STEP])
        alarm = self.first_alarm.of(row)
        if alarm:
            self.writer.add_text("pathology_alarm", alarm, row[STEP])
        if ACTION in row:
            self.writer.add_text("alarm_action", row[ACTION], row[STEP])
        self.last.update(step_metrics(row))
        self.writer.flush()

    def finish(self, summary: dict[str, Any] | None, files: list[Path], failed: bool) -> None:
        import matplotlib.image

        if summary is not None:
            self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```")
        for path in files:
            if path.suffix == ".png":
                self.writer.add_image(f"plots/{path.stem}", matplotlib.image.imread(path)[..., :3], dataformats="HWC")
        if self.hparams:  # the HParams dashboard: the searched values against the last metrics
            numbers = {k: v for k, v in self.hparams.items() if isinstance(v, (int, float, str, bool))}
            self.writer.add_hparams(numbers, {f"hparam/{k}": v for k, v in self.last.items()}, run_name=".")
        self.writer.close()


class WandbRun:
    """One Weights & Biases run (online, or offline files that ``wandb sync`` uploads later)."""

    def __init__(self, cfg: RunConfig, name: str, group: str | None, config: dict[str, Any]):
        import wandb

        tracking = cfg.output.tracking
        wandb_dir = wandb_root(cfg)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=tracking.experiment,
            entity=tracking.wandb_entity,
            name=name,
            group=group,
            job_type="trial" if group else "train",
            config=config,
            dir=str(wandb_dir),
            mode=tracking.wandb_mode,
            reinit="create_new",  # a Tune process may run several trials
            settings=wandb.Settings(console="off", silent=True),
        )
        self.first_alarm = FirstAlarm()
        log.info("W&B run %s (%s) in %s", self.run.id, self.run.settings.mode, wandb_dir)

    def log_step(self, row: Row) -> None:
        self.run.log(step_metrics(row), step=row[STEP])
        alarm = self.first_alarm.of(row)
        if alarm:
            self.run.summary["pathology_alarm"] = f"step {row[STEP]}: {alarm}"
            self.run.tags = (*self.run.tags, "pathology-alarm")
        if ACTION in row:
            self.run.summary["alarm_action"] = f"step {row[STEP]}: {row[ACTION]}"

    def finish(self, summary: dict[str, Any] | None, files: list[Path], failed: bool) -> None:
        import wandb

        if summary is not None:
            self.run.summary.update(
                {f"summary/{k}": v for k, v in flat_params(summary).items() if isinstance(v, (int, float, str, bool))}
            )
        images = {f"plots/{path.stem}": wandb.Image(str(path)) for path in files if path.suffix == ".png"}
        if images:
            self.run.log(images)
        self.run.finish(exit_code=1 if failed else 0)


@dataclass(frozen=True)
class SweepMembership:
    """What makes a sweep trial's tracker run one of its sweep's: the sweep's name (the group), the
    values the trial searched, and the sweep's own MLflow run (the parent)."""

    sweep: str
    searched: dict[str, Any] = field(default_factory=dict)
    mlflow_parent: str | None = None


class Trackers:
    """The trackers ``output.trackers`` names, for one run; a consumer of rank 0's rows."""

    def __init__(self, runs: list[Any]):
        self.runs = runs

    def log_step(self, row: Row) -> None:
        for run in self.runs:
            run.log_step(row)

    def finish(self, summary: dict[str, Any] | None = None, files: list[Path] = (), failed: bool = False) -> None:
        for run in self.runs:
            try:
                run.finish(summary, list(files), failed)
            except Exception:  # the run's own files are written; a tracker failing at the end is reported
                log.warning("%s could not finish", type(run).__name__, exc_info=True)


def open_trackers(cfg: RunConfig, sweep: SweepMembership | None = None) -> Trackers:
    """Start a tracker run per ``output.trackers`` for ``cfg.output.name``, with the resolved config
    as parameters; a sweep trial's run is grouped under its ``sweep``."""
    name, group = cfg.output.name, sweep.sweep if sweep else None
    searched = sweep.searched if sweep else {}
    config = cfg.model_dump(mode="json", exclude={"sweep"})
    tags = {"rayalign.loss": cfg.loss.type}
    if sweep:
        tags["rayalign.sweep"] = sweep.sweep
        if sweep.mlflow_parent:
            tags["mlflow.parentRunId"] = sweep.mlflow_parent
    runs: list[Any] = []
    for tracker in cfg.output.trackers:
        if tracker == "mlflow":
            runs.append(MlflowRun.start(cfg, name, {**flat_params(config), **searched}, tags))
        elif tracker == "tensorboard":
            runs.append(TensorBoardRun(cfg, name, group, searched))
        elif tracker == "wandb":
            runs.append(WandbRun(cfg, name, group, {**config, **searched}))
    return Trackers(runs)


def open_sweep_parent(cfg: RunConfig) -> str | None:
    """The sweep's own MLflow run, which its trials name as parent; None without MLflow."""
    if "mlflow" not in cfg.output.trackers:
        return None
    sweep = {
        "sweep.objective": cfg.sweep.objective,
        "sweep.mode": cfg.sweep.objective_mode,
        **{f"sweep.space.{k}": json.dumps(v.model_dump(mode="json")) for k, v in cfg.sweep.space.items()},
    }
    return MlflowRun.start(cfg, cfg.output.name, sweep, {"rayalign.sweep": cfg.output.name}).run_id


def finish_sweep_parent(cfg: RunConfig, run_id: str | None, summary: dict[str, Any], files: list[Path]) -> None:
    """The sweep's results (CSV, plot, summary) on its MLflow run; then the runs of trials that Tune ended
    mid-run get their status: an early stop (ASHA) is ``KILLED``, whether its process was killed before it
    could close its run or saw the stop as an error (``FAILED``); an errored trial left open is ``FAILED``."""
    if run_id is None:
        return
    parent = MlflowRun(cfg, run_id)
    ended_as = {"stopped_early": "KILLED", "error": "FAILED"}
    status_of = {trial["trial_id"]: trial["status"] for trial in summary.get("trials", [])}
    experiment = parent.client.get_run(run_id).info.experiment_id
    for child in parent.client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_id}'"):
        status = status_of.get(child.info.run_name)
        if status not in ended_as or child.info.status == ended_as[status]:
            continue
        if status == "stopped_early" or child.info.status == "RUNNING":
            parent.client.set_tag(child.info.run_id, "rayalign.trial_status", status)
            parent.client.set_terminated(child.info.run_id, ended_as[status])
    parent.finish(summary, files, failed=bool(summary.get("interrupted")))
