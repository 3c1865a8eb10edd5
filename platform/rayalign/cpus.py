"""CPUs: what each train worker and actor reserves from Ray, and how many threads torch computes on there.

``auto`` (the default of ``scaling.cpus_per_worker``, ``reference.cpus_per_actor`` and
``eval.generation.cpus_per_actor``) is resolved once the driver is connected, from the smallest node's CPUs
(:func:`resolve_auto_cpus`). Every process that computes with torch then sets its intra-op threads to what it
reserved (:func:`use_reserved_cpus`): Ray itself sets ``OMP_NUM_THREADS`` to the reserved CPUs *floored*, so a
worker reserving 0.5 or 1.75 CPUs would compute on one thread.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

from rayalign.config import RunConfig

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class NodeResources:
    """One alive Ray node's CPUs and GPUs (``ray.nodes()``'s ``Resources``)."""

    cpus: float
    gpus: float


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the cluster this process is connected to."""
    import ray

    return [
        NodeResources(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]
    ]


def torch_threads(cpus: float) -> int:
    """Intra-op threads for ``cpus`` reserved CPUs: rounded to whole cores, at least 1. Rounded rather than
    floored because ``auto`` leaves a quarter core (``ray.data_cpus_per_task``) to Ray Data's short tasks: a
    worker that has a 2-core node to itself reserves 1.75 CPUs and computes on 2 threads."""
    return max(1, math.floor(cpus + 0.5))


def _share(cpus: float) -> float:
    # Two decimals, rounded down: the shares of one node never add up to more than it has.
    return max(0.01, math.floor(cpus * 100) / 100)


def resolve_auto_cpus(cfg: RunConfig, nodes: list[NodeResources]) -> None:
    """Replace each ``auto`` CPU setting of ``cfg`` by a number, in place (explicit numbers are kept).

    On CPU nodes, what runs on a node at the same time shares its CPUs, less ``ray.data_cpus_per_task`` left to
    the Ray Data tasks that stream while training runs: the train workers (of every concurrent trial, for a
    sweep's trials), with the reference actors when the reference streams into training (``reference.cache``
    off, no sweep, a loss that needs the reference); a reference pass before training, and the generation after
    it, share the node among their own actors. Workers and actors are counted per node as Ray packs them
    (``ceil(count / nodes)``), on the smallest node. With GPUs: the Ray Train default of 1 CPU per worker, or
    more where the GPU node has CPUs to spare per worker (data collation, packing, CPU Adam under ZeRO-Offload);
    1 per GPU actor.
    """
    s, ref, gen = cfg.scaling, cfg.reference, cfg.eval.generation
    if AUTO not in (s.cpus_per_worker, ref.cpus_per_actor, gen.cpus_per_actor):
        return
    sweep = cfg.sweep
    trials = sweep.max_concurrent_trials if sweep is not None else 1
    streamed = not ref.cache and not ref.in_worker and sweep is None and cfg.reference_scope == "all"
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    compute_nodes = gpu_nodes if s.use_gpu and gpu_nodes else [n for n in nodes if n.cpus >= 1] or nodes
    node_cpus = min(n.cpus for n in compute_nodes) if compute_nodes else 1.0

    def per_node(count: int) -> int:
        return math.ceil(count / max(1, len(compute_nodes)))

    free = node_cpus - cfg.ray.data_cpus_per_task
    if sweep is not None:
        free -= per_node(trials) * sweep.trial_cpus
    workers = per_node(trials * s.num_workers)
    refs_beside = per_node(ref.num_actors) if streamed else 0
    if s.use_gpu:
        fit = max(1, int(min(n.gpus for n in gpu_nodes) // s.gpus_per_worker)) if gpu_nodes else 1
        worker = max(1.0, math.floor((free - refs_beside) / min(workers, fit)))
        ref_actor = gen_actor = 1.0
    else:
        worker = _share(free / (workers + refs_beside))
        ref_actor = worker if streamed else _share(free / per_node(ref.num_actors))
        if streamed and s.cpus_per_worker != AUTO and free > workers * s.cpus_per_worker:
            ref_actor = _share((free - workers * s.cpus_per_worker) / refs_beside)  # what the given workers leave
        gen_actor = _share(free / per_node(trials * gen.num_actors))
    if s.cpus_per_worker == AUTO:
        s.cpus_per_worker = worker
    if ref.cpus_per_actor == AUTO:
        ref.cpus_per_actor = ref_actor
    if gen.cpus_per_actor == AUTO:
        gen.cpus_per_actor = gen_actor


def resolved(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its ``auto`` CPU settings resolved (in place) against the cluster this process is connected
    to. ``open_run`` resolves them for every CLI command; this covers library callers that build a stage
    themselves (``run_audit`` or ``add_reference_logps`` from a notebook, tests)."""
    s, ref, gen = cfg.scaling, cfg.reference, cfg.eval.generation
    if AUTO in (s.cpus_per_worker, ref.cpus_per_actor, gen.cpus_per_actor):
        resolve_auto_cpus(cfg, cluster_nodes())
    return cfg


def cpu_plan(cfg: RunConfig) -> dict[str, Any]:
    """The (resolved) CPUs and torch threads of each kind of process: ``rayalign validate --json``'s ``cpus``."""
    s, ref, gen = cfg.scaling, cfg.reference, cfg.eval.generation
    plan = {"train_worker": {"count": s.num_workers, "cpus": s.cpus_per_worker}}
    if not ref.in_worker and cfg.reference_scope != "none":
        plan["reference_actor"] = {"count": ref.num_actors, "cpus": ref.cpus_per_actor}
    if cfg.evaluates_after_training:
        plan["generation_actor"] = {"count": gen.num_actors, "cpus": gen.cpus_per_actor}
    for part in plan.values():
        if part["cpus"] != AUTO:
            part["torch_threads"] = torch_threads(part["cpus"])
    return plan


def plan_line(cfg: RunConfig) -> str:
    """One line: each kind of process, how many, the CPUs each reserves and the threads it computes on."""
    names = {
        "train_worker": "train worker",
        "reference_actor": "reference actor",
        "generation_actor": "generation actor",
    }
    parts = [
        f"{p['count']} {names[kind]}(s) × {p['cpus']:g} CPU ({p['torch_threads']} torch thread(s) each)"
        if p["cpus"] != AUTO
        else f"{p['count']} {names[kind]}(s) × auto CPUs"
        for kind, p in cpu_plan(cfg).items()
    ]
    return ", ".join(parts)


def use_reserved_cpus(what: str, engine_threads: bool = False) -> int:
    """In a Ray worker or actor: set torch's intra-op threads to the CPUs Ray reserved for this process
    (:func:`torch_threads`), log it once, and return the thread count. ``what`` names the process in the log.
    ``engine_threads``: the process hosts an engine that has set its own threads (vLLM's CPU backend: its own
    binding, or ``OMP_NUM_THREADS`` from :func:`reserved_threads_env`): only log what it computes on, leaving
    torch's setting alone (vLLM aborts when it changes).
    Outside Ray (a class built in the driver, as tests do) torch's setting is left as it is."""
    import ray
    import torch

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return torch.get_num_threads()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    threads = torch_threads(cpus)
    if engine_threads:
        threads = torch.get_num_threads()  # what the engine set
    else:
        torch.set_num_threads(threads)
    # Printed, not logged: Ray Data's actors do not show INFO records; stderr lands in the process's Ray log.
    print(f"{what}: {threads} torch thread(s) for the {cpus:g} CPU(s) Ray reserved", file=sys.stderr, flush=True)
    return threads


def reserved_threads_env(cpus: float) -> dict[str, str]:
    """Environment for an actor whose engine reads its thread count from the environment (vLLM's CPU backend
    without thread binding): ``OMP_NUM_THREADS`` as :func:`torch_threads` rounds ``cpus``, where Ray would floor
    it."""
    return {"OMP_NUM_THREADS": str(torch_threads(cpus))}
