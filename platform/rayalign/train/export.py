"""The trained policy in Hugging Face format, written by rank 0 once training ends.

Under ZeRO-3 no rank ever holds the whole model: the safetensors shards are planned from the parameters' full
shapes (``huggingface_hub.split_torch_state_dict_into_shards``, on meta tensors), and each shard's parameters are
gathered, copied to rank 0's host memory, written and released before the next shard's are gathered. So the memory
an export adds on a device is one shard (``max_shard_size``), never the model, and rank 0's host memory holds one
shard at a time. With LoRA only the adapters are gathered for the adapter export; the merged export adds each
shard's adapters to its base weights on rank 0's CPU (PEFT's own ``get_delta_weight``), shard by shard.

Other ZeRO stages keep whole parameters on every rank: the model is saved with ``save_pretrained`` as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rayalign.storage import Location, upload, write_local

SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"  # Hugging Face's name for a sharded model's index
DEFAULT_MAX_SHARD_SIZE = "5GB"  # save_pretrained's default


@dataclass(frozen=True)
class ModelExport:
    """Where and how the trained policy is exported: from the starting weights' ``model_dir`` (its tokenizer)
    into ``out_dir`` on rank 0's node, then ``storage``. ``merge_adapters``: with LoRA, also save the base with
    the adapters merged in. ``max_shard_size``: the largest safetensors file under ZeRO-3 (bytes, or "5GB"), and
    so the most an export gathers at once."""

    model_dir: Path
    out_dir: Path
    storage: Location
    zero_stage: int
    merge_adapters: bool = False
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE


@dataclass(frozen=True)
class ExportedWeights:
    """What a sharded (ZeRO-3) export wrote: ``files`` (safetensors names), ``total_bytes`` of weights, and
    ``largest_gather_bytes``, the most it gathered at once (one shard, with LoRA's adapters for a merge)."""

    files: tuple[str, ...]
    total_bytes: int
    largest_gather_bytes: int


def export_hf_model(engine, export: ModelExport, rank: int) -> ExportedWeights | None:
    """Save the policy in Hugging Face format as ``export`` says; every rank calls it (ZeRO-3 gathers).

    ``engine.module`` is a :class:`rayalign.logprobs.PolicyLogps`; its ``model`` is what is saved. With LoRA
    (a PEFT model) that is the adapter, in PEFT's format, under ``out_dir/adapter``; ``merge_adapters`` also
    saves the base with the adapters merged in as ``out_dir`` itself. Returns, under ZeRO-3, what the full
    weights' shards hold (None otherwise, and on ranks other than 0)."""
    from rayalign.models import load_tokenizer

    model = engine.module.model
    sharded = export.zero_stage == 3
    # Written whole into a folder of its own, then moved onto out_dir: a killed export never leaves a model/ that
    # looks complete, and nothing of an earlier run's model/ survives beside it.
    out_dir = export.out_dir
    staging = out_dir.with_name(f"{out_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    lora = hasattr(model, "peft_config")
    full = not lora or export.merge_adapters
    if lora:
        _save_adapters(model, staging / "adapter", rank, sharded)
    written = _save_full_weights(model, staging, export, rank) if full else None
    if rank != 0:
        return None
    for folder in [staging / "adapter"] * lora + [staging] * full:
        load_tokenizer(export.model_dir).save_pretrained(folder)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    upload(out_dir, export.storage)
    return written


@contextmanager
def _gathered(params: list[torch.nn.Parameter], sharded: bool) -> Iterator[None]:
    """ZeRO-3: ``params`` whole on every rank for the block (a collective: every rank enters it alike)."""
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _save_adapters(model, out: Path, rank: int, sharded: bool) -> None:
    """PEFT's adapter files: only the trainable (adapter) parameters are gathered, never the frozen base."""
    if not sharded:
        if rank == 0:
            model.save_pretrained(out, safe_serialization=True)
        return
    adapters = {name: param for name, param in model.named_parameters() if param.requires_grad}
    with _gathered(list(adapters.values()), sharded):
        if rank == 0:
            state = {name: param.detach().to("cpu", copy=True) for name, param in adapters.items()}
            # PEFT keeps the adapter keys of the state dict it is given (get_peft_model_state_dict).
            model.save_pretrained(out, state_dict=state, safe_serialization=True)


def _save_full_weights(model, out: Path, export: ModelExport, rank: int) -> ExportedWeights | None:
    """The whole model's weights into ``out`` (with its config): ``save_pretrained`` when parameters are whole on
    every rank, else shard by shard. A PEFT model is saved with its adapters merged in."""
    sharded, merged = export.zero_stage == 3, hasattr(model, "peft_config")
    if not sharded:
        if rank == 0:  # the last use of the engine: merging in place is fine
            (model.merge_and_unload() if merged else model).save_pretrained(out, safe_serialization=True)
        return None
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    weights = _named_weights(model, merged)
    plan = split_torch_state_dict_into_shards(
        {
            name: torch.empty(_full_shape(weight.param), dtype=weight.param.dtype, device="meta")
            for name, weight in weights.items()
        },
        max_shard_size=export.max_shard_size,
    )
    largest = 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)  # a LoRA export wrote its adapter into it first
    for filename, names in plan.filename_to_tensors.items():
        params = list({id(p): p for name in names for p in weights[name].gathered()}.values())
        largest = max(largest, sum(_full_shape(p).numel() * p.element_size() for p in params))
        with _gathered(params, sharded):
            if rank == 0:
                save_file({name: weights[name].to_cpu() for name in names}, out / filename, metadata={"format": "pt"})
    if rank != 0:
        return None
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        write_local(out / SAFE_WEIGHTS_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    hf_model = model.get_base_model() if merged else model
    hf_model.config.save_pretrained(out)
    if hf_model.can_generate() and hf_model.generation_config is not None:
        hf_model.generation_config.save_pretrained(out)
    return ExportedWeights(tuple(plan.filename_to_tensors), plan.metadata["total_size"], largest)


@dataclass(frozen=True)
class _Weight:
    """One saved tensor: its parameter (or persistent buffer), and with a merge, the LoRA layer adding to it."""

    param: torch.Tensor
    lora_layer: torch.nn.Module | None = None
    adapter: str | None = None

    def gathered(self) -> list[torch.Tensor]:
        """Every parameter that must be whole to write it."""
        if self.lora_layer is None:
            return [self.param]
        return [p for p in self.lora_layer.parameters() if p is not self.param] + [self.param]

    def to_cpu(self) -> torch.Tensor:
        tensor = self.param.detach().to("cpu", copy=True)
        if self.lora_layer is not None:
            tensor += self.lora_layer.get_delta_weight(self.adapter).detach().to("cpu", tensor.dtype)
        return tensor.contiguous()


def _named_weights(model, merged: bool) -> dict[str, _Weight]:
    """The Hugging Face checkpoint names of ``model``'s weights (a weight tied to another is saved once, as
    ``save_pretrained`` does), with their LoRA layers when ``merged``."""
    hf_model = model.get_base_model() if merged else model
    weights: dict[str, _Weight] = {}
    lora_layers = {}
    if merged:
        from peft.tuners.lora import LoraLayer

        lora_layers = {
            f"{name}.base_layer.weight": module
            for name, module in hf_model.named_modules()
            if isinstance(module, LoraLayer)
        }
    for name, param in hf_model.named_parameters():  # shared (tied) parameters once
        if merged and ".lora_" in name:
            continue
        layer = lora_layers.get(name)
        saved_name = name.replace(".base_layer.", ".") if merged else name
        adapter = layer.active_adapters[0] if layer is not None else None
        weights[saved_name] = _Weight(param, layer, adapter)
    for module_name, module in hf_model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name not in module._non_persistent_buffers_set:
                weights[f"{module_name}.{buffer_name}" if module_name else buffer_name] = _Weight(buffer)
    return weights
