"""Memory per training rank before the run, from the model's config alone (built on the meta device, no weights).

Model states follow DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``; the ZeRO paper, Rajbhandari et al. 2020, §3.1 and §5): for Ψ trainable
parameters of v bytes (2 in bfloat16, 4 in float32) trained with Adam, DeepSpeed keeps

    the model's weights (v, every parameter, frozen ones included) and gradients (v),
    an fp32 gradient partition (4, mixed precision only), an fp32 copy of the weights (4),
    Adam's momentum and variance (8)

bytes per parameter. ZeRO-1 partitions the fp32 parts across the N ranks, ZeRO-2 the model-dtype gradients too,
ZeRO-3 the weights too (its estimator counts no separate model-dtype gradients): in bfloat16 ZeRO-2 holds
2Ψ + 18Ψ/N and ZeRO-3 18Ψ/N plus one gathered layer (4 bytes per parameter), as DeepSpeed's estimators say.
``offload_optimizer`` / ``offload_param`` (``train.deepspeed``) move the fp32 parts / the weights to host memory.
DeepSpeed's communication buckets, and under ZeRO-3 the parameters it keeps gathered
(``stage3_max_live_parameters``), come from the effective config (its defaults where unset).
Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
§4.1): 34·h bytes per token and layer at 2 bytes per value without the attention scores (SDPA and flash attention
keep none), or, with activation checkpointing, each layer's input (2·h) plus one layer's recomputation. The
log-prob head computes ``train.packing.logps_chunk_tokens`` positions of float32 logits at a time.

The plan is an estimate: allocator fragmentation, CUDA context (~0.5 GiB) and framework workspaces come on top.
``bench/zero3_memory.py`` compares it with measured peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2}
# DeepSpeed 0.19's defaults for the buckets the plan counts (deepspeed.runtime.zero.config.DeepSpeedZeroConfig).
DEEPSPEED_BUCKET_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "allgather_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e9,
}
ACTIVATION_BYTES_PER_TOKEN_LAYER_PER_H = 34  # Korthikanti et al. 2022, 16-bit values, no attention scores kept


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a model (meta-device build): ``total`` and ``trainable`` (LoRA: the adapters),
    ``largest_layer`` (the most one decoder layer, the embedding or the head holds: ZeRO-3 gathers it whole)."""

    total: int
    trainable: int
    largest_layer: int
    hidden_size: int
    num_layers: int
    vocab_size: int


def model_size(model_dir: Path, lora=None) -> ModelSize:
    """Count ``model_dir``'s parameters from its ``config.json`` without loading a weight (``lora``: a
    :class:`rayalign.config.LoraConfig`, whose adapters are then the trainable ones)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if lora is not None:
        from rayalign.models import with_adapters

        model = with_adapters(model, lora)
    params = {id(p): p for p in model.parameters()}.values()  # a tied head once
    largest = max(sum(p.numel() for p in module.parameters()) for module in _layers(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelSize(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_layer=largest,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
    )


def _layers(model):
    """The modules ZeRO-3 gathers one at a time: each decoder layer, the input embedding, the output head."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    layers = list(max(lists, key=len)) if lists else [model]
    return [*layers, model.get_input_embeddings(), model.get_output_embeddings() or model.get_input_embeddings()]


@dataclass(frozen=True)
class MemoryPlan:
    """Per training rank, in GiB: ``device`` (weights, gradients, optimizer states, buffers, activations, logits)
    and ``host`` (what ``train.deepspeed`` offloads); ``reference_actor``: one reference actor's weights (vLLM's
    KV cache comes on top, as ``gpu_memory_utilization`` reserves). ``device_budget``: the memory of one device
    when known, and ``fits`` whether the plan stays within it (None: unknown)."""

    zero_stage: int
    num_workers: int
    dtype: str
    tokens_per_pass: int
    device: dict[str, float]
    host: dict[str, float]
    reference_actor: float | None
    device_budget: float | None = None

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_budget is None else self.device_total <= self.device_budget

    def line(self) -> str:
        parts = ", ".join(f"{name} {gib:.2f}" for name, gib in self.device.items())
        text = f"memory plan per rank (ZeRO-{self.zero_stage}, {self.num_workers} worker(s), {self.dtype}): "
        text += f"{self.device_total:.2f} GiB on its device ({parts})"
        if any(self.host.values()):
            text += f"; {sum(self.host.values()):.2f} GiB offloaded to host memory"
        if self.fits is not None:
            text += f"; {'fits' if self.fits else 'does NOT fit'} a {self.device_budget:.0f} GiB device"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device_total": round(self.device_total, 3), "fits": self.fits}


def memory_plan(cfg, size: ModelSize, device_budget_gib: float | None = None) -> MemoryPlan:
    """The plan for ``cfg`` (a :class:`rayalign.config.RunConfig`) and a model of ``size``; see the module's
    docstring for the formulas and their sources."""
    from rayalign.loss_specs import needs_reference
    from rayalign.train.deepspeed_settings import deepspeed_config

    train, workers, dtype = cfg.train, cfg.scaling.num_workers, cfg.model.dtype
    ds = deepspeed_config(train, dtype)
    zero = {**DEEPSPEED_BUCKET_DEFAULTS, **ds.get("zero_optimization", {})}
    stage = train.zero_stage
    value = BYTES[dtype]
    mixed = dtype != "float32"
    partitions = max(workers, 1)
    # DeepSpeed's accounting (module docstring), frozen parameters holding weights only.
    weights = size.total * value / (partitions if stage == 3 else 1)
    model_dtype_gradients = 0 if stage == 3 else size.trainable * value / (partitions if stage >= 2 else 1)
    # Without ZeRO a float32 run keeps no fp32 copy: its weights are the ones Adam updates.
    fp32_copy = 4 if mixed or stage >= 1 else 0
    fp32_states = size.trainable * ((4 if mixed else 0) + fp32_copy + 8) / (partitions if stage >= 1 else 1)
    gradients = model_dtype_gradients + (size.trainable * 4 / (partitions if stage >= 1 else 1) if mixed else 0)
    optimizer = fp32_states - (gradients - model_dtype_gradients)
    host = {"optimizer_states": 0.0, "weights": 0.0}
    if _offloaded(zero, "offload_optimizer"):
        host["optimizer_states"] = (optimizer + gradients - model_dtype_gradients) / GIB
        optimizer, gradients = 0.0, model_dtype_gradients
    if stage == 3 and _offloaded(zero, "offload_param"):
        host["weights"], weights = weights / GIB, 0.0
    # DeepSpeed's buffers: the gradient reduce bucket, and the parameter all-gather (stages 1-2) or prefetch
    # (stage 3) bucket; under ZeRO-3 one layer is gathered whole for its forward and backward.
    buffers = zero["reduce_bucket_size"] * value if stage >= 1 else 0.0
    if stage in (1, 2):
        buffers += zero["allgather_bucket_size"] * value
    if stage == 3:
        buffers += zero["stage3_prefetch_bucket_size"] * value + size.largest_layer * 4  # DeepSpeed's estimate
        # Gathered parameters stay resident until this many are (DeepSpeed releases them only beyond it): with
        # the default 1e9 a model below a billion parameters is held whole on every rank during the passes.
        buffers += min(zero["stage3_max_live_parameters"], size.total) * value
    tokens = train.tokens_per_batch or train.micro_batch_size * 2 * cfg.data.max_length
    per_token_layer = ACTIVATION_BYTES_PER_TOKEN_LAYER_PER_H * size.hidden_size * value / 2
    if train.gradient_checkpointing:
        activations = tokens * size.num_layers * 2 * size.hidden_size * value / 2 + tokens * per_token_layer
    else:
        activations = tokens * size.num_layers * per_token_layer
    # Float32 logits of one chunk, with their softmax and gradient.
    logits = 3 * min(tokens, train.packing.logps_chunk_tokens) * size.vocab_size * 4
    actors = needs_reference(cfg.loss.type) and not cfg.reference.in_worker  # adapters_off scores in the workers
    reference_actor = size.total * BYTES[dtype] / GIB if actors else None
    return MemoryPlan(
        zero_stage=stage,
        num_workers=workers,
        dtype=dtype,
        tokens_per_pass=tokens,
        device={
            "weights": weights / GIB,
            "gradients": gradients / GIB,
            "optimizer_states": optimizer / GIB,
            "buffers": buffers / GIB,
            "activations": activations / GIB,
            "logits": logits / GIB,
        },
        host=host,
        reference_actor=reference_actor,
        device_budget=device_budget_gib,
    )


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")
