"""Connecting the driver to Ray: the one place that decides local cluster vs. existing one."""

from __future__ import annotations

import os

import ray

from rayalign.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by ``cfg.address`` or by ``RAY_ADDRESS`` (set for Ray jobs); else start one here.

    Sizing options (num_cpus, object store) only apply to a cluster started here.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    sizing = {}
    if cfg.num_cpus is not None:
        sizing["num_cpus"] = cfg.num_cpus
    if cfg.object_store_memory_mb is not None:
        sizing["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    ray.init(**sizing)
