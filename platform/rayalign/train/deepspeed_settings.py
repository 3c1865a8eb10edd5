"""DeepSpeed's config for a run: what rayalign's settings say, with ``train.deepspeed`` merged over it.

Imports nothing heavy: ``rayalign validate``'s memory plan reads it on the driver without torch or Ray Train.
"""

from __future__ import annotations

from typing import Any

from rayalign.config import TrainConfig


def deepspeed_config(train: TrainConfig, dtype: str) -> dict[str, Any]:
    """DeepSpeed's config from the run's settings, with ``train.deepspeed`` merged over it (nested sections key by
    key; the config refuses the keys set here from rayalign's own settings). ZeRO's buckets stay DeepSpeed's
    defaults: sized by the hidden size as Hugging Face's Trainer does (h² elements), ZeRO-3 failed on CPU for a
    model whose head is tied to its input embedding (DeepSpeed 0.19.8's ``zero_grad``: "unknown parameter type");
    set them in ``train.deepspeed`` where the defaults' 2 GB buffers do not fit."""
    return merged(_generated_deepspeed_config(train, dtype), train.deepspeed)


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: a dict merges into a dict key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _generated_deepspeed_config(train: TrainConfig, dtype: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        # We pass a torch optimizer: naming one here would JIT-build fused_adam (~70 s on CPU).
        "zero_allow_untested_optimizer": True,
        # With offload_optimizer (train.deepspeed), Adam steps the offloaded fp32 states on the CPU: torch's fused
        # AdamW does it in one kernel; DeepSpeed's CPUAdam would need a JIT build on every node, and DeepSpeed's
        # check (this key true) refuses any other optimizer under offload.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
