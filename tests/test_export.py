"""The exported model under ZeRO-3: safetensors shards written one at a time, each gathered alone, never the model."""

from __future__ import annotations

import json
import math
import multiprocessing

import torch

MAX_SHARD_BYTES = 100_000  # a fraction of the tiny model's float32 weights: several shards


def test_a_zero3_export_gathers_one_shard_at_a_time_and_loads_back_as_the_model(tiny_model_dir, tmp_path):
    """A full model and a LoRA model on a real ZeRO-3 engine (every parameter partitioned), exported with a small
    shard size: Hugging Face's sharded layout (index and shards) that ``from_pretrained`` loads back to the engine's
    weights, the same names ``save_pretrained`` writes, at most one shard gathered at once; with LoRA, the adapters
    alone in PEFT's format, and the merged model equal to PEFT's own merge of those adapters. Then a model trained
    two steps with its weights and Adam's states offloaded to host memory (train.deepspeed), exported trained. In a
    process of its own: DeepSpeed keeps process-wide state of the groups an earlier engine test made."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_export_under_zero3, (str(tiny_model_dir), str(tmp_path)))


def _export_under_zero3(model_dir: str, root: str) -> None:
    from pathlib import Path

    import deepspeed
    from engines import PAD, deepspeed_engine, one_process_group, pairs_batch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from rayalign.config import LoraConfig, LossConfig, TrainConfig
    from rayalign.models import load_tokenizer
    from rayalign.storage import location
    from rayalign.train.export import SAFE_WEIGHTS_INDEX, ModelExport, export_hf_model
    from rayalign.train.step import PreferenceStep

    root = Path(root)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    assert not base.config.tie_word_embeddings  # the head is a weight of its own (tied heads: test_batching.py)
    # Every parameter partitioned: the tiny model's are all below the default persistence threshold.
    zero = {"stage3_param_persistence_threshold": 0}
    train = TrainConfig(zero_stage=3, micro_batch_size=4, deepspeed={"zero_optimization": zero})
    with one_process_group("gloo", torch.device("cpu")):
        # The full model.
        engine = deepspeed_engine(model_dir, train, torch.device("cpu"))
        assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned, none whole
        out = root / "full"
        export = ModelExport(model_dir, out, location(str(root / "stored-full")), 3, max_shard_size=MAX_SHARD_BYTES)
        written = export_hf_model(engine, export, rank=0)
        index = json.loads((out / SAFE_WEIGHTS_INDEX).read_text())
        assert set(index["weight_map"].values()) == set(written.files) and len(written.files) >= 3
        assert written.largest_gather_bytes <= MAX_SHARD_BYTES < written.total_bytes
        assert index["metadata"]["total_size"] == written.total_bytes == 4 * sum(p.numel() for p in base.parameters())
        reference = root / "save_pretrained"
        base.save_pretrained(reference)
        assert set(index["weight_map"]) == set(load_file(reference / "model.safetensors"))
        loaded = AutoModelForCausalLM.from_pretrained(out)
        for (name, expected), got in zip(base.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(expected, got), name
        assert (root / "stored-full" / SAFE_WEIGHTS_INDEX).is_file()  # and uploaded to the run's storage

        # LoRA: non-zero adapters (B starts at 0), exported alone and merged.
        engine = deepspeed_engine(model_dir, train, torch.device("cpu"), lora=LoraConfig(rank=4, export_merged=True))
        adapters = [p for n, p in engine.module.named_parameters() if "lora_B" in n]
        with deepspeed.zero.GatheredParameters(adapters, modifier_rank=0):
            for p in adapters:
                p.data.normal_(0, 0.05)
        out = root / "lora"
        export = ModelExport(
            model_dir, out, location(str(root / "stored-lora")), 3, merge_adapters=True, max_shard_size=MAX_SHARD_BYTES
        )
        written = export_hf_model(engine, export, rank=0)
        adapter_weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert adapter_weights and all("lora_" in name for name in adapter_weights)
        assert any(t.abs().sum() > 0 for name, t in adapter_weights.items() if "lora_B" in name)
        # Gathered per shard with its adapters, never the whole base.
        assert written.largest_gather_bytes < written.total_bytes == 4 * sum(p.numel() for p in base.parameters())
        expected = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), out / "adapter")
        expected = expected.merge_and_unload().state_dict()
        merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert set(merged) == set(expected)
        changed = 0
        for name, tensor in expected.items():
            torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
            changed += not torch.equal(tensor, base.state_dict()[name])
        assert changed > 0  # the adapters are in the merged weights
        assert load_tokenizer(out).pad_token_id == load_tokenizer(out / "adapter").pad_token_id

        # Weights and Adam's states offloaded to host memory (train.deepspeed): two optimizer steps of the training
        # step with rayalign's own optimizer, then an export that holds the trained weights.
        offload = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
        offloaded = train.model_copy(update={"deepspeed": {"zero_optimization": {**zero, **offload}}})
        engine = deepspeed_engine(model_dir, offloaded, torch.device("cpu"))
        assert engine.zero_offload_optimizer() and engine.zero_offload_param()
        step = PreferenceStep(LossConfig(), offloaded, PAD, torch.device("cpu"))
        losses = [
            step.optimizer_step(engine, pairs_batch(4, seed), lambda count: count)[0].terms.loss.mean().item()
            for seed in range(2)
        ]
        assert all(math.isfinite(loss) for loss in losses) and engine.global_steps == 2
        out = root / "offloaded"
        export_hf_model(engine, ModelExport(model_dir, out, location(str(root / "stored-offloaded")), 3), rank=0)
        trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert any(not torch.equal(trained[name], tensor) for name, tensor in base.state_dict().items())
