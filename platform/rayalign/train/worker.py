"""What each Ray Train worker runs: a DeepSpeed engine stepping through its shard of scored pairs.

Each worker reads its shard of the reference-scored stream (``ray.train.get_dataset_shard``) one
optimizer step's pairs at a time, splits them into micro-batches of a fixed size or a token budget
(:mod:`rayalign.train.batching`), computes policy log-probs of chosen and rejected in one forward pass
per micro-batch (laid out as ``train.packing``, :mod:`rayalign.packing`), applies the configured
objective (:func:`rayalign.losses.objective`), and steps a DeepSpeed engine (ZeRO 0-3). Rank 0 appends
one row per logging step to ``metrics.jsonl``; held-out evaluations and checkpoints are reported to
Ray Train. At the end the policy is saved in Hugging Face format.

The steps, by name: :meth:`TrainingWorker.setup` (engine, restore, shards),
:meth:`~TrainingWorker.train` (epochs of optimizer steps), :meth:`~TrainingWorker.log_step`
(metrics, held-out evaluation, alarm), :meth:`~TrainingWorker.save` (checkpoint, export).

Fault tolerance: when a worker or its node is lost, Ray Train restarts the worker group
(``train.max_failures``) from the last checkpoint: the engine, the step counter and the metrics
history come back from it, and each worker skips the steps of the current epoch it had already
trained, so the run ends at the planned step count with each step logged once.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.train
import torch

from rayalign.config import LoraConfig, LossConfig, MonitorConfig, TrainConfig
from rayalign.console import step_line
from rayalign.cpus import use_reserved_cpus
from rayalign.distributed import Collective
from rayalign.errors import TrainingDiverged
from rayalign.logprobs import PolicyLogps, ResponseHead
from rayalign.metrics import (
    ACTION,
    EPOCH,
    LOSS,
    LR,
    PEAK_MEMORY_GIB,
    PEAK_RSS_GIB,
    RESUMED_FROM_STEP,
    STEP,
    FirstAlarm,
)
from rayalign.models import ModelSource
from rayalign.storage import METRICS_FILE, MODEL_DIR, Location, append_jsonl
from rayalign.train import actions, checkpoint
from rayalign.train.batching import heldout_share
from rayalign.train.deepspeed_settings import deepspeed_config
from rayalign.train.export import ModelExport, export_hf_model
from rayalign.train.meter import IntervalMeter
from rayalign.train.step import PreferenceStep
from rayalign.train.steps import StepPlan, pairs_per_step

# Ray Train forwards worker logging to the driver; a plain print() would be shown twice.
logger = logging.getLogger(__name__)


def check_finite(row: dict[str, Any]) -> None:
    """Raise TrainingDiverged when a logged step's loss is nan or infinite (every rank sees the same, reduced)."""
    if not math.isfinite(row[LOSS]):
        raise TrainingDiverged(
            f"step {row[STEP]}: the loss is {row[LOSS]}; training diverged and was stopped, no model was "
            "saved (lower train.learning_rate or loss.beta, or raise train.warmup_steps)"
        )


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a training worker is given: its config sections and the run's fixed numbers."""

    model: ModelSource  # the starting weights; each worker loads its own node's copy
    dtype: str  # resolved model.dtype
    attn_implementation: str
    lora: LoraConfig | None  # None: full fine-tuning
    loss: LossConfig
    train: TrainConfig
    monitor: MonitorConfig
    run_dir: str  # local run directory (metrics.jsonl on rank 0's node)
    model_storage: Location  # where rank 0 keeps the exported model
    best_model: checkpoint.BestModel | None  # where the best held-out model is kept (monitor.best_key), if it is
    steps: StepPlan
    has_eval: bool
    reference_in_worker: bool = False  # reference.backend adapters_off: scored here, adapters disabled
    progress: Any = None  # a ProgressBoard's handle: rank 0 posts each logged row (train/progress.py)


def lr_schedule(train: TrainConfig, total_steps: int):
    """Multiplier on the base learning rate: linear warm-up, then constant/linear/cosine decay."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
        if train.scheduler == "linear":
            return 1.0 - progress
        if train.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _peak_memory(device: torch.device) -> dict[str, float]:
    """This worker's peak memory so far (GiB): its process's resident set in host RAM, and on a GPU the
    accelerator memory torch allocated."""
    peak = {PEAK_RSS_GIB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        peak[PEAK_MEMORY_GIB] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def adamw(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """The workers' optimizer: torch's AdamW with ``train``'s settings, fused (one kernel over all parameters, on CPU
    and CUDA alike): the per-parameter loop of the default took 0.4 of a 3.4 s step at the SmolLM2-135M shape on
    CPU, the fused one 0.15 (``bench/profile_step.py``)."""
    return torch.optim.AdamW(
        params, lr=train.learning_rate, betas=train.adam_betas, weight_decay=train.weight_decay, fused=True
    )


@contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, ``from_pretrained`` inside this builds the model with its parameters already partitioned
    across the workers (transformers' DeepSpeed integration constructs it under ``deepspeed.zero.Init`` while an
    ``HfDeepSpeedConfig`` is alive, and loads each weight into its partitions), so no worker holds the whole model
    in host RAM; at other stages, nothing changes."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later transformers calls (the export) see a plain model again
        del alive


@dataclass(frozen=True)
class Restored:
    """What a worker found in Ray Train's checkpoint: rank 0's logged rows up to it (the alarm's history), and
    the step it was taken at; ``from_step`` None for a fresh start."""

    history: list[dict[str, Any]]
    from_step: int | None


class TrainingWorker:
    """One rank's training: built by :meth:`setup`, then :meth:`train`, then :meth:`save`."""

    def __init__(self, plan: WorkerPlan, engine, step: PreferenceStep, restored: Restored):
        self.plan = plan
        self.engine = engine
        self.step = step
        self.rank = ray.train.get_context().get_world_rank()
        self.world_size = ray.train.get_context().get_world_size()
        self.device = step.device
        self.collective = Collective.of_worker_group(self.device)
        # Rank 0's file only. After a lost node, Ray Train may start another rank on the node where the failed
        # group's rank 0 wrote its rows: that rank's run directory holds a stale metrics.jsonl, which must never go
        # into a checkpoint (every rank uploads into one checkpoint folder, the last upload winning; seen on CI:
        # a run restored at step 6 and finished at step 12 read back rows 1-7 of the failed group).
        self.metrics_path: Path | None = Path(plan.run_dir) / METRICS_FILE if self.rank == 0 else None
        self.history = restored.history  # rank 0's logged rows, for the pathology alarm
        self.first_alarm = FirstAlarm()
        self.meter = IntervalMeter(self.device)
        self.interval_start: float | None = None  # set at the first batch: start-up is not throughput
        self.resumed_from = restored.from_step
        self.stopped = False  # an alarm asked to stop: every rank ends at the same step
        self.response = actions.AlarmResponse(plan.monitor, self.collective)
        self.best_record = plan.best_model.record() if plan.best_model is not None else None
        self.checkpointed_step = engine.global_steps
        self.last_row: dict[str, Any] = {STEP: engine.global_steps}
        self.shard = ray.train.get_dataset_shard("train")
        self.eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None

    @classmethod
    def setup(cls, plan: WorkerPlan) -> TrainingWorker:
        """Model, optimizer, schedule and DeepSpeed engine; restored from Ray Train's checkpoint if any."""
        import deepspeed

        # The shared-memory comm op would be JIT-compiled with g++ (~60 s); gloo works without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        from rayalign.models import load_causal_lm, load_tokenizer, with_adapters

        rank = ray.train.get_context().get_world_rank()
        use_reserved_cpus(f"train worker {rank}")
        torch.manual_seed(plan.train.seed + rank)
        t = plan.train
        model_dir = plan.model.local_dir()
        ds_config = deepspeed_config(t, plan.dtype)
        with partitioned_construction(ds_config):
            model = load_causal_lm(model_dir, plan.dtype, plan.attn_implementation)
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if plan.lora is not None:
            model = with_adapters(model, plan.lora)
        policy = PolicyLogps(model, t.packing.logps_chunk_tokens)
        deepspeed.utils.set_z3_leaf_modules(policy, [ResponseHead])  # see ResponseHead: one gather per pass
        # With LoRA only the adapters are trainable: the optimizer holds (and DeepSpeed shards) just them.
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = adamw(trainable, t)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, plan.steps.total))
        engine, _, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        metrics_path = Path(plan.run_dir) / METRICS_FILE
        saved = ray.train.get_checkpoint()
        restored = Restored([], None)
        if saved is not None:
            history = checkpoint.restore(
                engine, saved, metrics_path if rank == 0 else None, adapters_only=plan.lora is not None
            )
            restored = Restored(history, engine.global_steps)
        elif rank == 0:  # rank 0 may be on another node than the driver, which cleared its own copy
            metrics_path.unlink(missing_ok=True)
        step = PreferenceStep(
            plan.loss,
            t,
            load_tokenizer(model_dir).pad_token_id,
            torch.device(engine.device),
            plan.attn_implementation,
            plan.reference_in_worker,
        )
        worker = cls(plan, engine, step, restored)
        if worker.response.acts and saved is not None:
            # A restored run goes on with the loss that was active at its checkpoint; rank 0's history says which.
            switched = actions.SWITCH if actions.was_switched(restored.history) else actions.WARN
            if worker.collective.all_reduce_max(switched if rank == 0 else actions.WARN) == actions.SWITCH:
                worker.switch()
        return worker

    def switch(self) -> None:
        """Train on with ``monitor.switch_to`` (every rank at the same step)."""
        self.step = replace(self.step, loss=self.plan.monitor.switch_to)
        self.response.switched = True

    def train(self) -> None:
        """Epochs of optimizer steps until the planned step count; after a restore, resume mid-epoch."""
        plan, engine = self.plan, self.engine
        # Where the data stands after a restore: whole epochs done, then steps of this epoch done.
        start_epoch, skip = divmod(engine.global_steps, plan.steps.per_epoch)
        if self.resumed_from is not None:
            logger.info(
                "resumed from the checkpoint at step %d: epoch %d, skipping %d steps",
                self.resumed_from,
                start_epoch,
                skip,
            )
        for epoch in range(start_epoch, plan.train.epochs):
            if engine.global_steps >= plan.steps.total:
                return
            step_batches = self.shard.iter_batches(batch_size=pairs_per_step(plan.train), batch_format="numpy")
            # Read to the end of the epoch's stream even past the last step: the leftover pairs are not trained.
            for index, batch in enumerate(step_batches):
                if skip <= index < plan.steps.per_epoch:
                    self.train_step(batch)
                    self.log_step(epoch)
                    if engine.global_steps >= plan.steps.total or self.stopped:
                        return
            skip = 0

    def train_step(self, batch: dict[str, Any]) -> None:
        """One optimizer step on this worker's ``batch`` of pairs (:meth:`PreferenceStep.optimizer_step`), metered."""
        self.interval_start = self.interval_start or time.perf_counter()
        for scored in self.step.optimizer_step(self.engine, batch, self.collective.all_reduce_max):
            self.meter.add(scored.terms, scored.real_tokens, self.step.loss.beta)

    def log_step(self, epoch: int) -> None:
        """After an optimizer step: log (every ``train.log_every``), evaluate, checkpoint, as due."""
        plan, step = self.plan, self.engine.global_steps
        done = step >= plan.steps.total
        every_eval, every_ckpt = plan.monitor.eval_every, plan.train.checkpoint_every
        evaluate = self.eval_shard is not None and (done or bool(every_eval and step % every_eval == 0))
        if step % plan.train.log_every and not (done or evaluate):
            return
        row = {STEP: step, EPOCH: epoch, LR: self.engine.get_lr()[0]}
        if self.resumed_from is not None:
            row[RESUMED_FROM_STEP], self.resumed_from = self.resumed_from, None
        row.update(self.meter.reduce(self.interval_start, all_reduce=self.collective.all_reduce_sum))
        check_finite(row)
        if evaluate:
            batches = heldout_share(
                self.eval_shard.iter_batches(batch_size=plan.train.micro_batch_size, batch_format="numpy"),
                self.rank,
                self.world_size,
            )
            row.update(self.step.evaluate(self.engine, batches, self.collective))
        row.update(_peak_memory(self.device))
        self.interval_start = time.perf_counter()
        if self.rank == 0:
            self.history.append(row)
            row.update(actions.alarms_of(self.history, plan.monitor))
            alarm = self.first_alarm.of(row)
            if alarm:
                logger.warning("PATHOLOGY ALARM at step %d: %s", row[STEP], alarm)
        action = self.response.agree(row, self.rank)
        if evaluate and action != actions.STOP:  # a stop exports the best model seen before its alarm
            self._keep_if_best(row)
        if action == actions.SWITCH:
            self.switch()
        elif action == actions.STOP:
            self.stopped = True
        if self.rank == 0:
            if action != actions.WARN:
                row[ACTION] = actions.describe(action, plan.monitor)
                logger.warning("step %d: %s", step, row[ACTION])
            self._record(row)
        self.last_row = row
        done = done or self.stopped
        # Only what a consumer needs goes to Ray Train (checkpoints; held-out metrics for Tune):
        # a worker blocks in report() until the controller, polling every 2 s, took the last one,
        # so reporting every logged step would cap training at one step per 2 s.
        if done or (every_ckpt and step % every_ckpt == 0):
            self.save_checkpoint()
        elif evaluate:
            checkpoint.report(row)

    def _keep_if_best(self, row: dict[str, Any]) -> None:
        """Keep the model as the best one when ``row``'s held-out value beats the best so far (every rank sees the
        same reduced value, so every rank decides alike and saves its shards)."""
        best = self.plan.best_model
        if best is None or not best.improves(row[best.key], self.best_record):
            return
        best.keep(self.engine, row, self.collective)
        self.best_record = {STEP: row[STEP], "key": best.key, "value": row[best.key]}

    def _record(self, row: dict[str, Any]) -> None:
        """Rank 0: the metrics file, the progress relay, the log line."""
        assert self.metrics_path is not None, "only rank 0 records rows"
        append_jsonl(self.metrics_path, row)
        if self.plan.progress is not None:
            self.plan.progress.post.remote(row)  # not awaited: the next step does not wait on the driver
        logger.info(step_line(row, self.plan.steps.total))

    def save_checkpoint(self) -> None:
        checkpoint.report(self.last_row, self.engine, self.metrics_path, adapters_only=self.plan.lora is not None)
        self.checkpointed_step = self.last_row[STEP]

    def save(self) -> None:
        """The final checkpoint (if the stream ended before the planned step count) and the HF export: of the
        best held-out model when one is kept by ``monitor.keep_best`` or the run stopped on an alarm."""
        if self.checkpointed_step != self.engine.global_steps:
            self.save_checkpoint()
        plan = self.plan
        if plan.best_model is not None and self.best_record is not None and (plan.monitor.keep_best or self.stopped):
            plan.best_model.restore_into(self.engine)
        export = ModelExport(
            plan.model.local_dir(),
            Path(plan.run_dir) / MODEL_DIR,
            plan.model_storage,
            plan.train.zero_stage,
            merge_adapters=plan.lora is not None and plan.lora.export_merged,
        )
        written = export_hf_model(self.engine, export, self.rank)
        if written is not None:
            logger.info(
                "model exported: %d safetensors file(s), %.2f GB, at most %.2f GB gathered at once",
                len(written.files),
                written.total_bytes / 1e9,
                written.largest_gather_bytes / 1e9,
            )


def train_loop_per_worker(config: dict[str, WorkerPlan]) -> None:
    """Ray Train's entry point on every worker (``train_loop_config={"plan": WorkerPlan}``)."""
    worker = TrainingWorker.setup(config["plan"])
    worker.train()
    worker.save()
