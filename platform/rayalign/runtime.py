"""Connecting the driver to Ray: the one place that decides local cluster vs. existing one, and
checks that the cluster can hold what a run asks for before any stage waits on it.

Ray is imported inside the functions: :func:`bind_local_cluster_to_loopback` must run before
anything imports Ray.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from rayalign.config import RayConfig, RunConfig
from rayalign.errors import ClusterResourceError

log = logging.getLogger(__name__)

# Ray reads this once, when it is imported: "0" makes Ray treat this machine as a single-node
# cluster, so the node address is 127.0.0.1 and every port (GCS, raylet, agents, workers) listens
# on loopback only. Without it Ray swaps 127.0.0.1 for the machine's address and listens everywhere.
RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"  # read by torch.distributed when it creates a gloo process group


@dataclass(frozen=True)
class Workload:
    """What a command runs on the cluster: the reference actors and/or the Ray Train workers (with a Tune trial's
    own CPUs); ``reference_first``: the reference is scored before training (a sweep's driver scores it once)."""

    reference: bool = True
    train: bool = True
    per_trial_cpus: float = 0.0
    reference_first: bool = False


@dataclass(frozen=True)
class ResourceDemand:
    """CPUs and GPUs a run holds at its peak, and what holds them (for the error message)."""

    cpus: float
    gpus: float
    parts: str

    @classmethod
    def of_run(cls, cfg: RunConfig, workload: Workload) -> ResourceDemand:
        """Peak demand of ``workload`` under ``cfg``, its CPU settings resolved (rayalign.cpus).

        Streamed into training, the reference actors run while the workers train, so the two add
        up; with ``reference.cache`` (or ``reference_first``) they run one after the other.
        """
        ref, s = cfg.reference, cfg.scaling
        reference, per_trial_cpus = workload.reference, workload.per_trial_cpus
        reference_first = ref.cache or workload.reference_first
        if workload.train and ref.in_worker:
            reference = False  # the training workers score it themselves
        if workload.train and cfg.reference_scope != "all":  # a loss that needs none: held-out pairs, first
            reference, reference_first = reference and cfg.reference_scope == "heldout", True
        ref_cpus, ref_gpus = ref.num_actors * ref.cpus_per_actor, ref.num_actors * (ref.gpus_per_actor or 0.0)
        train_cpus = per_trial_cpus + s.num_workers * s.cpus_per_worker
        train_gpus = s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0
        ref_part = (
            f"{ref.num_actors} reference actor(s) × ({ref.cpus_per_actor:g} CPU, {ref.gpus_per_actor or 0:g} GPU)"
        )
        gpus = s.gpus_per_worker if s.use_gpu else 0
        train_part = f"{s.num_workers} train worker(s) × ({s.cpus_per_worker:g} CPU, {gpus:g} GPU)"
        if per_trial_cpus:
            train_part += f" + {per_trial_cpus:g} CPU for the trial"
        if not workload.train:
            return cls(ref_cpus, ref_gpus, ref_part)
        if not reference:
            return cls(train_cpus, train_gpus, train_part)
        if reference_first:
            return cls(max(ref_cpus, train_cpus), max(ref_gpus, train_gpus), f"{ref_part}, then {train_part}")
        return cls(ref_cpus + train_cpus, ref_gpus + train_gpus, f"{ref_part} streaming into {train_part}")


def cluster_address(cfg: RayConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (set for Ray jobs); None starts one here."""
    return cfg.address or os.environ.get("RAY_ADDRESS")


def bind_local_cluster_to_loopback(cfg: RayConfig) -> bool:
    """Before Ray is imported: a cluster this process will start listens on 127.0.0.1 only.

    Nothing changes when the run joins an existing cluster (its nodes must reach this driver) or
    with ``ray.loopback_only: false``. Returns whether the local cluster will be loopback-only.
    """
    if cluster_address(cfg) or not cfg.loopback_only:
        return False
    if "ray" in sys.modules and os.environ.get(RAY_SINGLE_NODE_ENV) != "0":
        return False  # too late for this process; init_ray says so when it starts the cluster
    os.environ[RAY_SINGLE_NODE_ENV] = "0"
    # torch.distributed's gloo (CPU training) binds its listeners to the address the host name resolves to, often
    # the machine's LAN address; the workers of a cluster started here inherit this process's environment.
    os.environ.setdefault(GLOO_INTERFACE_ENV, loopback_interface())
    return True


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def init_ray(cfg: RayConfig, demand: ResourceDemand | None = None) -> None:
    """Join the cluster named by ``cfg.address`` or by ``RAY_ADDRESS`` (set for Ray jobs); else start one here.

    Sizing options (num_cpus, object store) only apply to a cluster started here. With ``demand`` (also when
    already connected), a cluster that cannot grow (one started here) must already hold it: otherwise this raises
    :class:`ClusterResourceError` instead of letting Ray wait forever for resources.
    """
    import ray

    address = cluster_address(cfg)
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            sizing = {}
            if cfg.num_cpus is not None:
                sizing["num_cpus"] = cfg.num_cpus
            if cfg.object_store_memory_mb is not None:
                sizing["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
            secure_local_token()
            ray.init(**sizing)
            if cfg.loopback_only and ray.util.get_node_ip_address() != "127.0.0.1":
                log.warning(
                    "Ray was imported before rayalign could keep the local cluster on 127.0.0.1; "
                    "its ports listen on every interface"
                )
    if demand is not None:
        check_resources(demand, ray.cluster_resources(), may_grow=bool(address))


def secure_local_token() -> Path | None:
    """Ray's token file for a cluster started here, created (32 random bytes, hex) or tightened to mode 600
    before Ray reads it: Ray 2.60 itself writes it world-readable. None when Ray takes the token from
    ``RAY_AUTH_TOKEN`` or token auth is off (``RAY_AUTH_MODE=disabled``)."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as token:
            token.write(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def check_resources(demand: ResourceDemand, available: dict[str, float], may_grow: bool) -> None:
    """Compare ``demand`` with the cluster's ``available`` totals (``ray.cluster_resources()``).

    ``may_grow``: an existing cluster whose autoscaler adds nodes only once work is pending, so a
    shortfall is reported and the run goes on.
    """
    short = [
        f"{need:g} {name}{'s' if need != 1 else ''} but the cluster has {have:g}"
        for name, key, need in (("CPU", "CPU", demand.cpus), ("GPU", "GPU", demand.gpus))
        if need > (have := available.get(key, 0.0)) + 1e-9
    ]
    if not short:
        return
    message = f"this run asks for {' and '.join(short)} ({demand.parts})"
    if may_grow:
        log.warning("%s; waiting for the cluster's autoscaler to add nodes", message)
        return
    gpus = available.get("GPU", 0.0)
    hint = ""
    if demand.gpus > gpus:
        hint = (
            " To share one GPU, give fractions: e.g. scaling.gpus_per_worker: 0.75 and reference.gpus_per_actor: 0.25"
            " (or set reference.cache: true to score the reference before training)."
            if gpus > 0
            else " Train on CPUs with scaling.use_gpu: false, or join a cluster with GPUs (ray.address)."
        )
    raise ClusterResourceError(message + "." + hint)
