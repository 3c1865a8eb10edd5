"""The storage check before any stage: every node that may work on the run reaches what it will open.

On a cluster a node that cannot see the run's storage (a local ``output.root`` the other machines do
not share, missing credentials, a wrong endpoint) would otherwise fail deep inside Ray Data or Ray
Train with a long traceback, after minutes of work. Here the driver writes a probe object into each
place that must be shared (the run's storage, the reference cache); then one zero-CPU task on every
alive node reads the driver's probe, writes, reads and deletes its own, and checks that the model and
the data files are there. The first failure becomes one :class:`StorageError` line naming the place,
the node and the error.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from rayalign.config import RunConfig, S3Config
from rayalign.errors import StorageError
from rayalign.models import MODEL_MANIFEST, ModelSource
from rayalign.storage import Location, cache_location, location, read_text, remove, storage_root, write_text

log = logging.getLogger(__name__)

PROBE_DIR = "_probe"
NODE_TIMEOUT_S = 120.0
NOT_SHARED_HINT = (
    "the nodes do not share this filesystem: set output.storage to a URI every node reaches "
    "(s3://bucket/runs, gs://bucket/runs; output.s3 for an S3-compatible server)"
)


@dataclass(frozen=True)
class SharedPlace:
    """A place every node must reach, and the probe object the driver left in it."""

    label: str  # the config key a person fixes
    place: Location
    token: str

    @property
    def driver_probe(self) -> Location:
        return self.place / PROBE_DIR / f"{self.token}.driver"


def shared_places(cfg: RunConfig) -> list[SharedPlace]:
    token = uuid.uuid4().hex
    places = [SharedPlace("output.storage" if cfg.output.storage else "output.root", storage_root(cfg.output), token)]
    cache = cache_location(cfg)
    if not cache.uri.startswith(places[0].place.uri + "/"):
        places.append(SharedPlace("reference.cache_root", cache, token))
    return places


def check_driver_storage(cfg: RunConfig) -> None:
    """Raise :class:`StorageError` unless this process can write, read and delete in every shared place:
    run before the driver publishes anything, so a wrong endpoint or missing credentials end in one line."""
    for shared in shared_places(cfg):
        problem = _write_read_delete(shared, "the driver")
        if problem:
            raise StorageError(problem)


def check_storage(cfg: RunConfig, model: ModelSource, data_paths: list[str]) -> None:
    """Raise :class:`StorageError` unless the driver and every alive node reach the run's storage, the
    reference cache, the model and the data files (see the module's docstring)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    places = shared_places(cfg)
    for shared in places:
        problem = _write_read_delete(shared, "the driver", keep=True)
        if problem:
            raise StorageError(problem)
    try:
        probe = ray.remote(_probe_node)
        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        pending = {
            probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
                places, model, data_paths, cfg.output.s3
            ): node_id
            for node_id in nodes
        }
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=NODE_TIMEOUT_S)
        if late:
            late_nodes = ", ".join(f"{nodes[pending[ref]]} ({pending[ref][:8]})" for ref in late)
            raise StorageError(f"storage check: node(s) {late_nodes} did not answer within {NODE_TIMEOUT_S:g} s")
        problems = [p for p in ray.get(done) if p]
        if problems:
            raise StorageError(problems[0])
        log.info(
            "storage: %s reached from the driver and %d node(s)", ", ".join(p.place.uri for p in places), len(nodes)
        )
    finally:
        for shared in places:
            remove(shared.driver_probe)


def _write_read_delete(shared: SharedPlace, who: str, keep: bool = False) -> str | None:
    """Write, read back and (unless ``keep``) delete a probe of ``who``'s in ``shared``; the problem, or None."""
    mine = shared.driver_probe if keep else shared.place / PROBE_DIR / f"{shared.token}.{uuid.uuid4().hex[:12]}"
    try:
        write_text(mine, shared.token)
        if read_text(mine) != shared.token:
            return (
                f"{shared.label}: {shared.place.uri} cannot be used from {who}: "
                "a probe written there read back different"
            )
        if not keep:
            remove(mine)
    except Exception as exc:  # any filesystem's error, as the user will see it at run time
        return f"{shared.label}: {shared.place.uri} cannot be used from {who}: {type(exc).__name__}: {exc}"
    return None


def _probe_node(places: list[SharedPlace], model: ModelSource, data_paths: list[str], s3: S3Config) -> str | None:
    """On one node: the first problem with what the run will open there, or None."""
    import ray

    ctx = ray.get_runtime_context()
    who = f"node {ray.util.get_node_ip_address()} ({ctx.get_node_id()[:8]})"
    for shared in places:
        try:
            seen = read_text(shared.driver_probe)
        except Exception as exc:
            return f"{shared.label}: {shared.place.uri} cannot be used from {who}: {type(exc).__name__}: {exc}"
        if seen != shared.token:
            hint = NOT_SHARED_HINT if shared.place.is_local else "it holds no probe the driver wrote there"
            return f"{shared.label}: {shared.place.uri} is not the driver's from {who}: {hint}"
        problem = _write_read_delete(shared, who)
        if problem:
            return problem
    if model.stored is None:
        if not (model.driver_dir / "config.json").is_file():
            return f"model: {model.driver_dir} is not visible from {who}: {NOT_SHARED_HINT}"
    else:
        try:
            published = read_text(model.stored / MODEL_MANIFEST)
        except Exception as exc:
            published, why = None, f": {type(exc).__name__}: {exc}"
        else:
            why = f" ({MODEL_MANIFEST} is missing)"
        if published is None:
            return f"model: the published copy {model.stored.uri} cannot be read from {who}{why}"
    for path in data_paths:
        place = location(path, s3)
        try:
            found = place.kind() != pafs.FileType.NotFound
        except Exception as exc:
            return f"data.paths: {path} cannot be read from {who}: {type(exc).__name__}: {exc}"
        if not found:
            hint = NOT_SHARED_HINT if place.is_local else "not found"
            return f"data.paths: {path} is not visible from {who}: {hint}"
    return None
