"""The training loop on a device that is not the CPU, without a GPU.

The GPU path once crashed at its first logging step: the metrics were summed on the CPU and
handed to an NCCL all-reduce, which takes CUDA tensors only, while every CPU test passed. Here
the loop's helpers run on PyTorch's ``meta`` device (shapes and dtypes, no data) under a
stand-in for NCCL's all-reduce that, like NCCL, refuses a tensor that is not on the worker's
own device. A CPU tensor or a host read (``.item()``, ``float()``) anywhere in the hot path
fails here as it would on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rayalign.config import LossConfig, TrainConfig, config_from_dict
from rayalign.cpus import NodeResources, resolve_auto_cpus
from rayalign.distributed import Collective, backend_device
from rayalign.logprobs import PolicyLogps
from rayalign.losses import ObjectiveTerms
from rayalign.runtime import ClusterResourceError, ResourceDemand, Workload, check_resources
from rayalign.train.deepspeed_settings import deepspeed_config
from rayalign.train.meter import IntervalMeter
from rayalign.train.step import PreferenceStep

META = torch.device("meta")


class ReachedCollective(Exception):
    """The stand-in stops here: a meta tensor holds no values to reduce or read back."""


@pytest.fixture
def nccl_like(monkeypatch):
    """Pretend the process group is NCCL on the ``meta`` device; record what reaches all_reduce."""
    seen: list[torch.Tensor] = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor)
        if tensor.device != META:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise ReachedCollective

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    return seen


def _meta_model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
        # transformers' SDPA mask reads the padding mask on the host to pick a fast path;
        # that is its sync, not ours, and a meta tensor has nothing to read.
        attn_implementation="eager",
    )
    with torch.device(META):
        return LlamaForCausalLM(config).to(dtype)


def _batch(num_pairs: int = 3) -> dict[str, np.ndarray]:
    """A micro-batch as Ray Data hands it to a worker: ragged id lists and float64 reference columns."""
    ragged = lambda rows: np.array(rows, dtype=object)  # noqa: E731
    return {
        "prompt_ids": ragged([[1, 5, 6], [1, 7], [1, 8, 9, 10]][:num_pairs]),
        "chosen_ids": ragged([[11, 12], [13], [14, 15, 16]][:num_pairs]),
        "rejected_ids": ragged([[17], [18, 19, 20], [21, 22]][:num_pairs]),
        "ref_chosen_logps": np.array([-3.0, -2.0, -4.0][:num_pairs], dtype=np.float64),
        "ref_rejected_logps": np.array([-2.5, -5.0, -3.0][:num_pairs], dtype=np.float64),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_metrics_reach_the_all_reduce_on_the_workers_device(nccl_like, dtype):
    model = _meta_model(dtype)
    loss_cfg = LossConfig(type="cpo", gamma=1.0, nll_weight=0.1, length_normalize=True)
    scored_batch = PreferenceStep(loss_cfg, TrainConfig(), pad_id=0, device=META).score(PolicyLogps(model), _batch())
    terms, tokens = scored_batch.terms, scored_batch.real_tokens
    per_pair, scored = terms.loss, terms.compared
    # Loss maths in float32 on the worker's device, whatever the model's dtype; float64 reference
    # columns from the actors are cast, not mixed in.
    assert per_pair.device == META and per_pair.dtype == torch.float32 and per_pair.shape == (3,)
    assert all(t.device == META and t.dtype == torch.float32 for t in scored)
    assert tokens == (3 + 2 + 1) + (2 + 1 + 3) + (4 + 3 + 2)  # real tokens: each pair [prompt | chosen | rejected]

    meter = IntervalMeter(META)
    meter.add(terms, tokens, loss_cfg.beta)
    collective = Collective.of_worker_group(META)
    with pytest.raises(ReachedCollective):
        meter.reduce(started=0.0, all_reduce=collective.all_reduce_sum)
    assert [t.device for t in nccl_like] == [META]


def test_evaluation_reaches_the_all_reduce_on_the_workers_device(nccl_like):
    model = _meta_model(torch.bfloat16)
    collective = Collective.of_worker_group(META)
    with pytest.raises(ReachedCollective):
        PreferenceStep(LossConfig(), TrainConfig(), pad_id=0, device=META).evaluate(
            PolicyLogps(model), [_batch(3), _batch(2)], collective
        )
    assert [t.device for t in nccl_like] == [META]
    assert model.training  # back in training mode after evaluating


def test_a_meter_on_the_cpu_is_refused_by_an_nccl_like_collective(nccl_like):
    """The stand-in can fail: the pre-fix loop summed metrics on the CPU and called all_reduce directly."""
    meter = IntervalMeter("cpu")
    with pytest.raises(RuntimeError, match="device type cpu"):
        meter.reduce(started=0.0, all_reduce=lambda t: dist.all_reduce(t) or t)


def test_collectives_follow_the_backend():
    cuda = torch.device("cuda", 1)
    assert backend_device("nccl", cuda) == cuda
    assert backend_device("gloo", cuda) == torch.device("cpu")
    assert backend_device("gloo", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="NCCL backend needs a CUDA device"):
        backend_device("nccl", torch.device("cpu"))


def test_meter_reduces_across_a_real_gloo_group(process_group):
    """One-process gloo group: the CPU path sums and averages through the same collective."""
    collective = Collective.of_worker_group("cpu")
    assert collective.device == torch.device("cpu")
    meter = IntervalMeter("cpu")
    compared = tuple(torch.tensor(v) for v in ([-1.0, -2.0], [-2.0, -1.0], [-1.5, -1.5], [-1.5, -1.5]))
    meter.add(ObjectiveTerms(torch.tensor([0.5, 1.5]), compared), tokens=20, beta=0.5)
    row = meter.reduce(started=0.0, all_reduce=collective.all_reduce_sum, clock=lambda: 2.0)
    assert row["loss"] == 1.0 and row["pref/absolute_accuracy"] == 0.5 and row["tokens/s"] == 10.0


def _cfg(**sections):
    tree = {"model": {"tiny": {}}, "data": {"synthetic": {}}}
    tree.update(sections)
    return config_from_dict(tree)


def test_gpu_defaults_bf16_and_the_reference_on_the_gpu():
    gpu = _cfg(scaling={"use_gpu": True, "num_workers": 1})
    assert gpu.model.dtype == "bfloat16" and gpu.reference.vllm.dtype == "bfloat16"
    assert gpu.reference.gpus_per_actor == 1.0
    assert deepspeed_config(gpu.train, gpu.model.dtype)["bf16"]["enabled"] is True
    cpu = _cfg()
    assert cpu.model.dtype == "float32" and cpu.reference.vllm.dtype == "float32"
    assert (
        cpu.reference.gpus_per_actor == 0.0 and deepspeed_config(cpu.train, cpu.model.dtype)["bf16"]["enabled"] is False
    )
    explicit = _cfg(
        model={"tiny": {}, "dtype": "float32"},
        scaling={"use_gpu": True, "num_workers": 1},
        reference={"vllm": {"dtype": "auto"}},
    )
    assert explicit.model.dtype == "float32" and explicit.reference.vllm.dtype == "auto"
    # The resolved values are what config.yaml records, and reading it back gives the same run.
    assert config_from_dict(gpu.model_dump()).model_dump() == gpu.model_dump()


GPU_NODE = NodeResources(cpus=16.0, gpus=1.0)


def demand_of(cfg, node=GPU_NODE, **workload) -> ResourceDemand:
    """``cfg``'s demand, its ``auto`` CPUs resolved for a cluster of one ``node``."""
    resolve_auto_cpus(cfg, [node])
    return ResourceDemand.of_run(cfg, Workload(**workload))


def test_one_gpu_shared_by_the_reference_actor_and_the_train_worker():
    shared = _cfg(
        scaling={"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.75}, reference={"gpus_per_actor": 0.25}
    )
    demand = demand_of(shared)
    assert demand.gpus == 1.0
    check_resources(demand, {"CPU": 16.0, "GPU": 1.0}, may_grow=False)


def test_asking_for_more_gpus_than_the_cluster_has_fails_before_training(caplog):
    streaming = _cfg(scaling={"use_gpu": True, "num_workers": 1})  # 1 worker + 1 reference actor, 1 GPU each
    with pytest.raises(ClusterResourceError, match=r"asks for 2 GPUs but the cluster has 1 .*gpus_per_worker: 0.75"):
        check_resources(demand_of(streaming), {"CPU": 16.0, "GPU": 1.0}, may_grow=False)
    with pytest.raises(ClusterResourceError, match="asks for 1 GPU but the cluster has 0"):
        on_cpus = _cfg(scaling={"use_gpu": True, "num_workers": 1})
        check_resources(demand_of(on_cpus, NodeResources(2.0, 0.0), reference=False), {"CPU": 2.0}, may_grow=False)
    # Scored first into the cache, the reference and the training take the GPU one after the other.
    cached = _cfg(scaling={"use_gpu": True, "num_workers": 1}, reference={"cache": True})
    check_resources(demand_of(cached), {"CPU": 16.0, "GPU": 1.0}, may_grow=False)
    # An existing cluster may autoscale once work is pending: say so, do not fail.
    with caplog.at_level("WARNING", logger="rayalign"):
        check_resources(demand_of(streaming), {"CPU": 2.0}, may_grow=True)
    assert "waiting for the cluster's autoscaler" in caplog.text


def test_fractional_gpus_for_several_nccl_workers_are_refused():
    from rayalign.config import ConfigError

    with pytest.raises(ConfigError, match="two NCCL ranks on one GPU"):
        _cfg(scaling={"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5})


def test_the_one_gpu_example_fits_one_gpu():
    from conftest import REPO

    from rayalign.config import load_config

    cfg = load_config(REPO / "jobs/configs/hh-dpo-1gpu.yaml")
    assert cfg.scaling.use_gpu and cfg.model.dtype == "bfloat16"
    check_resources(demand_of(cfg), {"CPU": 16.0, "GPU": 1.0}, may_grow=False)


@pytest.mark.e2e
def test_cli_refuses_a_gpu_run_on_a_cluster_without_gpus(ray_cluster, tmp_path, capsys):
    """On the real local cluster (2 CPUs, no GPU): one line, exit 2, before any stage starts."""
    from conftest import REPO

    from rayalign.cli import main

    code = main(
        [
            "train",
            "--config",
            str(REPO / "jobs/configs/tiny-dpo.yaml"),
            "--set",
            "scaling.use_gpu=true",
            "--set",
            "scaling.num_workers=1",
            "--set",
            f"output.root={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # before it: only the tiny model's build progress
    assert line.startswith("rayalign: error: this run asks for 2 GPUs but the cluster has 0")
    assert "scaling.use_gpu: false" in line
    assert not (tmp_path / "tiny-dpo" / "metrics.jsonl").exists()


def test_the_local_clusters_token_file_is_private(tmp_path, monkeypatch):
    from rayalign.runtime import secure_local_token

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    token = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert secure_local_token() == token  # created: 32 random bytes as hex, readable by the owner only
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    first = token.read_text()
    token.chmod(0o644)  # what Ray 2.60 leaves when it writes the file itself
    assert secure_local_token() == token and token.stat().st_mode & 0o777 == 0o600
    assert token.read_text() == first  # tightened, not replaced
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    assert secure_local_token() is None


def test_a_token_budget_agrees_its_pass_count_on_the_workers_device(nccl_like):
    """Under train.tokens_per_batch the workers agree on a step's pass count, an all-reduce of one number
    before the first forward: under NCCL that number must be a tensor on the worker's own device."""
    from rayalign.train.batching import micro_batch_groups, pair_tokens

    agree = Collective.of_worker_group(META).all_reduce_max
    with pytest.raises(ReachedCollective):
        micro_batch_groups(pair_tokens(_batch(), "shared_prompt"), 3, tokens_per_batch=16, agree=agree)
    assert [(t.device, t.dtype) for t in nccl_like] == [(META, torch.int64)]


def test_an_alarms_decision_reaches_every_rank_through_the_collective_on_the_workers_device(nccl_like):
    """Rank 0 asks to switch; the code goes through the all-reduce on the worker's device (a CUDA-only mistake
    here would hang a GPU run), and a rank that is not rank 0 takes part too."""
    from rayalign.config import MonitorConfig
    from rayalign.metrics import ALARM
    from rayalign.train.actions import AlarmResponse

    monitor = MonitorConfig(on_alarm="switch", switch_to={"type": "cpo", "gamma": 1.0})
    response = AlarmResponse(monitor, Collective.of_worker_group(META))
    for rank in (0, 1):
        with pytest.raises(ReachedCollective):
            response.agree({ALARM: "the loss fell while ..."}, rank)
    assert [t.device for t in nccl_like] == [META, META]
    # Warn only: no collective at all, so no rank waits on another at every logged step.
    assert AlarmResponse(MonitorConfig(), Collective.of_worker_group(META)).agree({ALARM: "x"}, 0) == 0
    assert len(nccl_like) == 2


def test_auto_cpus_share_a_node_among_what_runs_on_it_and_threads_follow():
    """`auto` on a 2-core node: 1 worker trains on 2 threads, 2 workers on 1 each; what runs beside them shares."""
    from rayalign.cpus import cpu_plan, torch_threads

    def plan(nodes, *settings):
        cfg = config_from_dict({"model": {"tiny": {}}, "data": {"synthetic": {}}}, list(settings))
        resolve_auto_cpus(cfg, nodes)
        return cfg, cpu_plan(cfg)

    two_cores = [NodeResources(2.0, 0.0)]
    # The reference scored first (cache): the workers share the node, a quarter core left to Ray Data.
    cfg, one = plan(two_cores, "scaling.num_workers=1", "reference.cache=true")
    assert cfg.scaling.cpus_per_worker == 1.75 and one["train_worker"]["torch_threads"] == 2
    assert cfg.reference.cpus_per_actor == 1.75  # the reference pass has the node before training
    cfg, two = plan(two_cores, "scaling.num_workers=2", "reference.cache=true")
    assert cfg.scaling.cpus_per_worker == 0.87 and two["train_worker"]["torch_threads"] == 1
    # Streamed: the reference actor runs beside the worker and takes its share.
    cfg, streamed = plan(two_cores, "scaling.num_workers=1")
    assert cfg.scaling.cpus_per_worker == cfg.reference.cpus_per_actor == 0.87
    assert streamed["train_worker"]["torch_threads"] + streamed["reference_actor"]["torch_threads"] == 2
    # The node's CPUs are never over-reserved; explicit numbers are kept.
    for cfg, _ in (plan(two_cores, "scaling.num_workers=2"), plan(two_cores, "scaling.num_workers=3")):
        assert cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.reference.cpus_per_actor <= 1.75
    cfg, _ = plan(two_cores, "scaling.cpus_per_worker=0.5")
    assert cfg.scaling.cpus_per_worker == 0.5 and cfg.reference.cpus_per_actor == 0.75  # what 2 x 0.5 leave
    # Workers spread over the nodes Ray packs them on: 4 workers on two 16-CPU nodes, 2 per node.
    cfg, _ = plan([NodeResources(16.0, 0.0)] * 2, "scaling.num_workers=4", "reference.cache=true")
    assert cfg.scaling.cpus_per_worker == 7.87
    # A sweep's concurrent trials share the node, less each trial's own CPUs.
    cfg, _ = plan(
        two_cores,
        "scaling.num_workers=1",
        "sweep={space: {loss.gamma: {values: [0, 1]}}, trial_cpus: 0.1}",
        "data.eval_fraction=0.2",
        "monitor.eval_every=2",
        "loss.type=cpo",
    )
    assert cfg.scaling.cpus_per_worker == 0.77  # (2 - 0.25 - 2 x 0.1) / 2 trials
    # With GPUs: Ray Train's 1 CPU per worker at least, more where the GPU node has CPUs to spare.
    cfg, _ = plan([NodeResources(2.0, 0.0), NodeResources(32.0, 8.0)], "scaling.use_gpu=true", "scaling.num_workers=8")
    assert cfg.scaling.cpus_per_worker == 3.0 and cfg.reference.cpus_per_actor == 1.0  # (32 - 0.25 - 1) / 8
    assert [torch_threads(c) for c in (0.3, 0.58, 1.49, 1.75, 4.0)] == [1, 1, 1, 2, 4]
