"""Training stage: Ray Train workers running DeepSpeed on a stream of scored pairs.

Each worker reads its shard of the reference-scored stream
(``ray.train.get_dataset_shard``), computes policy log-probs of chosen and
rejected in one forward pass over the concatenated batch, applies the
configured preference loss, and steps a DeepSpeed engine (ZeRO 0-3). Rank 0
appends one row per logging step to ``metrics.jsonl``; every rank reports to
Ray Train. At the end the policy is saved in Hugging Face format.

Fault tolerance: a checkpoint holds every rank's DeepSpeed shards plus rank 0's
``metrics.jsonl`` up to that step. When a worker or its node is lost, Ray Train
restarts the worker group (``train.max_failures``) from the last checkpoint:
the engine, the step counter and the metrics history come back from it, and
each worker skips the micro-batches of the current epoch it had already
trained, so the run ends at the planned step count with each step logged once.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.data import Dataset
from ray.train import Checkpoint, CheckpointConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

from rayalign.alarms import pathology_alarm
from rayalign.config import LossConfig, RunConfig, TrainConfig
from rayalign.distributed import Collective
from rayalign.logprobs import sequence_logps, split_pairs
from rayalign.losses import ObjectiveTerms, PairLogps, objective
from rayalign.metrics import IntervalMeter, append_jsonl, preference_stats, read_jsonl
from rayalign.schema import REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS, collate_pairs
from rayalign.storage import upload

DEEPSPEED_TAG = "deepspeed"
METRICS_FILE = "metrics.jsonl"
# Ray Train forwards worker logging to the driver; a plain print() would be shown twice.
logger = logging.getLogger(__name__)


def micro_batches_per_epoch(train: TrainConfig, num_workers: int, num_pairs: int) -> int:
    """Micro-batches each worker reads per epoch (Ray Train splits the stream equally across workers)."""
    return math.ceil((num_pairs // num_workers) / train.micro_batch_size)


def planned_steps(train: TrainConfig, num_workers: int, num_pairs: int) -> int:
    """Optimizer steps the run will take."""
    micro_batches = micro_batches_per_epoch(train, num_workers, num_pairs)
    steps = train.epochs * (micro_batches // train.gradient_accumulation_steps)
    if steps == 0:
        raise ValueError(
            f"{num_pairs} usable pairs are not enough for one optimizer step with {num_workers} workers × "
            f"micro_batch_size {train.micro_batch_size} × gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps}"
        )
    return min(steps, train.max_steps) if train.max_steps else steps


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        # We pass a torch optimizer: naming one here would JIT-build fused_adam (~70 s on CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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


def _export_hf_model(engine, model_dir: str, out_dir: Path, storage_uri: str, zero_stage: int, rank: int) -> None:
    """Save the policy in Hugging Face format to ``out_dir`` on rank 0's node, then to storage."""
    import deepspeed

    from rayalign.models import load_tokenizer

    # ZeRO-3 shards parameters across ranks: gather full tensors before saving.
    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            engine.module.save_pretrained(out_dir, safe_serialization=True)
            load_tokenizer(model_dir).save_pretrained(out_dir)
            upload(out_dir, storage_uri)


def _report(metrics: dict[str, Any], engine=None, metrics_path: Path | None = None) -> None:
    """Report to Ray Train (a barrier across workers); with ``engine``, also checkpoint it, together
    with rank 0's ``metrics_path`` so the history survives the loss of rank 0's node."""
    if engine is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG)
        if metrics_path is not None and metrics_path.exists():
            shutil.copy(metrics_path, Path(tmp) / METRICS_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    # A checkpoint is restorable only once Ray Train's controller has taken it from the worker's
    # one-slot report queue (it polls every 2 s). This report waits for that, so a node lost after
    # training moved on never restores from an older checkpoint. No held-out metrics in it: Tune's
    # callback ignores it.
    ray.train.report({"step": metrics["step"]})


def read_checkpoint_file(checkpoint: Checkpoint, name: str) -> bytes:
    """One file of a (possibly remote) checkpoint, without downloading the model shards."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as stream:
        return stream.read()


def _restore(engine, checkpoint: Checkpoint, metrics_path: Path, rank: int) -> list[dict[str, Any]]:
    """Load the engine (weights, optimizer, scheduler, step) from ``checkpoint``; on rank 0 also put
    ``metrics.jsonl`` back as it was at that step and return its rows (the alarm's history)."""
    with checkpoint.as_directory() as ckpt_dir:
        engine.load_checkpoint(ckpt_dir, tag=DEEPSPEED_TAG)
        saved = Path(ckpt_dir) / METRICS_FILE
        if rank != 0 or not saved.exists():
            return []
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(saved, metrics_path)
    return read_jsonl(metrics_path)


def _score_batch(
    model, batch: dict[str, Any], loss_cfg: LossConfig, pad_id: int, device: torch.device
) -> tuple[ObjectiveTerms, int]:
    """The objective's terms for one micro-batch, and its count of real (non-padding) tokens.

    Everything stays on ``device`` (no host synchronisation); the loss maths is float32 whatever
    the model's dtype, and the reference column (float64 from the actors) is cast to it there.
    """
    pairs = collate_pairs(batch, pad_id)
    tokens = int(pairs.attention_mask.sum())  # counted on the host, before the copy to the device
    pairs = pairs.to(device)
    logps, counts = sequence_logps(model, pairs)
    policy_chosen, policy_rejected = split_pairs(logps)
    chosen_tokens, rejected_tokens = split_pairs(counts)
    terms = objective(loss_cfg, PairLogps(
        policy_chosen,
        policy_rejected,
        ref_chosen=torch.as_tensor(batch[REF_CHOSEN_LOGPS], device=device).to(logps.dtype),
        ref_rejected=torch.as_tensor(batch[REF_REJECTED_LOGPS], device=device).to(logps.dtype),
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    ))
    return terms, tokens


def _evaluate(
    model, batches, loss_cfg: LossConfig, pad_id: int, device: torch.device, collective: Collective
) -> dict[str, float]:
    """The training metrics on the held-out ``batches``, averaged over every worker's shard."""
    meter = IntervalMeter(device)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for batch in batches:
            terms, tokens = _score_batch(model, batch, loss_cfg, pad_id, device)
            meter.add(terms.loss, preference_stats(*terms.compared, beta=loss_cfg.beta), tokens)
    model.train()
    row = meter.reduce(start, all_reduce=collective.all_reduce_sum)
    return {f"eval/{key}": value for key, value in row.items() if not key.endswith("/s")}


def _peak_memory(device: torch.device) -> dict[str, float]:
    """This worker's peak accelerator memory so far (GiB); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    import deepspeed

    # The shared-memory comm op would be JIT-compiled with g++ (~60 s); gloo works without it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from rayalign.models import load_causal_lm, load_tokenizer

    cfg = RunConfig.model_validate(loop_cfg["run"])
    run_dir, model_dir, total_steps = Path(loop_cfg["run_dir"]), loop_cfg["model_dir"], loop_cfg["total_steps"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.train.seed + rank)

    model = load_causal_lm(model_dir, cfg.model.dtype)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.learning_rate,
        betas=cfg.train.adam_betas,
        weight_decay=cfg.train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.train, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    metrics_path = run_dir / METRICS_FILE
    history: list[dict[str, Any]] = []  # rank 0's logged rows, for the pathology alarm
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        history = _restore(engine, checkpoint, metrics_path, rank)
    elif rank == 0:  # rank 0 may be on another node than the driver, which cleared its own copy
        metrics_path.unlink(missing_ok=True)
    pad_id = load_tokenizer(model_dir).pad_token_id
    device = torch.device(engine.device)
    collective = Collective.of_worker_group(device)

    shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop_cfg["has_eval"] else None
    monitor = cfg.monitor
    meter = IntervalMeter(device)
    interval_start = None  # set at the first batch, so pipeline start-up is not counted as throughput
    step = engine.global_steps
    checkpointed_step, row = step, {"step": step}
    # Where the data stands after a restore: whole epochs done, then micro-batches of this epoch done.
    start_epoch, skip = divmod(step * cfg.train.gradient_accumulation_steps, loop_cfg["micro_batches_per_epoch"])
    resumed_from = step if checkpoint is not None else None
    if resumed_from is not None:
        logger.info("resumed from the checkpoint at step %d: epoch %d, skipping %d micro-batches",
                    step, start_epoch, skip)
    for epoch in range(start_epoch, cfg.train.epochs):
        if step >= total_steps:
            break
        for batch in shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"):
            if skip:  # already trained before the restore
                skip -= 1
                continue
            interval_start = interval_start or time.perf_counter()
            terms, tokens = _score_batch(engine, batch, cfg.loss, pad_id, device)
            engine.backward(terms.loss.mean())
            engine.step()
            meter.add(terms.loss, preference_stats(*terms.compared, beta=cfg.loss.beta), tokens)

            if engine.global_steps == step:  # still accumulating gradients
                continue
            step = engine.global_steps
            done = step >= total_steps
            evaluate = eval_shard is not None and (done or bool(monitor.eval_every and step % monitor.eval_every == 0))
            if step % cfg.train.log_every and not (done or evaluate):
                continue
            row = {"step": step, "epoch": epoch, "lr": engine.get_lr()[0]}
            if resumed_from is not None:
                row["resumed_from_step"], resumed_from = resumed_from, None
            row.update(meter.reduce(interval_start, all_reduce=collective.all_reduce_sum))
            if evaluate:
                eval_batches = eval_shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy")
                row.update(_evaluate(engine, eval_batches, cfg.loss, pad_id, device, collective))
            row.update(_peak_memory(device))
            interval_start = time.perf_counter()
            if rank == 0:
                history.append(row)
                alarm = pathology_alarm(history, monitor.alarm_window, monitor.alarm_min_change)
                if alarm:
                    row["alarm"] = alarm
                    if "alarm" not in (history[-2] if len(history) > 1 else {}):
                        logger.warning("PATHOLOGY ALARM at step %d: %s", step, alarm)
                append_jsonl(metrics_path, row)
                logger.info(
                    "step %d/%d loss=%.4f reward_acc=%.3f abs_acc=%.3f frac_in_U=%.3f pairs/s=%.1f",
                    step, total_steps, row["loss"], row["rewards/accuracies"],
                    row["pref/absolute_accuracy"], row["pref/frac_in_U"], row["pairs/s"],
                )
            # Only what a consumer needs goes to Ray Train (checkpoints; held-out metrics for Tune):
            # a worker blocks in report() until the controller, polling every 2 s, took the last one,
            # so reporting every logged step would cap training at one step per 2 s.
            every = cfg.train.checkpoint_every
            if done or (every and step % every == 0):
                _report(row, engine, metrics_path)
                checkpointed_step = step
            elif evaluate:
                _report(row)
            if done:
                break

    if checkpointed_step != step:  # the stream ended before the planned step count
        _report(row, engine, metrics_path)
    storage = cfg.output.run_storage
    _export_hf_model(engine, model_dir, run_dir / "model", f"{storage}/model", cfg.train.zero_stage, rank)


def fit(
    cfg: RunConfig,
    pairs: Dataset,
    num_pairs: int,
    model_dir: Path,
    run_dir: Path,
    heldout: Dataset | None = None,
    callbacks: list | None = None,
    resume_name: str | None = None,
):
    """Train the policy on reference-scored ``pairs`` (evaluating on ``heldout``); returns Ray Train's Result.

    ``callbacks`` are Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` inside a sweep trial.
    ``resume_name``: Ray Train continues a run of this name under the same storage path from its last
    checkpoint (a sweep trial that Tune restores); None starts a fresh run.
    """
    total_steps = planned_steps(cfg.train, cfg.scaling.num_workers, num_pairs)
    micro_batches = micro_batches_per_epoch(cfg.train, cfg.scaling.num_workers, num_pairs)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "run": cfg.model_dump(),
            "run_dir": str(run_dir),
            "model_dir": str(model_dir),
            "total_steps": total_steps,
            "micro_batches_per_epoch": micro_batches,
            "has_eval": heldout is not None,
        },
        scaling_config=RayScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        datasets={"train": pairs, **({"eval": heldout} if heldout is not None else {})},
        run_config=RayRunConfig(
            name=resume_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=f"{cfg.output.run_storage}/ray",
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
