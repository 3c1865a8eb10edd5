"""The cluster definitions under clusters/: parsed and checked, never launched.

Fast and offline: no Ray cluster is started, except by the one test marked `cluster`
(clusters/local/stop.sh stops only its own cluster: two real heads on this machine). The
local scripts are checked with `bash -n` and run against a stub `ray` executable (RAY_BIN)
that only records how it was called.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
START_SH = CLUSTERS / "local" / "start.sh"
STOP_SH = CLUSTERS / "local" / "stop.sh"
AWS_YAML = CLUSTERS / "aws" / "rayalign-gpu.yaml"
RAYCLUSTER_YAML = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = CLUSTERS / "kuberay" / "rayjob-sweep.yaml"
DOCKERFILE = CLUSTERS / "docker" / "Dockerfile"
LOCAL_AUTOSCALING_YAML = CLUSTERS / "local" / "autoscaling.yaml"
SERVICEACCOUNT_YAML = CLUSTERS / "kuberay" / "serviceaccount.yaml"
BUCKET_POLICY = CLUSTERS / "aws" / "bucket-policy.json"
AUTOSCALER_POLICY = CLUSTERS / "aws" / "autoscaler-policy.json"
EC2_TRUST_POLICY = CLUSTERS / "aws" / "ec2-trust-policy.json"

LAUNCHER_REQUIRED = ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers")
RAY_PORTS = (6379, 8265, 10001)
# Env names whose value is a credential: they may only come from a secretKeyRef/file/variable.
SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY", re.IGNORECASE)
# What a pod's ServiceAccount is annotated with to get a storage identity (no keys anywhere).
STORAGE_IDENTITY_ANNOTATIONS = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account")
# Installing Python packages on a node at boot: the image (clusters/docker/Dockerfile) carries them.
BOOT_INSTALL = re.compile(r"\b(pip3?|uv|conda|mamba|micromamba|pipx|easy_install)\b[^;&|]*\b(install|add)\b")


# ----------------------------------------------------------------------------- helpers


def pinned_ray_version() -> str:
    # A regex, not tomllib: the project supports Python 3.10.
    m = re.search(
        r'^\s*"ray(\[[^\]]*\])?==([0-9][0-9.]*[0-9])"', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M
    )
    assert m, "pyproject.toml does not pin ray==X.Y.Z"
    return m.group(2)


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_docs() -> list[tuple[Path, Any]]:
    return [(p, d) for p in yaml_files() for d in load_docs(p)]


def is_launcher(doc: Any) -> bool:
    return isinstance(doc, dict) and "provider" in doc and "cluster_name" in doc


def is_kuberay(doc: Any) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/")


def is_service_account(doc: Any) -> bool:
    """A Kubernetes ServiceAccount: the storage identity of the KubeRay pods (serviceaccount.yaml)."""
    return isinstance(doc, dict) and doc.get("apiVersion") == "v1" and doc.get("kind") == "ServiceAccount"


def service_accounts() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _path, doc in all_docs():
        if is_service_account(doc):
            name = doc["metadata"]["name"]
            assert name not in out, f"ServiceAccount {name} defined twice"
            out[name] = doc
    return out


def is_local_autoscaling(doc: Any) -> bool:
    """Ray's fake multi-node provider: an autoscaling cluster on one machine (no cloud fields)."""
    return is_launcher(doc) and doc["provider"].get("type") == "fake_multinode"


def launcher_docs() -> list[tuple[Path, dict]]:
    """Cloud launcher configs."""
    return [(p, d) for p, d in all_docs() if is_launcher(d) and not is_local_autoscaling(d)]


def kuberay_docs(kind: str | None = None) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_docs() if is_kuberay(d) and (kind is None or d.get("kind") == kind)]


def doc_id(item: tuple[Path, Any]) -> str:
    path, doc = item
    name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
    return f"{path.relative_to(CLUSTERS)}:{name or doc.get('cluster_name', '?')}"


def cluster_spec(doc: dict) -> dict | None:
    """The RayCluster spec of a RayCluster, or the rayClusterSpec of a RayJob (None if it uses a clusterSelector)."""
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    return doc["spec"].get("rayClusterSpec")


def pod_groups(spec: dict) -> list[tuple[str, dict]]:
    """The head group and every worker group of a RayCluster spec, labelled."""
    return [("head", spec["headGroupSpec"])] + [
        (f"worker group {g.get('groupName')}", g) for g in spec["workerGroupSpecs"]
    ]


def ray_containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for label, group in pod_groups(spec):
        containers = group["template"]["spec"]["containers"]
        assert containers, f"{label}: no containers"
        for c in containers:
            yield f"{label}/{c.get('name')}", c


def env_map(env: list[dict] | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for entry in env or []:
        assert entry["name"] not in out, f"env {entry['name']} set twice"
        out[entry["name"]] = entry
    return out


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def is_gpu_worker_group(group: dict) -> bool:
    for c in group["template"]["spec"]["containers"]:
        for section in ("limits", "requests"):
            res = (c.get("resources") or {}).get(section) or {}
            if any(k.endswith("/gpu") and int(v) > 0 for k, v in res.items()):
                return True
    return False


def is_gpu_node_type(node_type: dict) -> bool:
    if int((node_type.get("resources") or {}).get("GPU", 0)) > 0:
        return True
    # AWS GPU families: g4dn, g5, g6, g6e, p3, p4d, p5 ...
    return bool(re.match(r"^[gp]\d", str(node_type.get("node_config", {}).get("InstanceType", ""))))


def launcher_commands(config: dict) -> list[tuple[str, str]]:
    """Every command the launcher runs on a node (on the host or in the container), labelled."""
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    out = [(key, c) for key in keys for c in config.get(key) or []]
    for name, node_type in config["available_node_types"].items():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += [(f"{name}.{key}", c) for c in node_type.get(key) or []]
    return out


def launcher_images(config: dict) -> dict[str, str]:
    """The container image each node type runs, as the launcher resolves it."""
    docker = config.get("docker") or {}
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = docker.get("head_image") or docker.get("image", "")
        else:
            out[name] = (
                (node_type.get("docker") or {}).get("worker_image")
                or docker.get("worker_image")
                or docker.get("image", "")
            )
    return out


def project_image_tag_ok(image: str) -> bool:
    """The image built from clusters/docker/Dockerfile: `<registry>/rayalign:<version>-ray<pinned Ray>-...`."""
    name, _, tag = image.rpartition(":")
    return (
        name.rpartition("/")[2] == "rayalign"
        and "/" in name
        and "/" not in tag
        and f"ray{pinned_ray_version()}" in tag.split("-")
    )


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def statements(policy: dict) -> list[dict]:
    stmts = policy["Statement"]
    return stmts if isinstance(stmts, list) else [stmts]


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def ray_start_commands(config: dict) -> list[tuple[str, str]]:
    out = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = [c for c in config.get(key) or [] if "ray start" in c]
        assert cmds, f"{key} has no `ray start` command"
        out += [(key, c) for c in cmds]
    return out


# ------------------------------------------------------------------ inventory & parsing


def test_all_definitions_exist():
    for path in (
        START_SH,
        STOP_SH,
        LOCAL_AUTOSCALING_YAML,
        AWS_YAML,
        RAYCLUSTER_YAML,
        RAYJOB_YAML,
        DOCKERFILE,
        SERVICEACCOUNT_YAML,
        BUCKET_POLICY,
        AUTOSCALER_POLICY,
        EC2_TRUST_POLICY,
        CLUSTERS / "README.md",
    ):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"


def test_every_yaml_parses_to_a_known_definition():
    files = yaml_files()
    assert len(files) >= 3
    kinds = []
    for path, doc in all_docs():
        assert isinstance(doc, dict), f"{path}: a YAML document is not a mapping"
        assert is_launcher(doc) or is_kuberay(doc) or is_service_account(doc), (
            f"{path}: document is neither a Ray cluster launcher config, a ray.io resource nor a "
            f"ServiceAccount (kind={doc.get('kind')!r}); Secrets and other objects must not live here"
        )
        kinds.append(
            "local-autoscaling" if is_local_autoscaling(doc) else "launcher" if is_launcher(doc) else doc["kind"]
        )
    assert {"local-autoscaling", "launcher", "RayCluster", "RayJob", "ServiceAccount"} <= set(kinds), kinds


# ------------------------------------------------------------------ local autoscaling (fake multi-node)


def test_local_autoscaling_config():
    """The config start.sh --autoscaling hands to Ray's autoscaler (tests/test_jobs_cluster.py runs it)."""
    import ray.autoscaler

    cfg = yaml.safe_load(LOCAL_AUTOSCALING_YAML.read_text(encoding="utf-8"))
    for key in LAUNCHER_REQUIRED:
        assert key in cfg, f"missing {key}"
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    pytest.importorskip("jsonschema").validate(cfg, schema)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # The head takes no work, as on the cloud: every job's work needs worker nodes.
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        lo, hi = node_type.get("min_workers", 0), node_type["max_workers"]
        assert lo == 0 and 0 < hi <= cfg["max_workers"], f"{name}: bad bounds min={lo} max={hi}"
        assert node_type["resources"].get("CPU", 0) > 0
    assert 0 < cfg["idle_timeout_minutes"] <= 1, "idle nodes should go quickly on a laptop"
    # start.sh fills in the GCS address; nothing runs setup commands on a fake node.
    assert cfg["provider"]["gcs_address"] is None
    assert not any(cfg.get(k) for k in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"))


# ------------------------------------------------------------------ cluster launcher (AWS)

LAUNCHERS = launcher_docs()


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_required_fields(item):
    _, cfg = item
    for key in LAUNCHER_REQUIRED:
        assert key in cfg, f"missing {key}"
    assert isinstance(cfg["provider"], dict) and cfg["provider"].get("type"), "provider.type missing"
    assert cfg["head_node_type"] in cfg["available_node_types"], "head_node_type is not a node type"
    for name, node_type in cfg["available_node_types"].items():
        assert "resources" in node_type and "node_config" in node_type, f"{name}: needs resources and node_config"


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_matches_ray_json_schema(item):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(item[1], schema)


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_passes_rays_own_config_preparation(item):
    """What `ray up` does before any cloud call: fill provider defaults, then validate."""
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    import copy

    prepared = util.prepare_config(copy.deepcopy(item[1]))
    util.validate_config(prepared)


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_autoscaling_bounds(item):
    _, cfg = item
    assert cfg["max_workers"] > 0
    assert cfg.get("idle_timeout_minutes", 0) > 0, "idle_timeout_minutes must be set (> 0)"
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers, "no worker node types"
    assert any(is_gpu_node_type(t) for t in workers.values()), "no GPU worker type"
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        assert hi is not None, f"{name}: max_workers not set"
        assert 0 <= lo <= hi and hi > 0, f"{name}: bad bounds min={lo} max={hi}"
        assert hi <= cfg["max_workers"], f"{name}: max_workers {hi} above the cluster cap {cfg['max_workers']}"
        if is_gpu_node_type(t):
            assert lo == 0, f"{name}: GPU worker type must scale from 0 (min_workers={lo})"


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_token_auth_on_every_ray_start(item):
    _, cfg = item
    for key, cmd in ray_start_commands(cfg):
        auth = cmd.find("RAY_AUTH_MODE=token")
        assert 0 <= auth < cmd.index("ray start"), f"{key}: RAY_AUTH_MODE=token must precede ray start: {cmd}"


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_token_comes_from_a_mounted_user_file(item):
    _, cfg = item
    mounts = {k.replace("$HOME/", "~/"): v for k, v in (cfg.get("file_mounts") or {}).items()}
    for key, cmd in ray_start_commands(cfg):
        literal = re.search(r"RAY_AUTH_TOKEN=(?!\$)\S", cmd)
        assert literal is None, f"{key}: RAY_AUTH_TOKEN set to a literal"
        m = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", cmd)
        assert m or "RAY_AUTH_TOKEN=$" in cmd, f"{key}: no token source (RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN)"
        if m:
            remote = m.group(1).strip("\"'").replace("$HOME/", "~/").replace("${HOME}/", "~/")
            assert remote in mounts, f"{key}: token file {remote} is not in file_mounts"
            local = mounts[remote]
            # The user's own file (home directory or absolute path), never a file in the repository.
            assert local.startswith(("~", "/")), f"token file mount source {local!r} is inside the repository"
            assert not Path(os.path.expanduser(local)).resolve().is_relative_to(REPO)


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_dashboard_is_localhost_only(item):
    _, cfg = item
    head = [c for k, c in ray_start_commands(cfg) if k == "head_start_ray_commands"]
    for cmd in head:
        assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", cmd), f"dashboard not bound to 127.0.0.1: {cmd}"
    everything = json.dumps(cfg)
    assert "0.0.0.0" not in everything.replace('"CidrIp": "0.0.0.0/0"', ""), "0.0.0.0 bind in launcher config"
    for perm in (cfg["provider"].get("security_group") or {}).get("IpPermissions", []):
        open_world = any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", []))
        ports = range(perm.get("FromPort", 0), perm.get("ToPort", 65535) + 1)
        assert not (open_world and any(p in ports for p in RAY_PORTS)), f"Ray port open to the world: {perm}"


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_installs_nothing_at_boot(item):
    """The project image carries rayalign, vLLM and every other package: no node pip-installs
    anything (rayalign, vllm or otherwise) when it boots, and the repository is not installed
    from a synced directory (a job's own code comes with its runtime env)."""
    _, cfg = item
    for key, cmd in launcher_commands(cfg):
        assert not BOOT_INSTALL.search(cmd), f"{key} installs packages at boot: {cmd}"
        assert not re.search(r"\bvllm\b|rayalign\[|-e\s+[\"']?\.", cmd), f"{key} installs the project: {cmd}"


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_image_matches_pinned_ray(item):
    """Every node runs the project image (clusters/docker/Dockerfile), tagged with the pinned Ray."""
    _, cfg = item
    for name, image in launcher_images(cfg).items():
        assert image, f"{name}: no docker image"
        assert project_image_tag_ok(image), (
            f"{name}: {image!r} is not the project image <registry>/rayalign:<version>-ray{pinned_ray_version()}-..."
        )


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_every_node_has_an_instance_profile(item):
    """Storage access comes from instance profiles, never keys: the head's (autoscaler + bucket)
    differs from the workers' (bucket only), and the file points at the policies to attach."""
    path, cfg = item
    arn = re.compile(r"^arn:aws:iam::(\d{12}|YOUR_ACCOUNT_ID):instance-profile/([\w+=,.@-]+)$")
    profiles = {}
    for name, node_type in cfg["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert isinstance(profile, dict) and set(profile) == {"Arn"}, (
            f"{name}: IamInstanceProfile: {{Arn: ...}} missing"
        )
        m = arn.match(profile["Arn"])
        assert m, f"{name}: not an instance-profile ARN: {profile['Arn']}"
        profiles[name] = m.group(2)
    head = profiles.pop(cfg["head_node_type"])
    assert profiles and head not in profiles.values(), "workers must not get the head's (autoscaler) profile"
    assert len(set(profiles.values())) == 1, f"one worker profile for every worker type: {profiles}"
    text = path.read_text(encoding="utf-8")
    for policy in (BUCKET_POLICY, AUTOSCALER_POLICY, EC2_TRUST_POLICY):
        assert policy.name in text, f"{path.name} does not point to {policy.name}"


@pytest.mark.parametrize("item", LAUNCHERS, ids=doc_id)
def test_launcher_pins_an_ami_on_every_node_type(item):
    """A current GPU AMI set explicitly (the launcher's default is an old Ubuntu 18.04 DLAMI):
    a real id or the named placeholder the file explains, on every GPU node type at least."""
    _, cfg = item
    assert any(is_gpu_node_type(t) for t in cfg["available_node_types"].values())
    for name, node_type in cfg["available_node_types"].items():
        ami = str(node_type["node_config"].get("ImageId", ""))
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|YOUR_AMI_ID", ami), f"{name}: ImageId not pinned ({ami!r})"
    amis = {str(t["node_config"]["ImageId"]) for t in cfg["available_node_types"].values()}
    assert len(amis) == 1, f"one AMI for every node type: {amis}"


def test_bucket_policy_is_least_privilege():
    """The run bucket only: list it, read/write/delete its objects; no wildcard action or resource."""
    policy = load_json(BUCKET_POLICY)
    assert policy.get("Version") == "2012-10-17"
    allowed = {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    buckets, granted = set(), set()
    for st in statements(policy):
        assert st["Effect"] == "Allow" and not {"NotAction", "NotResource", "Principal"} & set(st), st
        actions, resources = as_list(st["Action"]), as_list(st["Resource"])
        for action in actions:
            assert "*" not in action, f"wildcard action {action}"
            assert action in allowed, f"{action} is more than the run needs"
        for res in resources:
            assert res != "*", "Resource: * (every bucket)"
            m = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]{3,63}|YOUR_BUCKET)(/\*)?", res)
            assert m, f"not the run bucket or its objects: {res}"
            buckets.add(m.group(1))
            if "s3:ListBucket" in actions:
                assert not m.group(2), f"s3:ListBucket applies to the bucket ARN, not {res}"
            else:
                assert m.group(2) == "/*", f"object actions apply to the bucket's objects, not {res}"
        granted |= set(actions)
    assert len(buckets) == 1, f"one bucket: {buckets}"
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= granted


def test_autoscaler_policy_is_scoped_to_this_cluster():
    """The head's extra rights: describe EC2, launch/tag/terminate only instances tagged with this
    cluster's name, pass only the worker role; no wildcard action, no S3 (that is bucket-policy.json)."""
    ((_, cfg),) = [(p, d) for p, d in LAUNCHERS if p == AWS_YAML]
    region, cluster = cfg["provider"]["region"], cfg["cluster_name"]
    worker_profiles = {
        t["node_config"]["IamInstanceProfile"]["Arn"].rpartition("/")[2]
        for n, t in cfg["available_node_types"].items()
        if n != cfg["head_node_type"]
    }
    policy = load_json(AUTOSCALER_POLICY)
    assert policy.get("Version") == "2012-10-17"
    granted: dict[str, list[dict]] = {}
    for st in statements(policy):
        assert st["Effect"] == "Allow" and not {"NotAction", "NotResource", "Principal"} & set(st), st
        actions, resources = as_list(st["Action"]), as_list(st["Resource"])
        for action in actions:
            assert "*" not in action and not action.startswith("s3:"), f"{action} in the autoscaler policy"
            granted.setdefault(action, []).append(st)
        if "*" in resources:
            assert all(a.startswith("ec2:Describe") for a in actions), f"Resource * beyond Describe: {actions}"
        for res in resources:
            if res.startswith("arn:aws:ec2:"):
                assert res.split(":")[3] == region, f"{res} is not in provider.region {region}"
    cluster_tag = {"aws:ResourceTag/ray-cluster-name": cluster}
    for action in ("ec2:TerminateInstances",):
        for st in granted[action]:
            assert st.get("Condition", {}).get("StringEquals") == cluster_tag, f"{action} not limited to {cluster}"
    for st in granted["ec2:CreateTags"]:
        cond = st.get("Condition", {}).get("StringEquals")
        assert cond in (cluster_tag, {"ec2:CreateAction": "RunInstances"}), f"ec2:CreateTags unscoped: {st}"
    launches = [st for st in granted["ec2:RunInstances"] if any(":instance/" in r for r in as_list(st["Resource"]))]
    assert launches and all(
        st.get("Condition", {}).get("StringEquals") == {"aws:RequestTag/ray-cluster-name": cluster} for st in launches
    ), "instances launched must carry this cluster's tag"
    (pass_role,) = granted["iam:PassRole"]
    roles = {r.rpartition("/")[2] for r in as_list(pass_role["Resource"])}
    assert roles == worker_profiles, f"iam:PassRole must name the worker role only ({worker_profiles}), got {roles}"
    assert pass_role["Condition"]["StringEquals"] == {"iam:PassedToService": "ec2.amazonaws.com"}
    trust = load_json(EC2_TRUST_POLICY)
    (st,) = statements(trust)
    assert st["Principal"] == {"Service": "ec2.amazonaws.com"} and st["Action"] == "sts:AssumeRole"


# ------------------------------------------------------------------ KubeRay

KUBERAY = kuberay_docs()
KUBERAY_CLUSTERS = [(p, d) for p, d in KUBERAY if cluster_spec(d) is not None]


@pytest.mark.parametrize("item", KUBERAY, ids=doc_id)
def test_kuberay_required_fields(item):
    _, doc = item
    for key in ("apiVersion", "kind", "metadata", "spec"):
        assert key in doc, f"missing {key}"
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"].get("name")
    if doc["kind"] == "RayJob":
        assert "rayClusterSpec" in doc["spec"] or "clusterSelector" in doc["spec"]
    spec = cluster_spec(doc)
    if spec is not None:
        assert "headGroupSpec" in spec, "missing headGroupSpec"
        assert spec.get("workerGroupSpecs"), "missing workerGroupSpecs"
        assert spec["headGroupSpec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_autoscaling_bounds(item):
    spec = cluster_spec(item[1])
    assert spec.get("enableInTreeAutoscaling") is True
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    assert isinstance(idle, int) and idle > 0, "autoscalerOptions.idleTimeoutSeconds must be set (> 0)"
    assert any(is_gpu_worker_group(g) for g in spec["workerGroupSpecs"]), "no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas")
        n = g.get("replicas", lo)
        assert hi is not None, f"{g.get('groupName')}: maxReplicas not set"
        assert 0 <= lo <= n <= hi and hi > 0, f"{g.get('groupName')}: bad bounds {lo} <= {n} <= {hi}"
        if is_gpu_worker_group(g):
            assert lo == 0, f"{g.get('groupName')}: GPU group must scale from 0 (minReplicas={lo})"


def _assert_token_env(where: str, env: dict[str, dict], secret: str) -> None:
    mode = env.get("RAY_AUTH_MODE")
    assert mode is not None and mode.get("value") == "token", f"{where}: RAY_AUTH_MODE=token not set"
    tok = env.get("RAY_AUTH_TOKEN")
    assert tok is not None, f"{where}: RAY_AUTH_TOKEN not set"
    assert "value" not in tok, f"{where}: RAY_AUTH_TOKEN is a literal"
    ref = (tok.get("valueFrom") or {}).get("secretKeyRef") or {}
    assert ref.get("name") == secret and ref.get("key") == "auth_token", (
        f"{where}: RAY_AUTH_TOKEN must come from secretKeyRef {secret}/auth_token, got {tok}"
    )


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_token_auth_everywhere(item):
    spec = cluster_spec(item[1])
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", "authOptions.mode must be token"
    secret = auth.get("secretName")
    assert secret, "authOptions.secretName must name the user-created Secret"
    for where, container in ray_containers(spec):
        _assert_token_env(where, env_map(container.get("env")), secret)
    _assert_token_env("autoscaler", env_map((spec.get("autoscalerOptions") or {}).get("env")), secret)


@pytest.mark.parametrize("item", KUBERAY, ids=doc_id)
def test_kuberay_no_literal_credentials(item):
    for node in walk(item[1]):
        if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
            if SECRET_ENV_NAME.search(str(node["name"])):
                assert "value" not in node, f"env {node['name']} has a literal value"
                assert set(node.get("valueFrom") or {}) <= {"secretKeyRef"}, node
        if isinstance(node, dict):
            assert "stringData" not in node, "inline Secret data"


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_dashboard_not_public(item):
    spec = cluster_spec(item[1])
    head = spec["headGroupSpec"]
    # KubeRay binds the dashboard to 0.0.0.0 when rayStartParams does not say otherwise.
    host = str((head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0"))
    head_env = env_map(head["template"]["spec"]["containers"][0].get("env"))
    auth_on = (spec.get("authOptions") or {}).get("mode") == "token" and (
        head_env.get("RAY_AUTH_MODE", {}).get("value") == "token"
    )
    if host == "0.0.0.0":
        assert auth_on, "dashboard on 0.0.0.0 without token auth"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "head Service must stay ClusterIP"
    assert head.get("enableIngress") is not True, "no Ingress for the dashboard"


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_versions_and_images(item):
    spec = cluster_spec(item[1])
    assert str(spec.get("rayVersion")) == pinned_ray_version()
    for where, container in ray_containers(spec):
        image = container.get("image", "")
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag and tag != "latest", f"{where}: pin an image tag, got {image!r}"


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_pods_mount_memory_backed_dev_shm(item):
    """Ray's object store and NCCL need a real /dev/shm (a container's default is 64 MiB): every
    pod template, head and each worker group, mounts an in-memory emptyDir there."""
    spec = cluster_spec(item[1])
    for label, group in pod_groups(spec):
        pod = group["template"]["spec"]
        in_memory = {v["name"] for v in pod.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        assert in_memory, f"{label}: no emptyDir volume with medium: Memory"
        for c in pod["containers"]:
            shm = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
            assert len(shm) == 1 and shm[0]["name"] in in_memory, (
                f"{label}/{c.get('name')}: /dev/shm is not an in-memory emptyDir mount: {shm}"
            )


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_pods_run_as_defined_service_accounts(item):
    """Storage access comes from the pods' ServiceAccount (IRSA / Workload Identity), defined in
    clusters/kuberay/. KubeRay binds the autoscaler's Kubernetes rights to the head's account,
    so the workers run as another one."""
    spec = cluster_spec(item[1])
    defined = service_accounts()
    names = {}
    for label, group in pod_groups(spec):
        name = group["template"]["spec"].get("serviceAccountName")
        assert name, f"{label}: no serviceAccountName"
        assert name in defined, f"{label}: ServiceAccount {name} is not defined under clusters/kuberay/"
        names[label] = name
    head = names.pop("head")
    assert head not in names.values(), f"workers share the head's ServiceAccount {head} (autoscaler RBAC)"


def test_service_accounts_name_a_storage_identity_and_hold_no_secret():
    accounts = service_accounts()
    assert accounts, "no ServiceAccount under clusters/kuberay/"
    for name, doc in accounts.items():
        annotations = doc["metadata"].get("annotations") or {}
        identity = {k: v for k, v in annotations.items() if k in STORAGE_IDENTITY_ANNOTATIONS}
        assert identity, f"ServiceAccount {name}: no {' / '.join(STORAGE_IDENTITY_ANNOTATIONS)} annotation"
        role = identity.get("eks.amazonaws.com/role-arn")
        if role is not None:
            assert re.fullmatch(r"arn:aws:iam::(\d{12}|YOUR_ACCOUNT_ID):role/[\w+=,.@/-]+", role), role
        assert "secrets" not in doc, f"ServiceAccount {name} lists Secrets"
    roles = {json.dumps(d["metadata"].get("annotations"), sort_keys=True) for d in accounts.values()}
    assert len(roles) == 1, "head and workers reach storage with the same identity"


@pytest.mark.parametrize("item", KUBERAY_CLUSTERS, ids=doc_id)
def test_kuberay_has_a_cpu_only_worker_group(item):
    """Ray Data's CPU stages (and CPU-only jobs) need CPU workers: the head advertises 0 CPUs and
    GPU nodes should not be held for CPU work."""
    spec = cluster_spec(item[1])
    assert str(spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus")) == "0"
    cpu_groups = []
    for g in spec["workerGroupSpecs"]:
        if is_gpu_worker_group(g) or float(str((g.get("rayStartParams") or {}).get("num-gpus", 0))) > 0:
            continue
        cpus = [
            str(((c.get("resources") or {}).get("requests") or {}).get("cpu", "0"))
            for c in g["template"]["spec"]["containers"]
        ]
        if any((float(x[:-1]) / 1000 if x.endswith("m") else float(x)) > 0 for x in cpus):
            cpu_groups.append(g)
    assert cpu_groups, "no CPU-only worker group"
    for g in cpu_groups:
        assert g.get("minReplicas", 0) == 0 and g["maxReplicas"] > 0, f"{g['groupName']}: scale it from 0"


def test_rayjob_runs_a_rayalign_sweep_and_cleans_up():
    jobs = kuberay_docs("RayJob")
    assert jobs
    for _, job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "rayalign" and argv[1] == "sweep", argv
        assert "--config" in argv, argv
        config = argv[argv.index("--config") + 1]
        assert re.fullmatch(r"jobs/configs/[\w.-]+\.ya?ml", config), config
        # The RayJob's cluster is deleted after the job: results must go to storage.
        assert any(arg.startswith("output.storage=") and "://" in arg for arg in argv), argv
        assert job["spec"].get("shutdownAfterJobFinishes") is True
        assert job["spec"].get("ttlSecondsAfterFinished", 0) >= 0
        assert "rayClusterSpec" in job["spec"], "shutdownAfterJobFinishes needs a RayJob-owned cluster"


def test_rayjob_cluster_matches_raycluster():
    ((_, cluster),) = kuberay_docs("RayCluster")
    for _, job in kuberay_docs("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob-sweep.yaml drifted from raycluster.yaml"


def test_dockerfile_uses_pinned_ray():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"rayproject/ray:{re.escape(pinned_ray_version())}-py3\d+-gpu", text)
    # The image, not the nodes at boot, installs the project with its vLLM extra (bounded).
    assert re.search(r'pip install[^\n]*-e\s+"?\.\[vllm\][^\n]*vllm>=[\d.]+,<[\d.]+', text)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".git", "runs"} <= set(ignore)


def test_rayjob_config_keeps_everything_in_shared_storage():
    """The RayJob's config, with its --set overrides, keeps the run and the reference cache in
    object storage: the cluster's pods share nothing else, and go away after the job."""
    from rayalign.config import load_config

    def in_object_storage(where: str) -> bool:
        return where.partition("://")[0].lower() in ("s3", "gs", "gcs") and "://" in where

    for _, job in kuberay_docs("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        config = argv[argv.index("--config") + 1]
        overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
        cfg = load_config(REPO / config, overrides)
        assert in_object_storage(cfg.output.storage or ""), f"output.storage={cfg.output.storage} is not object storage"
        cache = cfg.reference.cache_root
        assert cache is None or in_object_storage(cache), f"reference.cache_root {cache} is on one pod's disk"
        assert all(in_object_storage(p) for p in cfg.data.paths), f"data paths on one pod's disk: {cfg.data.paths}"


def test_job_commands_under_clusters_pass_a_storage_uri():
    """Every example command in clusters/ passes output.storage as a URI, never a bare local path;
    the cloud ones (aws/, kuberay/) as object storage."""
    found = {}
    for path in sorted(CLUSTERS.rglob("*")):
        if not path.is_file():
            continue
        for value in re.findall(r"output\.storage=([^\s`'\"]+)", path.read_text(encoding="utf-8")):
            rel = path.relative_to(CLUSTERS)
            found.setdefault(rel.parts[0], []).append(value)
            scheme = value.partition("://")[0] if "://" in value else None
            assert scheme in ("s3", "gs", "gcs", "file"), f"{rel}: output.storage={value} is not a storage URI"
            if rel.parts[0] in ("aws", "kuberay"):
                assert scheme in ("s3", "gs", "gcs"), (
                    f"{rel}: output.storage={value}: use the bucket every node reaches"
                )
    assert {"aws", "kuberay", "local"} <= set(found), found


def _requirement_specs(text: str) -> list[tuple[str, str]]:
    """(name, specifier) of each `vllm...` requirement with a version specifier in `text`."""
    return re.findall(r"\b(vllm(?:-cpu)?)\s*((?:(?:===|==|~=|!=|<=|>=|<|>)\s*[\w.*+!-]+\s*,?\s*)+)", text, re.I)


def test_every_vllm_requirement_under_clusters_has_an_upper_bound():
    """vLLM pins its own torch and transformers: a new minor release must be a deliberate image
    rebuild. Every vllm requirement under clusters/ is bounded above, and every install of the
    `[vllm]` extra (pyproject says only vllm>=0.32) adds such a bound on the same line."""
    seen = 0
    for path in sorted(CLUSTERS.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for name, spec in _requirement_specs(text):
            seen += 1
            bounded = re.search(r"(^|,)\s*(<|<=|~=|===)", spec) or re.search(r"(^|,)\s*==\s*[\w.+!-]+\s*(,|$)", spec)
            assert bounded and "*" not in spec, f"{path.relative_to(CLUSTERS)}: {name}{spec.strip()} has no upper bound"
        for line in text.splitlines():
            if re.search(r"\b(pip3?|uv)\b.*\binstall\b", line) and re.search(r"\[[^\]]*\bvllm\b", line):
                assert _requirement_specs(line), (
                    f"{path.relative_to(CLUSTERS)}: installs [vllm] unbounded: {line.strip()}"
                )
    assert seen, "no vllm requirement found (the Dockerfile installs vLLM)"


def test_one_project_image_everywhere():
    """The AWS nodes, every KubeRay container and the Dockerfile's documented tag name one image."""
    images = {}
    for path, cfg in LAUNCHERS:
        for name, image in launcher_images(cfg).items():
            images[f"{path.name}:{name}"] = image
    for path, doc in KUBERAY_CLUSTERS:
        for where, container in ray_containers(cluster_spec(doc)):
            images[f"{path.name}:{where}"] = container["image"]
    for tag in re.findall(r"docker (?:build|push)\b.*?(\S+/rayalign:\S+)", DOCKERFILE.read_text(encoding="utf-8")):
        images[f"Dockerfile:{tag}"] = tag
    assert len(images) > 3 and len(set(images.values())) == 1, images
    assert project_image_tag_ok(next(iter(images.values())))


# ------------------------------------------------------------------ no secrets committed


def test_no_secret_material_under_clusters():
    hexrun = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])")
    literal_env = re.compile(r"RAY_AUTH_TOKEN=(?![\$\"'\s]|\.\.\.)")
    for path in CLUSTERS.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        assert not hexrun.search(text), f"{path}: looks like a token or key"
        assert not literal_env.search(text), f"{path}: RAY_AUTH_TOKEN assigned a literal"
        assert "BEGIN" not in text or "PRIVATE KEY" not in text, f"{path}: private key"
        assert path.name != "auth_token", f"{path}: token file committed"


# ------------------------------------------------------------------ local scripts


@pytest.mark.parametrize("script", [START_SH, STOP_SH], ids=lambda p: p.name)
def test_local_script_syntax_and_strict_mode(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_local_start_script_static_contract():
    text = START_SH.read_text(encoding="utf-8")
    assert "--dashboard-host 127.0.0.1" in text
    assert "RAY_AUTH_MODE=token" in text
    assert "0.0.0.0" not in text
    # Never print the token: no `ray get-auth-token` call, no cat/echo of the token file.
    assert not re.search(r'"?\$\{?RAY_BIN\}?"?\s+get-auth-token|^\s*ray\s+get-auth-token', text, re.M)
    assert not re.search(r"\bcat\s[^\n|>]*\$\{?(token_file|tmp_file|RAY_AUTH_TOKEN_PATH)\b", text)
    assert not re.search(r"\b(echo|printf)\b[^\n]*\$\{?RAY_AUTH_TOKEN(?!_PATH)\b", text)


STUB_RAY = """#!/usr/bin/env bash
{
  echo "ARGS $*"
  echo "RAY_AUTH_MODE=${RAY_AUTH_MODE:-}"
  echo "RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-}"
  echo "RAY_FAKE_CLUSTER=${RAY_FAKE_CLUSTER:-}"
  echo "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-}"
  echo "SID=$(ps -o sid= -p $$ | tr -d ' ')"
  echo "END"
} >> "$RAY_STUB_LOG"
exit "${RAY_STUB_RC:-0}"
"""


@pytest.fixture
def stub_env(tmp_path):
    """A clean environment whose `ray` is a stub that records its arguments and auth env."""
    home = tmp_path / "home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "ray"
    stub.write_text(STUB_RAY)
    stub.chmod(0o755)
    log = tmp_path / "ray-calls.log"
    env = {
        "HOME": str(home),
        "PATH": f"{bindir}:/usr/bin:/bin",
        "RAY_BIN": str(stub),
        "RAY_STUB_LOG": str(log),
        "LC_ALL": "C",
        # Ray's default temp dir, where start.sh keeps its state file, is $TMPDIR/ray.
        "TMPDIR": str(tmp_path),
    }
    return env, log, home


def run_script(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30, cwd=REPO)


def calls(log: Path) -> list[dict[str, str]]:
    if not log.exists():
        return []
    out, cur = [], {}
    for line in log.read_text(encoding="utf-8").splitlines():
        if line == "END":
            out.append(cur)
            cur = {}
        elif line.startswith("ARGS "):
            cur["args"] = line[5:]
        else:
            k, _, v = line.partition("=")
            cur[k] = v
    return out


def test_local_start_creates_private_token_and_starts_authenticated_head(stub_env):
    env, log, home = stub_env
    res = run_script(START_SH, env, "--num-cpus", "3")
    assert res.returncode == 0, res.stderr
    token_file = home / ".ray" / "auth_token"
    assert token_file.is_file()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text(encoding="utf-8")
    assert re.fullmatch(r"[0-9a-f]{64}", token), "expected 32 random bytes as hex, no newline"
    assert token not in res.stdout + res.stderr, "the token was printed"
    assert not list(token_file.parent.glob(".auth_token.*")), "temporary token file left behind"

    (call,) = calls(log)
    args = call["args"]
    assert args.startswith("start --head")
    assert "--dashboard-host 127.0.0.1" in args and "0.0.0.0" not in args
    assert "--num-cpus 3" in args
    assert call["RAY_AUTH_MODE"] == "token"
    assert call["RAY_AUTH_TOKEN_PATH"] == str(token_file)

    out = res.stdout
    assert "http://127.0.0.1:8265" in out
    assert "ray job submit" in out and "RAY_AUTH_MODE=token" in out


def test_local_start_reuses_token_tightens_mode_and_reads_env(stub_env):
    env, log, home = stub_env
    token_file = home / ".ray" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text("f" * 8 + "-existing-token")
    token_file.chmod(0o644)
    res = run_script(START_SH, {**env, "RAYALIGN_NUM_CPUS": "2", "RAYALIGN_DASHBOARD_PORT": "8300"})
    assert res.returncode == 0, res.stderr
    assert token_file.read_text(encoding="utf-8") == "f" * 8 + "-existing-token", "existing token replaced"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    (call,) = calls(log)
    assert "--num-cpus 2" in call["args"] and "--dashboard-port 8300" in call["args"]
    assert "http://127.0.0.1:8300" in res.stdout
    assert "-existing-token" not in res.stdout + res.stderr


def test_local_start_honours_custom_token_path(stub_env, tmp_path):
    env, log, home = stub_env
    custom = tmp_path / "secrets" / "ray-token"
    res = run_script(START_SH, {**env, "RAY_AUTH_TOKEN_PATH": str(custom)})
    assert res.returncode == 0, res.stderr
    assert custom.is_file() and stat.S_IMODE(custom.stat().st_mode) == 0o600
    assert not (home / ".ray" / "auth_token").exists()
    (call,) = calls(log)
    assert call["RAY_AUTH_TOKEN_PATH"] == str(custom)


def test_local_start_rejects_bad_cpu_count_without_starting(stub_env):
    env, log, _ = stub_env
    for bad in ("abc", "0", "-1"):
        res = run_script(START_SH, env, "--num-cpus", bad)
        assert res.returncode != 0, bad
    assert calls(log) == []


def test_local_start_runs_ray_in_a_session_of_its_own_and_records_it(stub_env, tmp_path):
    env, log, _ = stub_env
    res = run_script(START_SH, env, "--port", "6401")
    assert res.returncode == 0, res.stderr
    (call,) = calls(log)
    # Every port on 127.0.0.1: Ray binds its gRPC servers to all interfaces without this.
    assert call["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert "--node-ip-address 127.0.0.1" in call["args"]
    # `ray start` ran as the leader of a new session, whose id start.sh recorded for stop.sh.
    sid = call["SID"]
    assert sid.isdigit() and int(sid) != os.getsid(0)
    state = tmp_path / "ray" / "rayalign-head-6401.sid"
    assert state.read_text(encoding="utf-8").strip() == sid
    assert "clusters/local/stop.sh --port 6401" in res.stdout

    temp_dir = tmp_path / "rt"
    res = run_script(START_SH, env, "--temp-dir", str(temp_dir))
    assert res.returncode == 0, res.stderr
    assert (temp_dir / "rayalign-head-6379.sid").read_text(encoding="utf-8").strip() == calls(log)[-1]["SID"]
    assert f"clusters/local/stop.sh --temp-dir {temp_dir}" in res.stdout


def test_local_start_failure_keeps_the_running_clusters_record(stub_env, tmp_path):
    """A second start.sh on a busy port fails in `ray start`: the first cluster stays stoppable."""
    env, log, _ = stub_env
    state = tmp_path / "ray" / "rayalign-head-6379.sid"
    state.parent.mkdir()
    state.write_text("4242\n")
    res = run_script(START_SH, {**env, "RAY_STUB_RC": "3"})
    assert res.returncode == 3, res.stderr
    assert len(calls(log)) == 1
    assert state.read_text(encoding="utf-8") == "4242\n"
    assert sorted(p.name for p in state.parent.iterdir()) == [state.name], "temporary state file left behind"


def test_local_stop_never_runs_ray_stop():
    """`ray stop` stops every Ray cluster of the user on the machine, not only start.sh's."""
    code = "\n".join(
        line for line in STOP_SH.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")
    )
    assert not re.search(r"\bray\s+stop\b|RAY_BIN|find-ray\.sh", code)
    assert not re.search(r"\b(pkill|killall)\b", code)


def test_local_stop_without_a_running_head_touches_nothing(stub_env, tmp_path):
    env, log, _ = stub_env
    res = run_script(STOP_SH, env)
    assert res.returncode == 0, res.stderr
    assert "no rayalign head on port 6379 (started by start.sh) is running" in res.stdout
    # A stale state file naming a live session that is no Ray cluster (this test's own):
    # nothing in it is signalled, and the stale file goes.
    state = tmp_path / "ray" / "rayalign-head-6390.sid"
    state.parent.mkdir()
    state.write_text(f"{os.getsid(0)}\n")
    res = run_script(STOP_SH, env, "--port", "6390", "--force")
    assert res.returncode == 0, res.stderr
    assert "no rayalign head on port 6390" in res.stdout
    assert not state.exists()
    assert calls(log) == [], "stop.sh ran `ray`"
    res = run_script(STOP_SH, env, "--port", "x")
    assert res.returncode == 2


# ------------------------------------------------------------------ local scripts, for real


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list:
    """The live (non-zombie) processes of session `sid`."""
    import psutil

    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (OSError, psutil.Error):
            pass
    return out


def _gone(procs: list) -> bool:
    import psutil

    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _kill_session(sid: int) -> None:
    for proc in _session_processes(sid):
        try:
            proc.kill()
        except Exception:
            pass


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.cluster
def test_local_head_listens_on_loopback_only_and_stop_spares_other_clusters(tmp_path):
    """start.sh's head binds every port to 127.0.0.1; stop.sh stops it, its job entrypoints
    included, and leaves another Ray cluster of the same user on this machine running."""
    import tempfile

    import psutil

    repo_ray = REPO / ".venv" / "bin" / "ray"
    ray_bin = str(repo_ray) if repo_ray.exists() else "ray"
    token_file = tmp_path / "secrets" / "auth_token"
    env = {**os.environ, "RAY_BIN": ray_bin, "RAY_AUTH_TOKEN_PATH": str(token_file)}
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAYALIGN_RAY_PORT", "RAYALIGN_TEMP_DIR"):
        env.pop(name, None)
    # Ray's socket paths must stay short: temp dirs of their own, directly under /tmp.
    ours_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    other_dir = Path(tempfile.mkdtemp(prefix="ro", dir="/tmp"))
    port, dashboard_port, other_port = _free_port(), _free_port(), _free_port()
    ours_sid = other_sid = None
    # The other cluster: a plain `ray start` head in a session of its own, as another tool
    # or user session would start one (token auth, loopback only, like ours).
    other_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    try:
        started = subprocess.run(
            [
                "bash",
                str(START_SH),
                "--num-cpus",
                "1",
                "--port",
                str(port),
                "--dashboard-port",
                str(dashboard_port),
                "--temp-dir",
                str(ours_dir),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        ours_sid = int((ours_dir / f"rayalign-head-{port}.sid").read_text(encoding="utf-8"))

        for attempt in (1, 2):  # Ray gives a raylet 30 s to register: a busy 2-core machine may miss it
            other = subprocess.Popen(
                [
                    ray_bin,
                    "start",
                    "--head",
                    "--port",
                    str(other_port),
                    "--temp-dir",
                    str(other_dir),
                    "--num-cpus",
                    "1",
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                    "--node-ip-address",
                    "127.0.0.1",
                    "--ray-client-server-port",
                    str(_free_port()),
                ],
                env=other_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            other_sid = other.pid
            out, _ = other.communicate(timeout=120)
            if other.returncode == 0 or attempt == 2 or "timed out during startup" not in out:
                break
            _kill_session(other_sid)
        assert other.returncode == 0, out[-3000:]
        other_gcs = [p for p in _session_processes(other_sid) if p.name() == "gcs_server"]
        assert len(other_gcs) == 1

        # A job whose entrypoint runs in a session of its own, under the job supervisor.
        from ray.job_submission import JobStatus, JobSubmissionClient

        marker = f"{3600 + secrets.randbelow(10**6) / 10**6:.6f}"
        auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard_port}", headers=auth)
        deadline = time.monotonic() + 60
        while True:
            try:
                job_id = client.submit_job(entrypoint=f"sleep {marker}")
                break
            except RuntimeError as e:  # until the head's dashboard agent has registered
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        while not (
            entrypoint := [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]
        ):
            status = client.get_job_status(job_id)
            assert status not in (JobStatus.FAILED, JobStatus.STOPPED), client.get_job_logs(job_id)
            assert time.monotonic() < deadline, f"job entrypoint not running after 60 s ({status})"
            time.sleep(0.5)
        assert os.getsid(entrypoint[0].pid) != ours_sid

        ours = _session_processes(ours_sid)
        listening, names = {}, set()
        for proc in ours + entrypoint:
            try:
                name, conns = proc.name(), proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:  # a worker that just exited
                continue
            names.add(name)
            for conn in conns:
                if conn.status == psutil.CONN_LISTEN:
                    listening[(conn.laddr.ip, conn.laddr.port)] = name
        assert {"gcs_server", "raylet"} <= names, names
        assert {port, dashboard_port} <= {p for _, p in listening}, listening
        public = {addr: name for addr, name in listening.items() if not _is_loopback(addr[0])}
        assert not public, f"listening beyond loopback: {public}"

        stopped = subprocess.run(
            ["bash", str(STOP_SH), "--port", str(port), "--temp-dir", str(ours_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "ray stop" not in stopped.stdout
        assert _gone(ours + entrypoint), [p for p in ours + entrypoint if p.is_running()]
        assert _session_processes(ours_sid) == []
        assert not (ours_dir / f"rayalign-head-{port}.sid").exists()

        # The other cluster lives on and answers.
        assert other_gcs[0].is_running() and other_gcs[0].status() != psutil.STATUS_ZOMBIE
        status = subprocess.run(
            [ray_bin, "status", "--address", f"127.0.0.1:{other_port}"],
            env=other_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
        again = subprocess.run(
            ["bash", str(STOP_SH), "--port", str(port), "--temp-dir", str(ours_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert again.returncode == 0 and "no rayalign head on port" in again.stdout
    finally:
        # Never `ray stop`: kill each cluster by its own session (a no-op when stopped).
        for sid in (ours_sid, other_sid):
            if sid is not None:
                _kill_session(sid)
        for proc in psutil.process_iter(["cmdline"]):
            if "marker" in locals() and proc.info["cmdline"] == ["sleep", marker]:
                proc.kill()
        for path in (ours_dir, other_dir):
            shutil.rmtree(path, ignore_errors=True)


def test_readme_covers_every_definition():
    text = (CLUSTERS / "README.md").read_text(encoding="utf-8")
    for path in (
        START_SH,
        STOP_SH,
        AWS_YAML,
        RAYCLUSTER_YAML,
        RAYJOB_YAML,
        DOCKERFILE,
        SERVICEACCOUNT_YAML,
        BUCKET_POLICY,
        AUTOSCALER_POLICY,
        EC2_TRUST_POLICY,
    ):
        assert str(path.relative_to(CLUSTERS)) in text, f"README does not describe {path.name}"
    assert re.search(r"^#+\s*Security", text, re.MULTILINE)


def test_local_start_autoscaling_hands_ray_a_resolved_config(stub_env):
    import sys

    env, log, _ = stub_env
    # start.sh runs the python next to `ray` (a virtual environment's) to resolve the config.
    (Path(env["RAY_BIN"]).parent / "python").symlink_to(sys.executable)
    res = run_script(START_SH, env, "--autoscaling", "--port", "6390")
    assert res.returncode == 0, res.stderr
    (call,) = calls(log)
    args = call["args"]
    assert "--num-cpus 0" in args, "the head's CPUs come from the head node type"
    assert call["RAY_FAKE_CLUSTER"] == "1" and call["RAY_AUTH_MODE"] == "token"
    resolved = Path(re.search(r"--autoscaling-config (\S+)", args).group(1))
    config = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    assert config["provider"]["gcs_address"] == "127.0.0.1:6390"
    original = yaml.safe_load(LOCAL_AUTOSCALING_YAML.read_text(encoding="utf-8"))
    assert config["available_node_types"] == original["available_node_types"]

    clash = run_script(START_SH, env, "--autoscaling", "--num-cpus", "2")
    assert clash.returncode == 2 and "--num-cpus" in clash.stderr
