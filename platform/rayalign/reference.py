"""Reference stage: a pool of Ray Data actors that score pairs with the frozen reference.

Each actor holds one copy of the reference model; the training workers never
load it. The stage adds, per pair:

    ref_chosen_logps, ref_rejected_logps   Σ log π_ref(y|x) over response tokens
    chosen_tokens, rejected_tokens         response lengths in tokens

Backends implement the same callable-class interface (``__init__(model_dir,
cfg)``, ``__call__(batch) -> batch``), so another engine can take the place of
:class:`TransformersReferenceScorer` behind :func:`add_reference_logps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ray.data import ActorPoolStrategy, Dataset

from rayalign.config import RunConfig

REFERENCE_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens"]


class TransformersReferenceScorer:
    """Scores pairs with a Hugging Face causal LM, no gradients, in eval mode."""

    def __init__(self, model_dir: str, run_cfg: dict[str, Any]):
        import torch

        from rayalign.models import load_causal_lm, load_tokenizer

        cfg = RunConfig.model_validate(run_cfg)
        self.device = "cuda" if cfg.reference.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_dir, cfg.model.dtype).to(self.device).eval()
        self.pad_id = load_tokenizer(model_dir).pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from rayalign.logprobs import collate_pairs, sequence_logps, split_pairs

        with torch.inference_mode():
            logps, counts = sequence_logps(self.model, collate_pairs(batch, self.pad_id).to(self.device))
        chosen, rejected = split_pairs(logps.double().cpu())
        chosen_n, rejected_n = split_pairs(counts.cpu())
        batch["ref_chosen_logps"] = chosen.numpy()
        batch["ref_rejected_logps"] = rejected.numpy()
        batch["chosen_tokens"] = chosen_n.numpy().astype(np.int32)
        batch["rejected_tokens"] = rejected_n.numpy().astype(np.int32)
        return batch


SCORERS = {"transformers": TransformersReferenceScorer}


def add_reference_logps(pairs: Dataset, cfg: RunConfig, model_dir: Path) -> Dataset:
    """Lazily append reference log-probs to tokenized pairs with a pool of scorer actors."""
    ref = cfg.reference
    return pairs.map_batches(
        SCORERS[ref.backend],
        fn_constructor_kwargs={"model_dir": str(model_dir), "run_cfg": cfg.model_dump()},
        batch_size=ref.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=ref.num_actors),
        num_cpus=ref.cpus_per_actor,
        num_gpus=ref.gpus_per_actor,
    )
