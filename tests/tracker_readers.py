"""Read tracker runs back through each library's own reader (tests only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def mlflow_runs(tracking_uri: str, experiment: str) -> list[Any]:
    """Every run of ``experiment``, through ``MlflowClient.search_runs``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {tracking_uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def mlflow_history(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` through TensorBoard's own ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_tags(logdir: Path) -> dict[str, list[str]]:
    """TensorBoard's tags by kind, plus ``hparams``: the HParams plugin's tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    try:
        hparams = list(events.PluginTagToContent("hparams"))
    except KeyError:  # no HParams summary in this run
        hparams = []
    return {**events.Tags(), "hparams": hparams}


def wandb_offline_runs(wandb_dir: Path, ended: bool = False, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The offline runs under ``wandb_dir/wandb``, read from their transaction logs with W&B's own
    ``DataStore`` (what ``wandb sync`` reads): run record, config, history and summary.

    ``ended``: the runs were finished in this process, so each log ends with an exit record; read again until
    it does (up to ``timeout_s``). W&B's service writes the log's last block when it closes the run's stream, which
    can come after ``run.finish()`` returns: a loaded clean clone once read the log before its exit record."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = _read_wandb_offline_runs(wandb_dir)
        if not ended or all(run["exit_code"] is not None for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _read_wandb_offline_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    runs = []
    for path in sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        # A process killed before W&B wrote its run record (a trial Tune stopped) leaves these defaults.
        run: dict[str, Any] = {
            "id": None,
            "name": None,
            "group": None,
            "job_type": None,
            "history": [],
            "summary": {},
            "config": {},
            "tags": [],
            "exit_code": None,
        }
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    id=record.run.run_id,
                    name=record.run.display_name,
                    group=record.run.run_group,
                    job_type=record.run.job_type,
                    tags=list(record.run.tags),
                )
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["history"].append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
            elif kind == "summary":
                run["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs
