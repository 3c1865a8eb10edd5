"""The harness does what it claims: worker nodes share no filesystem with the driver or with each
other, S3 is the one place they share, and the S3 server and the cluster refuse anonymous callers."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid

import pytest

pytestmark = pytest.mark.no_shared_fs

# How the S3 server says no: no signature, or a signature made with the wrong secret.
DENIED = "ACCESS_DENIED|AccessDenied|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|403"


@pytest.fixture(scope="module")
def driver(isolated_cluster):
    """This test process as the cluster's driver (ray.init; ray.shutdown at the end)."""
    with isolated_cluster.connect() as ray:
        yield ray


@pytest.fixture(scope="module")
def worker_node_ids(isolated_cluster, driver):
    """Ray node ids of two alive worker nodes."""
    alive = {n["NodeID"] for n in driver.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]}
    ids = [node.node_id for node in isolated_cluster.workers if node.alive and node.node_id in alive]
    assert len(ids) >= 2, (ids, alive)
    return ids[:2]


def _on(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


def test_cluster_is_a_cpu_less_head_and_two_worker_nodes(isolated_cluster, driver):
    nodes = [n for n in driver.nodes() if n["Alive"]]
    assert len(nodes) == 3
    heads = [n for n in nodes if "node:__internal_head__" in n["Resources"]]
    assert len(heads) == 1
    assert heads[0]["Resources"].get("CPU", 0) == 0
    assert sorted(n["Resources"].get("CPU", 0) for n in nodes) == [0, 2, 2]
    assert driver.cluster_resources()["CPU"] == 4
    # This driver is attached to the head's raylet: losing a worker node never takes it along.
    assert driver.get_runtime_context().get_node_id() == heads[0]["NodeID"]
    # Token authentication is on: the dashboard refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{isolated_cluster.dashboard_url}/api/version", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(
        f"{isolated_cluster.dashboard_url}/api/version", headers=isolated_cluster.auth_headers
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200


def test_worker_nodes_see_neither_the_driver_files_nor_each_others_cache(isolated_cluster, driver, worker_node_ids):
    ray = driver
    driver_file = isolated_cluster.driver_root / f"from-driver-{uuid.uuid4().hex}.txt"
    driver_file.write_text("written by the driver")
    assert driver_file.exists()

    @ray.remote(num_cpus=1)
    def look_and_write(driver_file: str, driver_root: str, tag: str) -> dict:
        import os
        from pathlib import Path

        import ray

        cache = Path(os.environ["RAYALIGN_CACHE_DIR"])
        cache.mkdir(parents=True, exist_ok=True)
        mine = cache / f"{tag}.txt"
        mine.write_text(tag)
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "cache_dir": str(cache),
            "sees_driver_file": os.path.exists(driver_file),
            "driver_root_listing": sorted(os.listdir(driver_root)),
            "cache_listing": sorted(os.listdir(cache)),
            "mine": str(mine),
            "reads_own_file": mine.read_text(),
        }

    @ray.remote(num_cpus=1)
    def sees(path: str) -> bool:
        import os

        return os.path.exists(path)

    tags = [f"node{i}-{uuid.uuid4().hex}" for i in range(len(worker_node_ids))]
    seen = ray.get(
        [
            look_and_write.options(**_on(node)).remote(str(driver_file), str(isolated_cluster.driver_root), tag)
            for node, tag in zip(worker_node_ids, tags)
        ]
    )
    for node, tag, result in zip(worker_node_ids, tags, seen):
        assert result["node"] == node
        assert result["cache_dir"] == str(isolated_cluster.node_cache)
        assert result["sees_driver_file"] is False, result
        assert result["driver_root_listing"] == [], result
        # Each node's cache holds its own file (positive control: the node reads it back), not the other's.
        assert result["reads_own_file"] == tag
        assert f"{tag}.txt" in result["cache_listing"], result
        assert not set(result["cache_listing"]) & {f"{other}.txt" for other in tags if other != tag}, result
    # Neither node sees the other's cache file, and the driver sees neither.
    first, second = seen[0]["mine"], seen[1]["mine"]
    head = isolated_cluster.head.node_id
    crossed = ray.get(
        [
            sees.options(**_on(worker_node_ids[0])).remote(second),
            sees.options(**_on(worker_node_ids[1])).remote(first),
            sees.options(**_on(worker_node_ids[0])).remote(first),
            # The head has a node_cache of its own too, but sees driver_root (by design:
            # it stands for the machine `ray job submit` runs the entrypoint on).
            sees.options(num_cpus=0, **_on(head)).remote(first),
            sees.options(num_cpus=0, **_on(head)).remote(str(driver_file)),
        ]
    )
    assert crossed == [False, False, True, False, True]
    assert not os.path.exists(first) and not os.path.exists(second)


def test_every_worker_node_writes_and_reads_s3_with_credentials_from_its_environment(
    s3_server, driver, worker_node_ids
):
    ray = driver
    prefix = f"harness/{uuid.uuid4().hex}"

    @ray.remote(num_cpus=1)
    def roundtrip(endpoint: str, bucket: str, key: str, other_key: str | None) -> dict:
        import os

        import pyarrow.fs as pafs
        import ray

        # No keys passed: the AWS SDK takes them from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region=os.environ["AWS_REGION"])
        payload = f"from {ray.get_runtime_context().get_node_id()}".encode()
        with fs.open_output_stream(f"{bucket}/{key}") as out:
            out.write(payload)
        with fs.open_input_stream(f"{bucket}/{key}") as stream:
            back = stream.read()
        other = None
        if other_key is not None:
            with fs.open_input_stream(f"{bucket}/{other_key}") as stream:
                other = stream.read()
        return {"wrote": payload, "read": back, "other": other, "has_key": "AWS_ACCESS_KEY_ID" in os.environ}

    keys = [f"{prefix}/{node}.txt" for node in worker_node_ids]
    first = ray.get(
        roundtrip.options(**_on(worker_node_ids[0])).remote(s3_server.host_port, s3_server.bucket, keys[0], None)
    )
    # The second node reads what the first wrote: S3 is the storage the nodes share.
    second = ray.get(
        roundtrip.options(**_on(worker_node_ids[1])).remote(s3_server.host_port, s3_server.bucket, keys[1], keys[0])
    )
    for node, result in zip(worker_node_ids, (first, second)):
        assert result["has_key"]
        assert result["read"] == result["wrote"] == f"from {node}".encode()
    assert second["other"] == first["wrote"]
    fs = s3_server.filesystem()
    for key, result in zip(keys, (first, second)):
        with fs.open_input_stream(f"{s3_server.bucket}/{key}") as stream:
            assert stream.read() == result["wrote"]


def test_s3_refuses_requests_without_valid_credentials(s3_server):
    import pyarrow.fs as pafs

    key = f"{s3_server.bucket}/harness/secret-{uuid.uuid4().hex}.txt"
    with s3_server.filesystem().open_output_stream(key) as out:
        out.write(b"secret")
    anonymous = pafs.S3FileSystem(
        endpoint_override=s3_server.host_port, scheme="http", region=s3_server.region, anonymous=True
    )
    wrong = s3_server.filesystem(secret_key="not-the-secret")
    for fs in (anonymous, wrong):
        with pytest.raises(OSError, match=DENIED):
            with fs.open_input_stream(key) as stream:
                stream.read()
        with pytest.raises(OSError, match=DENIED):
            with fs.open_output_stream(f"{s3_server.bucket}/harness/anonymous.txt") as out:
                out.write(b"no")
    # A plain unsigned HTTP request too.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{s3_server.endpoint}/{key}", timeout=10)
    assert refused.value.code == 403
    assert (
        s3_server.filesystem().get_file_info(f"{s3_server.bucket}/harness/anonymous.txt").type == pafs.FileType.NotFound
    )


def test_a_lost_worker_node_is_seen_dead_and_a_new_isolated_one_joins(isolated_cluster, driver):
    """Last in this file: it replaces worker node 0 (the cluster keeps two worker nodes)."""
    ray = driver
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {node.node_id for node in isolated_cluster.nodes if node.alive} == before
    lost = isolated_cluster.kill_worker_node(0, wait=True)
    assert not lost.alive
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == before - {lost.node_id}

    added = isolated_cluster.add_worker_node()
    assert added.alive and isolated_cluster.workers[-1] is added
    assert added.node_id is not None and added.node_id not in before
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == alive | {added.node_id}

    marker = isolated_cluster.driver_root / f"from-driver-{uuid.uuid4().hex}.txt"
    marker.write_text("written by the driver")

    @ray.remote(num_cpus=1)
    def where(path: str) -> tuple[str, bool, str]:
        import os

        import ray

        return ray.get_runtime_context().get_node_id(), os.path.exists(path), os.environ["RAYALIGN_CACHE_DIR"]

    node, sees_driver_file, cache_dir = ray.get(where.options(**_on(added.node_id)).remote(str(marker)))
    assert node == added.node_id
    assert sees_driver_file is False
    assert cache_dir == str(isolated_cluster.node_cache)
