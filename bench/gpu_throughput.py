"""Training throughput: rayalign vs TRL's DPOTrainer vs a bare PyTorch loop, same model, data and settings, one run.

    python bench/gpu_throughput.py                                        # on a GPU: the defaults below
    python bench/gpu_throughput.py --device cpu --tiny --out /tmp/g.json  # the whole thing, CI-sized, on CPU
    python bench/gpu_throughput.py --device cpu --shape smollm2-135m ...  # any model shape (--shape), any device

Contenders, each trained for the same optimizer steps on the same pairs in the same order:

* ``rayalign``: ``rayalign.pipeline.run_train`` in this process (1 Ray Train worker, DeepSpeed ZeRO-2, the
  reference scored once into the reference cache before training, so the measurement is training only);
  its steps are those of ``<run_dir>/metrics.jsonl`` (``train.log_every: 1``), timed by when each row
  appears there (a synchronised step end, like the others'); the rates the rows carry themselves are
  kept beside (``from_metrics_jsonl``) as a cross-check.
* ``trl_precomputed_ref`` / ``trl``: TRL's ``DPOTrainer`` with and without ``precompute_ref_log_probs``
  (without it, a reference model is kept and run every step). TRL is only installed for this benchmark
  (``make install-bench``); without it these are recorded as skipped.
* ``rayalign_padded`` / ``rayalign_flex`` (only when named in ``--contenders``): the same run with
  ``train.packing.layout: padded`` (each sequence padded to the longest, as the peers lay out a batch), or
  with ``model.attn_implementation: flex_attention`` and the ``packed`` layout (a micro-batch in one row,
  no padding at all).
* ``rayalign_streamed_ref`` / ``rayalign_simpo`` (only when named): DPO with the reference streamed into
  training (``reference.cache: false``, so each step's time includes the reference actor's share of the
  machine), and SimPO, which needs no reference at all (no reference actor starts): what dropping the
  reference buys, same layout and data.
* ``bare``: a plain loop over the same padded batches (``rayalign.packing``, padded layout): one policy
  forward of chosen+rejected concatenated, the DPO sigmoid loss against reference log-probs computed
  before the timed loop, AdamW. A ceiling for this model without packing or kernel work.

Data: the HH-RLHF file in ../shared/data, parsed and tokenized once with ``rayalign.data.records`` (``parse_record``,
``tokenize_pair``); rayalign reads the same records itself (``data.limit``), and TRL and the bare loop are
given exactly those token ids. The tokenizer is a byte-level BPE trained here on the file's text; the model
is a randomly initialised Llama (no hub anywhere). Real tokens are the non-padding tokens a contender
computes on: prompt+chosen plus prompt+rejected per pair.

Steady state: the first ``--warmup`` optimizer steps are skipped; pairs/s = pairs / elapsed over the rest.
MFU on real tokens = 6 × non-embedding parameters × real tokens/s / peak FLOP/s, the peak measured in the
same run with a large matmul (bf16 on a GPU, fp32 on a CPU). Peak memory is
``torch.cuda.max_memory_allocated`` of the process that trains (rayalign: its rank-0 worker, from the
``memory/peak_allocated_gib`` metrics key), from model load to the end of training.

Writes ``--out`` (JSON, with the markdown table under "table") and prints the table. Without a GPU and
without ``--device cpu`` it says so and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import gzip
import hashlib
import json
import os
import platform as host  # the stdlib module (our package folder is never importable as `platform`)
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
DEFAULT_OUT = REPO / "bench" / "results" / "gpu-throughput.json"
CONTENDERS = ("rayalign", "bare", "trl_precomputed_ref", "trl")
# rayalign's other layouts, measured only when named in --contenders: settings as `rayalign train --set` takes them.
RAYALIGN_VARIANTS: dict[str, tuple[str, ...]] = {
    "rayalign": (),
    "rayalign_padded": ("train.packing.layout=padded",),
    "rayalign_flex": ("model.attn_implementation=flex_attention", "train.packing.layout=packed"),
    # DPO with its reference streamed into training (not cached first): each step's time holds the reference's
    # share of the machine, as a user's default run does. Beside rayalign_simpo: what a loss without a reference
    # saves, same layout and data.
    "rayalign_streamed_ref": ("reference.cache=false",),
    "rayalign_simpo": ("loss.type=simpo",),
}
KNOWN_CONTENDERS = (*CONTENDERS, *[name for name in RAYALIGN_VARIANTS if name != "rayalign"])
TRL_INSTALL = "make install-bench  (pip install -r bench/requirements.txt, with the project's torch pin)"
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-shaped model built from a config (random init)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tokenizer_records: int | None  # HH records the BPE tokenizer is trained on (None: all)
    tie_embeddings: bool = False  # the LM head shares the input embedding's weight
    seed: int = 0


FULL = ModelSpec(layers=24, hidden=896, heads=14, kv_heads=2, mlp=4864, vocab=32_000, tokenizer_records=None)
TINY = ModelSpec(layers=2, hidden=64, heads=2, kv_heads=1, mlp=128, vocab=512, tokenizer_records=300)
# SmolLM2-135M-Instruct's shape (its config.json), random init: the real model's compute without its weights.
SMOLLM2_135M = ModelSpec(
    layers=30, hidden=576, heads=9, kv_heads=3, mlp=1536, vocab=49_152, tokenizer_records=None, tie_embeddings=True
)
SHAPES = {"0.4b": FULL, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}


# ---------------------------------------------------------------- output plumbing


def say(message: str) -> None:
    """One progress line on the console (library output goes to the work dir's log)."""
    print(f"[bench] {message}", flush=True)


@contextlib.contextmanager
def captured(log_path: Path) -> Iterator[None]:
    """Send what is written to file descriptors 1 and 2 (print, logging, C libraries) to ``log_path`` meanwhile.

    Descriptor-level only: loggers that libraries bind to ``sys.stderr`` at import keep a stream that
    stays valid after this block (a Python-level redirect would leave them writing to a closed file).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with log_path.open("a") as log:
        saved = []
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(log.fileno(), fd)
        except OSError:  # no real descriptors (an embedding host): no capture
            pass
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _version(dist: str, module: str | None = None) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(module or dist), "__version__", "unknown")
    except Exception:
        return None


def versions() -> dict[str, Any]:
    import torch

    found = {
        "python": host.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "ray": _version("ray"),
        "deepspeed": _version("deepspeed"),
        "trl": _version("trl"),
        "datasets": _version("datasets"),
        "accelerate": _version("accelerate"),
        "rayalign": _version("rayalign") or "source tree",
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return found


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device, "host": host.node(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=torch.cuda.get_device_name(0),
            count=torch.cuda.device_count(),
            total_memory_gib=round(props.total_memory / 2**30, 2),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        name = host.processor() or host.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info["name"] = name
    return info


# ---------------------------------------------------------------- model, tokenizer, data


def read_records(path: Path) -> list[str]:
    """Non-blank lines, as rayalign's JSONL reader yields them (``data.limit`` counts these)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def train_tokenizer(records: list[str], vocab_size: int):
    """A byte-level BPE trained on the transcripts, wrapped as a PreTrainedTokenizerFast (BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def texts() -> Iterator[str]:
        for record in records:
            obj = json.loads(record)
            for key in ("chosen", "rejected"):
                if isinstance(obj.get(key), str):
                    yield obj[key]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_model_dir(spec: ModelSpec, dtype: str, data: Path, max_positions: int, root: Path) -> Path:
    """A Hugging Face directory (weights + tokenizer), built once per spec/dtype/data file and reused."""
    key = hashlib.sha256(
        json.dumps([asdict(spec), dtype, str(data), data.stat().st_size, max_positions], sort_keys=True).encode()
    ).hexdigest()[:12]
    out = root / f"llama-{spec.layers}x{spec.hidden}-v{spec.vocab}-{dtype}-{key}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    records = read_records(data)
    tokenizer = train_tokenizer(records[: spec.tokenizer_records], spec.vocab)
    config = LlamaConfig(
        # The HH text alone yields fewer BPE merges than the full model's 32,000 ids (about 24k): the
        # embedding and LM head keep the spec'd size, as a padded vocabulary does; the top ids go unused.
        vocab_size=max(spec.vocab, len(tokenizer)),
        hidden_size=spec.hidden,
        intermediate_size=spec.mlp,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # a half-written directory is never reused
    return out


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """Total and non-embedding parameters: the input embedding (a lookup) excluded, the LM head (a matmul)
    counted, also when it shares the embedding's weight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_embedding = total - embedding.numel() + (head.numel() if head is embedding else 0)
    return {
        "total": total,
        "input_embedding": embedding.numel(),
        "non_embedding": non_embedding,
        "vocab": config.vocab_size,
        "tied_embeddings": head is embedding,
    }


@dataclass
class Pairs:
    """Tokenized pairs (in file order) and how many records rayalign must read to get exactly them."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    records_read: int  # data.limit for rayalign
    quarantined: dict[str, int]
    truncated: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def columns(self, start: int, stop: int) -> dict[str, list[list[int]]]:
        from rayalign.schema import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS

        return {
            PROMPT_IDS: self.prompt_ids[start:stop],
            CHOSEN_IDS: self.chosen_ids[start:stop],
            REJECTED_IDS: self.rejected_ids[start:stop],
        }

    def real_tokens(self, start: int = 0, stop: int | None = None) -> int:
        stop = len(self) if stop is None else stop
        return sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(self.prompt_ids[start:stop], self.chosen_ids[start:stop], self.rejected_ids[start:stop])
        )


def select_pairs(records: list[str], count: int, tokenizer, data_cfg) -> Pairs:
    """The first ``count`` usable pairs, tokenized exactly as rayalign's data stage does."""
    from rayalign.data.parsing import RecordError, parse_record
    from rayalign.data.tokenizing import tokenize_pair

    pairs = Pairs([], [], [], 0, {}, 0)
    for index, record in enumerate(records):
        if len(pairs) == count:
            break
        pairs.records_read = index + 1
        try:
            prompt, chosen, rejected, truncated = tokenize_pair(parse_record(record, "hh"), tokenizer, data_cfg)
        except RecordError as err:
            pairs.quarantined[err.reason] = pairs.quarantined.get(err.reason, 0) + 1
            continue
        pairs.prompt_ids.append(list(prompt))
        pairs.chosen_ids.append(list(chosen))
        pairs.rejected_ids.append(list(rejected))
        pairs.truncated += bool(truncated)
    if len(pairs) < count:
        raise SystemExit(f"the data file has only {len(pairs)} usable pairs; {count} needed (lower --steps)")
    return pairs


# ---------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def fresh_memory(device: str) -> None:
    """Free what the previous contender left and restart the peak-memory counter."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def measure_peak_flops(device: str, dtype_name: str) -> dict[str, Any]:
    """Dense matmul FLOP/s: the denominator of MFU, measured on this machine in this run (best of 5)."""
    import torch

    dtype = getattr(torch, dtype_name)
    n, min_s = (8192, 0.5) if device == "cuda" else (1024, 0.1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best, iters = 0.0, 0
    for _ in range(5):
        sync(device)
        start, iters = time.perf_counter(), 0
        while True:  # enough matmuls per timing that the clock and launches do not count
            for _ in range(10):
                torch.matmul(a, b, out=c)
            iters += 10
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = max(best, 2 * n**3 * iters / elapsed)
    del a, b, c
    return {
        "flops_per_s": best,
        "tflops": round(best / 1e12, 3),
        "how": f"{dtype_name} {n}x{n} matmul on {device}, best of 5 timings of >= {min_s} s",
    }


def steady(
    step_ends: list[float], start: float, step_pairs: list[int], step_tokens: list[int], warmup: int
) -> dict[str, Any]:
    """Rates over the steps after ``warmup``; ``step_ends[i]`` is when step i+1 ended, ``start`` when step 1 began."""
    if len(step_ends) <= warmup:
        raise RuntimeError(f"only {len(step_ends)} steps ran; more than --warmup={warmup} are needed")
    t0 = step_ends[warmup - 1] if warmup else start
    elapsed = step_ends[-1] - t0
    pairs, tokens = sum(step_pairs[warmup:]), sum(step_tokens[warmup:])
    return {
        "pairs_per_s": pairs / elapsed,
        "real_tokens_per_s": tokens / elapsed,
        "measured_steps": len(step_ends) - warmup,
        "measured_pairs": pairs,
        "measured_real_tokens": tokens,
        "measured_s": elapsed,
        "real_tokens_per_pair": tokens / pairs,
        "steps": len(step_ends),
        "data_pairs": sum(step_pairs),
        "data_real_tokens_per_pair": sum(step_tokens) / sum(step_pairs),
    }


# ---------------------------------------------------------------- contenders


@dataclass
class Setting:
    """One micro-batch size: everything a contender needs."""

    device: str
    dtype: str
    micro_batch: int
    steps: int
    warmup: int
    lr: float
    beta: float
    max_grad_norm: float
    max_length: int
    max_prompt_length: int
    model_dir: Path
    data: Path
    pairs: Pairs
    work: Path
    trl_gradient_checkpointing: bool
    rayalign_overrides: tuple[str, ...] = ()  # KEY=VALUE settings of rayalign's config, as --set takes them

    def step_slices(self) -> list[tuple[int, int]]:
        return [(i * self.micro_batch, (i + 1) * self.micro_batch) for i in range(self.steps)]


class RowWatcher(threading.Thread):
    """Notes the wall-clock time at which each step's row appears in rayalign's ``metrics.jsonl``.

    rank 0 appends a row after the metrics' all-reduce has synchronised with the device, so the time a
    row appears is a synchronised step end, as the other contenders' are. rayalign's own ``pairs/s`` is
    not: its interval ends at a ``time.perf_counter()`` read before that synchronisation, and the next
    one starts after it, so device work still queued when a step is logged falls in no interval.
    """

    def __init__(self, path: Path, poll_s: float) -> None:
        super().__init__(daemon=True, name="bench-metrics-watcher")
        self.path, self.poll_s = path, poll_s
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        offset, pending = 0, b""
        while not self.done.is_set():
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < offset:  # rewritten (the driver copies it back from the last checkpoint): keep first times
                offset, pending = 0, b""
            if size > offset:
                with self.path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read(size - offset)
                now = time.perf_counter()
                offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.seen.setdefault(int(json.loads(line)["step"]), now)
            time.sleep(self.poll_s)

    def stop(self) -> dict[int, float]:
        self.done.set()
        self.join(timeout=5)
        return dict(self.seen)


def run_rayalign(s: Setting, variant: str = "rayalign") -> dict[str, Any]:
    from rayalign.config import config_from_dict
    from rayalign.pipeline import run_train
    from rayalign.storage import read_jsonl

    cuda = s.device == "cuda"
    tree = {
        # dtype given explicitly (not "auto"): the same precision as the other contenders.
        "model": {"path": str(s.model_dir), "dtype": s.dtype},
        "data": {
            "paths": [str(s.data)],
            "format": "hh",
            "max_length": s.max_length,
            "max_prompt_length": s.max_prompt_length,
            "limit": s.pairs.records_read,
            "shuffle": False,
        },
        "reference": {
            "backend": "transformers",
            "cache": True,
            # The cache key does not include data.limit: one root per record count, so a run never
            # reads pairs cached from a different number of records.
            "cache_root": str(s.work / "refcache" / f"limit-{s.pairs.records_read}"),
            "batch_size": s.micro_batch,
            # A fraction, so the (finished) reference actor and the train worker fit on one GPU whatever
            # the order Ray releases them in.
            "gpus_per_actor": 0.25 if cuda else 0.0,
        },
        "loss": {"type": "dpo", "beta": s.beta},
        "train": {
            "epochs": 1,
            "micro_batch_size": s.micro_batch,
            "max_steps": s.steps,
            "learning_rate": s.lr,
            "max_grad_norm": s.max_grad_norm,
            "scheduler": "constant",
            "log_every": 1,
            "zero_stage": 2,
        },
        "scaling": {
            "num_workers": 1,
            "use_gpu": cuda,  # CPUs per worker: rayalign's default (auto: the node's CPUs, threads to match)
            **({"gpus_per_worker": 0.75} if cuda else {}),
        },
        # A bench run replaces the same contender's run of an earlier bench invocation.
        "output": {
            "root": str(s.work / "runs"),
            "name": f"{variant}-mb{s.micro_batch}".replace("_", "-"),
            "if_exists": "replace",
        },
    }
    overrides = [*RAYALIGN_VARIANTS[variant], *s.rayalign_overrides]
    cfg = config_from_dict(tree, overrides, origin="bench/gpu_throughput.py")
    (cfg.output.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # rows of an earlier bench run
    watcher = RowWatcher(cfg.output.run_dir / "metrics.jsonl", poll_s=0.002 if cuda else 0.01)
    started = time.perf_counter()
    watcher.start()
    try:
        summary = run_train(cfg)
    finally:
        appeared = watcher.stop()
    wall = time.perf_counter() - started
    rows = read_jsonl(Path(summary["files"]["run_dir"]) / "metrics.jsonl")
    rows = [r for r in rows if "pairs/s" in r]
    if [r["step"] for r in rows] != list(range(1, len(rows) + 1)):
        raise RuntimeError(f"expected one metrics row per step, got steps {[r['step'] for r in rows]}")
    # Each row covers the interval since the previous one (log_every: 1, one worker, no accumulation):
    # its elapsed time is pairs / pairs/s, its tokens tokens/s × elapsed.
    step_pairs = [s.micro_batch * cfg.scaling.num_workers] * len(rows)
    elapsed = [p / r["pairs/s"] for p, r in zip(step_pairs, rows)]
    # Real tokens as every contender counts them: prompt+chosen plus prompt+rejected of the step's pairs (the
    # same pairs, in file order). rayalign's own tokens/s counts what it computes: with its default
    # shared-prompt layout each prompt once, so fewer tokens for the same work; kept beside, as computed.
    step_tokens = [s.pairs.real_tokens(a, b) for a, b in s.step_slices()][: len(rows)]
    computed_tokens = [round(r["tokens/s"] * e) for r, e in zip(rows, elapsed)]  # whole tokens, up to float error
    ends, t = [], 0.0
    for e in elapsed:
        t += e
        ends.append(t)
    from_metrics = steady(ends, 0.0, step_pairs, step_tokens, s.warmup)
    if sorted(appeared) == [r["step"] for r in rows]:
        # Same rows, timed from outside when each appeared (a synchronised step end, like the others').
        observed = [appeared[r["step"]] for r in rows]
        result = steady(observed, observed[0] - elapsed[0], step_pairs, step_tokens, s.warmup)
        result["timing"] = "wall-clock at which each step's metrics.jsonl row appeared (synchronised step ends)"
    else:
        result = dict(from_metrics)
        result["timing"] = "metrics.jsonl pairs/s and tokens/s (rows were not all seen as they appeared)"
    result["from_metrics_jsonl"] = {
        key: from_metrics[key] for key in ("pairs_per_s", "real_tokens_per_s", "measured_s")
    }
    result["computed_tokens_per_pair"] = sum(computed_tokens) / sum(step_pairs)  # what the layout computed
    result["layout"] = summary.get("preflight", {}).get("layout")
    result["settings"] = overrides
    peaks = [r["memory/peak_allocated_gib"] for r in rows if "memory/peak_allocated_gib" in r]
    result.update(
        peak_memory_gib=max(peaks) if peaks else None,
        peak_memory_how=(
            "max of metrics.jsonl memory/peak_allocated_gib (torch.cuda.max_memory_allocated of rank 0, GiB)"
            if peaks
            else ("not measured on CPU" if not cuda else "metrics.jsonl has no memory/peak_allocated_gib")
        ),
        wall_s=wall,
        loss_first=rows[0]["loss"],
        loss_last=rows[-1]["loss"],
        data_ok=summary["data"]["ok"],
        reference_cache=summary.get("reference", {}).get("cache"),
        run_dir=summary["files"]["run_dir"],
        precision=(
            "model loaded in bfloat16, DeepSpeed bf16 on (ZeRO keeps fp32 master weights and Adam states)"
            if s.dtype == "bfloat16"
            else f"model in {s.dtype}"
        )
        + "; full-vocabulary logits, log-probs in float32; torch AdamW (foreach) under DeepSpeed ZeRO-2",
    )
    if summary["data"]["ok"] != len(s.pairs):
        raise RuntimeError(f"rayalign kept {summary['data']['ok']} pairs, the bench tokenized {len(s.pairs)}")
    return result


def bare_sequence_logps(model, pairs):
    """What a plain loop does: full float32 logits of every position, then the response tokens' log-probs summed
    per sequence (chosen rows, then rejected)."""
    import torch

    logits = model(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask, use_cache=False).logits
    logps = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    per_token = logps[pairs.predictor, pairs.target]
    return torch.zeros(pairs.counts.shape[0], device=logits.device).index_add(0, pairs.sequence, per_token), None


def run_bare(s: Setting) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from rayalign.logprobs import split_pairs
    from rayalign.models import load_causal_lm, load_tokenizer
    from rayalign.packing import pack_pairs

    device = torch.device(s.device)
    pad_id = load_tokenizer(s.model_dir).pad_token_id
    batches = [pack_pairs(s.pairs.columns(a, b), "padded", pad_id) for a, b in s.step_slices()]
    fresh_memory(s.device)
    started = time.perf_counter()
    model = load_causal_lm(s.model_dir, s.dtype).to(device)
    model.eval()
    with torch.inference_mode():  # the reference = the starting weights, scored before the timed loop
        refs = [split_pairs(bare_sequence_logps(model, b.to(device))[0]) for b in batches]
    refs = [(c.clone(), r.clone()) for c, r in refs]  # out of inference mode
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, ends, step_tokens = [], [], []
    sync(s.device)
    start = time.perf_counter()
    for batch, (ref_chosen, ref_rejected) in zip(batches, refs):
        step_tokens.append(batch.real_tokens)
        batch = batch.to(device)
        logps, _ = bare_sequence_logps(model, batch)
        chosen, rejected = split_pairs(logps)
        loss = -F.logsigmoid(s.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        sync(s.device)
        ends.append(time.perf_counter())
    result = steady(ends, start, [s.micro_batch] * len(ends), step_tokens, s.warmup)
    result.update(
        peak_memory_gib=peak_memory_gib(s.device),
        peak_memory_how="torch.cuda.max_memory_allocated of this process, from model load to the last step"
        if s.device == "cuda"
        else "not measured on CPU",
        wall_s=time.perf_counter() - started,
        loss_first=float(losses[0]),
        loss_last=float(losses[-1]),
        precision=f"model in {s.dtype} (no fp32 master weights), full-vocabulary logits, "
        "log-probs in float32; torch AdamW fused",
    )
    del model, optimizer, params, refs, batches, losses
    fresh_memory(s.device)
    return result


def run_trl(s: Setting, precompute: bool) -> dict[str, Any]:
    import dataclasses

    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rayalign.models import load_causal_lm, load_tokenizer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on the bench's token ids, in the bench's order.

        TRL 1.16's DPOTrainer always re-tokenizes from text (its ``_prepare_dataset`` has no skip, unlike
        SFT's ``dataset_kwargs.skip_prepare_dataset``), and its collator takes exactly the columns
        ``prompt_ids``/``chosen_ids``/``rejected_ids``; so the dataset is passed through as given.
        """

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            dataset = args[0] if args else kwargs.get("train_dataset")
            return SequentialSampler(dataset if dataset is not None else self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.ends = None, []

        def on_train_begin(self, args, state, control, **kwargs):
            sync(s.device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(s.device)
            self.ends.append(time.perf_counter())

    class CountingCollator:
        """Counts the real (attention-mask) tokens of every batch the trainer is given."""

        def __init__(self, inner) -> None:
            self.inner, self.tokens = inner, []

        def __call__(self, examples):
            batch = self.inner(examples)
            self.tokens.append(int(batch["attention_mask"].sum()))
            return batch

    name = "trl_precomputed_ref" if precompute else "trl"
    dataset = datasets.Dataset.from_dict(s.pairs.columns(0, len(s.pairs)))
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    options = dict(
        output_dir=str(s.work / "trl" / f"{name}-mb{s.micro_batch}"),
        per_device_train_batch_size=s.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=s.steps,
        num_train_epochs=1,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=s.max_grad_norm,
        beta=s.beta,
        loss_type=["sigmoid"],
        max_length=s.max_length,  # TRL 1.16 has no max_prompt_length: the pairs arrive already truncated
        truncation_mode="keep_start",
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=s.micro_batch,
        bf16=s.dtype == "bfloat16",
        fp16=False,
        # TRL turns activation checkpointing on by default; rayalign and the bare loop keep all activations.
        gradient_checkpointing=s.trl_gradient_checkpointing,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        use_cpu=s.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    if "train_sampling_strategy" in fields:  # transformers >= 5.x; the sampler override covers older ones
        options["train_sampling_strategy"] = "sequential"
    args = DPOConfig(**options)

    tokenizer = load_tokenizer(s.model_dir)
    fresh_memory(s.device)
    started = time.perf_counter()
    model = load_causal_lm(s.model_dir, s.dtype)
    timer = StepTimer()
    trainer = PretokenizedDPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    setup_s = time.perf_counter() - started  # model load, reference model or precompute pass
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if len(counter.tokens) != s.steps:
        raise RuntimeError(f"TRL collated {len(counter.tokens)} batches for {s.steps} steps")
    result = steady(timer.ends, timer.start, [s.micro_batch] * len(timer.ends), counter.tokens, s.warmup)
    result.update(
        peak_memory_gib=peak_memory_gib(s.device),
        peak_memory_how="torch.cuda.max_memory_allocated of this process, from model load (and the reference "
        "precompute pass) to the last step"
        if s.device == "cuda"
        else "not measured on CPU",
        wall_s=time.perf_counter() - started,
        setup_s=setup_s,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        optim=str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        gradient_checkpointing=bool(trainer.args.gradient_checkpointing),
        precision=(
            "model in bfloat16 with bf16 autocast (no fp32 master weights)" if args.bf16 else f"model in {s.dtype}"
        )
        + "; TRL's fused LM head (log-probs in chunks, no full logits); "
        + str(getattr(trainer.args.optim, "value", trainer.args.optim)),
    )
    trainer.accelerator.free_memory()
    del trainer, model, timer, counter
    fresh_memory(s.device)
    return result


def trl_missing() -> str | None:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- report


def add_derived(contenders: dict[str, dict[str, Any]], non_embedding: int, peak_flops: float | None) -> dict[str, Any]:
    for result in contenders.values():
        if result.get("status") == "ok" and peak_flops:
            result["mfu_real_tokens"] = 6 * non_embedding * result["real_tokens_per_s"] / peak_flops
    ratios = {}
    ours = contenders.get("rayalign", {})
    for other in contenders:
        if other == "rayalign":
            continue
        theirs = contenders.get(other, {})
        if ours.get("status") == "ok" and theirs.get("status") == "ok":
            ratios[f"rayalign/{other}"] = ours["pairs_per_s"] / theirs["pairs_per_s"]
    return ratios


def table(results: list[dict[str, Any]], peak: dict[str, Any] | None, device: dict[str, Any]) -> str:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    lines = [
        "| micro-batch | contender | pairs/s | real tokens/s | MFU (real tokens) | peak GiB | rayalign ÷ this |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for block in results:
        for name, r in block["contenders"].items():
            if r.get("status") != "ok":
                why = "not installed (make install-bench)" if "install" in r else r.get("reason", "")[:80]
                lines.append(f"| {block['micro_batch']} | {name} | {r.get('status')}: {why} | | | | |")
                continue
            ratio = 1.0 if name == "rayalign" else block["ratios"].get(f"rayalign/{name}")
            mfu = r.get("mfu_real_tokens")
            lines.append(
                f"| {block['micro_batch']} | {name} | {num(r['pairs_per_s'], '.2f')} "
                f"| {num(r['real_tokens_per_s'], ',.0f')} "
                f"| {num(mfu if mfu is None else 100 * mfu, '.2f')}% "
                f"| {num(r.get('peak_memory_gib'), '.2f')} | {num(ratio, '.2f')} |"
            )
    peak_text = f"{peak['tflops']} TFLOP/s ({peak['how']})" if peak else "not measured"
    lines.append("")
    lines.append(f"{device.get('name')} ({device['type']}); measured peak {peak_text}.")
    return "\n".join(lines)


def write_result(out: Path, report: dict[str, Any]) -> Path:
    """Write ``report``; a CPU run never replaces a GPU result (it goes beside it as ``*-cpu.json``)."""
    if report["device"]["type"] != "cuda" and out.is_file():
        try:
            existing = json.loads(out.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("device", {}).get("type") == "cuda":
            out = out.with_name(out.stem + "-cpu" + out.suffix)
            say(f"{report['out_requested']} holds a GPU result: writing this CPU run to {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    report["out"] = str(out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CI-sized: tiny model, few pairs and steps, float32")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="model shape (random init): 0.4b (default), smollm2-135m, tiny (--tiny's)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--work-dir", default=None, help="models, runs, caches, logs (default: runs/gpu-bench[-tiny])")
    parser.add_argument("--data", default=str(HH))
    parser.add_argument("--micro-batches", default=None, help="comma-separated pairs per micro-batch (16,64; tiny: 8)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per contender, warm-up included (30; tiny: 6)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="first steps not measured (5; tiny: 2)")
    parser.add_argument("--max-length", type=int, default=None, help="512; tiny: 128")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="256; tiny: 64")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="cuda: bfloat16; cpu: float32")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"any of {','.join(KNOWN_CONTENDERS)} (default: {','.join(CONTENDERS)})",
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL's own default; off here because rayalign and the bare loop keep all activations",
    )
    parser.add_argument(
        "--rayalign-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of rayalign's config, as `rayalign train --set` takes it (repeatable), e.g. "
        "model.attn_implementation=flex_attention or train.tokens_per_batch=16384",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    tiny = args.tiny
    args.micro_batches = [int(x) for x in (args.micro_batches or ("8" if tiny else "16,64")).split(",") if x.strip()]
    args.steps = args.steps or (6 if tiny else 30)
    args.warmup = (2 if tiny else 5) if args.warmup is None else args.warmup
    args.max_length = args.max_length or (128 if tiny else 512)
    args.max_prompt_length = args.max_prompt_length or (64 if tiny else 256)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(KNOWN_CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(KNOWN_CONTENDERS)}")
    args.shape = args.shape or ("tiny" if tiny else "0.4b")
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be smaller than --steps")
    args.work_dir = Path(args.work_dir or REPO / "runs" / ("gpu-bench-tiny" if tiny else "gpu-bench")).resolve()
    return args


@contextlib.contextmanager
def quiet_environment(device: str) -> Iterator[None]:
    """Library settings that keep the console to the bench's own lines (and no hub access); the
    environment and Ray Data's progress-bar setting are put back afterwards (main() may run in a test)."""
    settings = {
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        # Ray Train's controller polls workers every 2 s by default; a short run waits on it at the end.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        **({"DS_ACCELERATOR": "cpu"} if device == "cpu" else {}),
    }
    before = {key: os.environ.get(key) for key in settings}
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    from ray.data import DataContext

    context = DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        yield
    finally:
        context.enable_progress_bars = progress_bars
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        say(
            "no GPU here (torch.cuda.is_available() is False): nothing measured, nothing written. "
            "Run with --device cpu --tiny for the CPU form."
        )
        return 0
    with quiet_environment(args.device):
        return _run(args)


@dataclass
class Prepared:
    """What every micro-batch setting shares: the model directory, its tokenizer, the records."""

    spec: ModelSpec
    model_dir: Path
    counts: dict[str, int]
    tokenizer: Any
    data_cfg: Any  # rayalign.config.DataConfig
    records: list[str]
    data: Path
    work: Path
    log: Path
    started: float


def _run(args: argparse.Namespace) -> int:
    import ray

    work, data = args.work_dir, Path(args.data).resolve()
    log = work / "bench.log"
    if not data.is_file():
        raise SystemExit(f"data file not found: {data} (see ../shared/data/README.md)")
    spec = SHAPES[args.shape]
    say(f"{'tiny ' if args.tiny else ''}run on {args.device} ({args.dtype}); library output -> {log}")

    started = time.perf_counter()
    with captured(log):
        from rayalign.config import DataConfig
        from rayalign.models import load_tokenizer

        model_dir = build_model_dir(spec, args.dtype, data, max(1024, args.max_length), work / "models")
        prep = Prepared(
            spec=spec,
            model_dir=model_dir,
            counts=parameter_counts(model_dir),
            tokenizer=load_tokenizer(model_dir),
            data_cfg=DataConfig(
                paths=[str(data)], format="hh", max_length=args.max_length, max_prompt_length=args.max_prompt_length
            ),
            records=read_records(data),
            data=data,
            work=work,
            log=log,
            started=started,
        )
    say(
        f"model {model_dir.name}: {prep.counts['non_embedding'] / 1e6:.1f} M non-embedding parameters, "
        f"vocab {prep.counts['vocab']} (tokenizer {len(prep.tokenizer)}) ({time.perf_counter() - started:.0f} s)"
    )

    started_ray = not ray.is_initialized()
    if started_ray:  # else: reuse the caller's cluster (a test's)
        with captured(log):
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    # The peak first: a run stopped from outside (make gpu-check's budget) still has its denominator.
    peak = None
    try:
        with captured(log):
            fresh_memory(args.device)
            peak = measure_peak_flops(args.device, args.dtype)
        say(f"measured peak: {peak['tflops']} TFLOP/s ({peak['how']})")
    except Exception as exc:
        say(f"peak FLOP/s not measured: {type(exc).__name__}: {exc}")
    results: list[dict[str, Any]] = []

    def with_ratios(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for block in blocks:
            block["ratios"] = add_derived(
                block["contenders"], prep.counts["non_embedding"], peak and peak["flops_per_s"]
            )
        return blocks

    def keep_so_far(block: dict[str, Any]) -> None:
        """After each contender, the report so far: a run stopped from outside keeps what it measured."""
        write_result(Path(args.out), build_report(args, prep, with_ratios([*results, block]), peak, partial=True))

    try:
        for micro_batch in args.micro_batches:
            results.append(measure_setting(args, prep, micro_batch, keep_so_far))
    finally:
        if started_ray:
            with captured(log):
                ray.shutdown()

    report = build_report(args, prep, with_ratios(results), peak)
    out = write_result(Path(args.out), report)
    print(report["table"], flush=True)
    say(f"wrote {out} ({report['wall_s']:.0f} s)")
    return 0 if report["status"] == "ok" else 1


def measure_setting(
    args: argparse.Namespace,
    prep: Prepared,
    micro_batch: int,
    keep_so_far: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every contender at one micro-batch size, on the same pairs; ``keep_so_far`` gets the block after each."""
    pairs = select_pairs(prep.records, micro_batch * args.steps, prep.tokenizer, prep.data_cfg)
    padded = 0
    for a in range(0, len(pairs), micro_batch):
        cols = pairs.columns(a, a + micro_batch)
        width = max(len(p) + max(len(c), len(r)) for p, c, r in zip(*cols.values()))
        padded += 2 * len(pairs.prompt_ids[a : a + micro_batch]) * width
    setting = Setting(
        device=args.device,
        dtype=args.dtype,
        micro_batch=micro_batch,
        steps=args.steps,
        warmup=args.warmup,
        lr=args.lr,
        beta=args.beta,
        max_grad_norm=1.0,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        model_dir=prep.model_dir,
        data=prep.data,
        pairs=pairs,
        work=prep.work,
        trl_gradient_checkpointing=args.trl_gradient_checkpointing,
        rayalign_overrides=tuple(args.rayalign_set),
    )
    say(
        f"micro-batch {micro_batch}: {len(pairs)} pairs from the first {pairs.records_read} records "
        f"({sum(pairs.quarantined.values())} quarantined), {pairs.real_tokens() / len(pairs):.1f} real tokens/pair, "
        f"{1 - pairs.real_tokens() / padded:.0%} of the padded batches is padding"
    )
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        **{variant: (lambda v=variant: run_rayalign(setting, v)) for variant in RAYALIGN_VARIANTS},
        "bare": lambda: run_bare(setting),
        "trl_precomputed_ref": lambda: run_trl(setting, precompute=True),
        "trl": lambda: run_trl(setting, precompute=False),
    }
    missing_trl = trl_missing()
    contenders: dict[str, dict[str, Any]] = {}

    def block(done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return _setting_block(micro_batch, pairs, padded, dict(done))

    for name in args.contenders:
        if name.startswith("trl") and missing_trl:
            contenders[name] = {
                "status": "skipped",
                "reason": f"trl is not importable ({missing_trl})",
                "install": TRL_INSTALL,
            }
            say(f"  {name}: skipped, trl is not installed ({TRL_INSTALL})")
            continue
        t0 = time.perf_counter()
        try:
            with captured(prep.log):
                print(f"\n===== {name}, micro-batch {micro_batch} =====", flush=True)
                result = {"status": "ok", **runners[name]()}
        except Exception as exc:  # one contender failing must not lose the others' numbers
            with captured(prep.log):
                traceback.print_exc()
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000], "log": str(prep.log)}
            with contextlib.suppress(Exception):  # a CUDA error may make this fail too
                fresh_memory(args.device)
            say(f"  {name}: FAILED after {time.perf_counter() - t0:.0f} s: {result['reason'][:200]} (see {prep.log})")
        else:
            memory = f", peak {result['peak_memory_gib']:.2f} GiB" if result.get("peak_memory_gib") else ""
            say(
                f"  {name}: {result['pairs_per_s']:.2f} pairs/s, {result['real_tokens_per_s']:,.0f} real tokens/s"
                f"{memory} ({time.perf_counter() - t0:.0f} s)"
            )
        contenders[name] = result
        if keep_so_far is not None:
            keep_so_far(block(contenders))
    return block(contenders)


def _setting_block(micro_batch: int, pairs: Pairs, padded: int, contenders: dict[str, Any]) -> dict[str, Any]:
    return {
        "micro_batch": micro_batch,
        "pairs": len(pairs),
        "records_read": pairs.records_read,
        "quarantined": pairs.quarantined,
        "truncated_pairs": pairs.truncated,
        "real_tokens_per_pair": pairs.real_tokens() / len(pairs),
        "padding_share_in_file_order": 1 - pairs.real_tokens() / padded,
        "contenders": contenders,
    }


def build_report(
    args: argparse.Namespace, prep: Prepared, results: list[dict[str, Any]], peak: dict | None, partial: bool = False
) -> dict[str, Any]:
    """The whole report; ``partial``: written after a contender, more to come (status "partial")."""
    cuda = args.device == "cuda"
    device = device_info(args.device)
    failed = any(r.get("status") == "failed" for block in results for r in block["contenders"].values())
    report = {
        "benchmark": "bench/gpu_throughput.py",
        "status": "failed" if failed else ("partial" if partial else "ok"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, "bench/gpu_throughput.py", *args.argv],
        "device": device,
        "versions": versions(),
        "settings": {
            "tiny": args.tiny,
            "shape": args.shape,
            "model": {
                **asdict(prep.spec),
                "architecture": "LlamaForCausalLM, random init, "
                + ("LM head tied to the input embedding" if prep.spec.tie_embeddings else "untied LM head"),
                "dir": str(prep.model_dir),
                "parameters": prep.counts,
                "tokenizer": f"byte-level BPE trained on the data file's transcripts, {len(prep.tokenizer)} ids "
                "(<pad>, <bos>, <eos>; BOS prepended to prompts, EOS ends responses)",
            },
            "dtype": args.dtype,
            "rayalign_overrides": args.rayalign_set,
            "data": {
                "path": str(prep.data),
                "format": "hh",
                "max_length": args.max_length,
                "max_prompt_length": args.max_prompt_length,
                "truncation": prep.data_cfg.truncation,
                "order": "file order, no shuffle (rayalign: data.shuffle false)",
                "tokenized_by": "rayalign.data.parsing.parse_record + tokenizing.tokenize_pair, once; "
                "every contender computes on these ids",
            },
            "micro_batches": args.micro_batches,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "optimizer": {
                "type": "AdamW",
                "lr": args.lr,
                "betas": [0.9, 0.999],
                "weight_decay": 0.0,
                "schedule": "constant",
                "max_grad_norm": 1.0,
            },
            "loss": {"type": "dpo (sigmoid)", "beta": args.beta},
            "rayalign": {
                "num_workers": 1,
                "zero_stage": 2,
                "log_every": 1,
                "reference": "transformers backend, cached (reference.cache: true), scored before training",
                "gpus_per_worker": 0.75 if cuda else None,
                "reference_gpus_per_actor": 0.25 if cuda else None,
            },
            "trl": {
                "given": "the same pre-tokenized prompt_ids/chosen_ids/rejected_ids, in the same order (sequential "
                "sampler); DPOTrainer._prepare_dataset is bypassed because TRL 1.16 always re-tokenizes from text",
                "max_length": args.max_length,
                "max_prompt_length": "no such DPOConfig field in TRL 1.16; pairs arrive truncated by rayalign's rule",
                "gradient_checkpointing": args.trl_gradient_checkpointing,
                "variants": {
                    "trl_precomputed_ref": "precompute_ref_log_probs=True (no reference model in memory)",
                    "trl": "precompute_ref_log_probs=False (reference model forward every step)",
                },
            },
            "bare": "rayalign.packing padded batches, full float32 logits; "
            "reference log-probs scored before the timed loop; "
            "policy forward of chosen+rejected concatenated; -logsigmoid(beta*margin); clip 1.0; fused AdamW",
            "real_tokens": "non-padding tokens computed on: prompt+chosen plus prompt+rejected per pair",
            "mfu": "6 x non-embedding parameters x real tokens/s / measured peak FLOP/s",
        },
        "peak_flops": peak,
        "results": results,
        "wall_s": round(time.perf_counter() - prep.started, 1),
        "out_requested": args.out,
        "log": str(prep.log),
    }
    report["table"] = table(results, peak, device)
    return report


if __name__ == "__main__":
    sys.exit(main())
