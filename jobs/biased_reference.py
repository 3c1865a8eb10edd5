"""A reference that prefers the wrong answers, for the jobs that reproduce DPO's failure mode.

``python jobs/pathology.py`` and ``python jobs/sweep_gamma.py`` import this module from their own
folder (Python puts a script's folder on ``sys.path``; ``ray job submit --working-dir .`` keeps it).
A small single-process SFT loop: it prepares an input for the platform, it is not its training path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rayalign.config import DataConfig, RunConfig
from rayalign.data.parsing import Pair
from rayalign.data.synthetic import generate
from rayalign.data.tokenizing import tokenize_pair
from rayalign.logprobs import sequence_logps, split_pairs
from rayalign.models import load_causal_lm, load_tokenizer, resolve_run_model
from rayalign.packing import pack_pairs
from rayalign.schema import TOKEN_COLUMNS


def bias_toward_rejected(
    model_dir: Path, pairs: list[dict[str, str]], out_dir: Path, steps: int, lr: float, seed: int
) -> Path:
    """Fine-tune a reference toward the *rejected* responses (SFT on prompt + rejected).

    This manufactures the situation the theory warns about: a reference with
    δ_ref < 0 on most pairs, from which DPO can lower its loss while the policy
    keeps preferring y_l.
    """
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    data_cfg = DataConfig(synthetic={}, max_length=64, max_prompt_length=32)
    tokenized = [tokenize_pair(Pair(p["prompt"], p["chosen"], p["rejected"]), tokenizer, data_cfg) for p in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(tokenized), (32,), generator=generator).tolist()
        batch = {k: [tokenized[i][j] for i in idx] for j, k in enumerate(TOKEN_COLUMNS)}
        logps, counts = sequence_logps(model, pack_pairs(batch, "shared_prompt", tokenizer.pad_token_id))
        _, rejected = split_pairs(logps / counts)
        loss = -rejected.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def biased_reference(cfg: RunConfig, steps: int = 200, lr: float = 3e-3, seed: int = 0) -> Path:
    """``cfg``'s starting model fine-tuned toward the wrong answers of its synthetic task,
    built once under ``<output.root>/reference-biased-<steps>`` and reused after that."""
    if cfg.data.synthetic is None:
        raise ValueError("a biased reference is built from the synthetic task: set data.synthetic")
    out_dir = Path(cfg.output.root).expanduser().resolve() / f"reference-biased-{steps}"
    if not (out_dir / "config.json").is_file():
        clean = cfg.data.synthetic.model_copy(update={"label_noise": 0.0})  # rejected = the wrong answer
        bias_toward_rejected(resolve_run_model(cfg), generate(clean), out_dir, steps=steps, lr=lr, seed=seed)
    return out_dir
