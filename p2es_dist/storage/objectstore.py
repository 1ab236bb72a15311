"""The embedded object store: a real S3 server (SeaweedFS `weed mini`) on 127.0.0.1 for local runs and tests.

`p2es objectstore start|stop|status [--dir DIR]` (README "The embedded object store"). Everything lives in one
state directory:

    s3.json       the S3 identities config with the generated access key and secret (mode 0600)
    config/       weed's `-config_dir`: security.toml with JWT keys and the gRPC certificates, new at each launch
    ports.json    the ports last used, reused on restart so the endpoint stays put
    weed.pid      the server's pid while it runs (it leads its own process group)
    weed.log      the server's stdout/stderr; glog files go to logs/
    data/         volumes and filer metadata

`weed mini` is SeaweedFS's all-in-one dev server (master, volume, filer, S3 and an admin/worker pair in one
process). It is preferred to `weed server` because it shuts down in seconds (the filer of `weed server` waits
15 s for its own metadata stream) and grows one volume per bucket instead of seven.

Only S3 serves data without a secret: `-disableHttp` drops the filer's HTTP API and the master's token-granting
/dir/*, security.toml's JWT keys guard the volume server's HTTP, and mutual TLS guards every gRPC port.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from p2es_dist.errors import UserError
from p2es_dist.storage.weed_process import (
    ADMIN_GRPC_OFFSET,
    HOST,
    PORT_NAMES,
    SECURITY_FILE,
    weed_binary,
    write_security_config,
)
from p2es_dist.storage.weed_process import CHILDREN as _CHILDREN
from p2es_dist.storage.weed_process import choose_ports as _choose_ports
from p2es_dist.storage.weed_process import is_ours as _is_ours
from p2es_dist.storage.weed_process import server_env as _server_env
from p2es_dist.storage.weed_process import terminate as _terminate

REGION = "us-east-1"
READINESS_BUCKET = "p2es-readiness"


@dataclass(kw_only=True)
class ObjectStoreConfig:
    volume_max: int = 1000  # volumes are created lazily, one per bucket and more as a bucket grows
    stop_timeout: float = 30.0  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True, kw_only=True)
class ObjectStoreInfo:
    endpoint: str
    access_key_id: str
    secret_access_key: str = field(repr=False)  # never in a repr, a log line or an error message
    pid: int
    state_dir: Path
    log_path: Path

    def env(self) -> dict[str, str]:
        """The environment a client needs: boto3, s3fs and pyarrow all read these names."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def export_lines(self) -> list[str]:
        return [f"export {name}={shlex.quote(value)}" for name, value in self.env().items()]


def default_state_dir() -> Path:
    """`$P2ES_OBJECTSTORE_DIR`, else `$XDG_CACHE_HOME/p2es/objectstore` (XDG default `~/.cache`)."""
    if explicit := os.environ.get("P2ES_OBJECTSTORE_DIR"):
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "p2es" / "objectstore"


# --- state directory ---------------------------------------------------------------------------------------


def _resolve(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir).expanduser().resolve() if state_dir is not None else default_state_dir().resolve()


def _write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _credentials(state: Path) -> tuple[str, str]:
    """The store's access key and secret, generated once and kept in the identities config (0600)."""
    config_path = state / "s3.json"
    if config_path.exists():
        os.chmod(config_path, 0o600)
        credential = json.loads(config_path.read_text())["identities"][0]["credentials"][0]
        return credential["accessKey"], credential["secretKey"]
    access_key = "P2ES" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(16))
    secret_key = secrets.token_hex(20)
    config = {
        "identities": [{
            "name": "p2es",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]
    }
    _write_atomic(config_path, json.dumps(config, indent=2) + "\n", mode=0o600)
    return access_key, secret_key


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """Serialises start/stop on one state directory across processes."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(state / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_pid(state: Path) -> int | None:
    try:
        return int((state / "weed.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _read_ports(state: Path) -> dict[str, int] | None:
    try:
        ports = json.loads((state / "ports.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return ports if set(ports) == set(PORT_NAMES) else None


# --- processes and ports -----------------------------------------------------------------------------------



def _command(weed: Path, state: Path, ports: dict[str, int], config: ObjectStoreConfig) -> list[str]:
    return [
        str(weed), f"-logdir={state / 'logs'}", f"-config_dir={state / 'config'}", "mini",
        f"-dir={state / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin'] + ADMIN_GRPC_OFFSET}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false",  # no phoning home: these machines have no network anyway
        "-disableHttp",  # S3 reaches the filer and master over gRPC; their HTTP data APIs only serve bypasses
        f"-s3.config={state / 's3.json'}", f"-volume.max={config.volume_max}",
    ]


def _round_trip(endpoint: str, access_key: str, secret_key: str) -> None:
    """Readiness is what clients need: a bucket can be created, written, read back and removed."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name=REGION,
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )
    payload = secrets.token_bytes(32)
    # The bucket may be left over by an earlier probe that failed half-way.
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=READINESS_BUCKET)
    client.put_object(Bucket=READINESS_BUCKET, Key="probe", Body=payload)
    if client.get_object(Bucket=READINESS_BUCKET, Key="probe")["Body"].read() != payload:
        raise RuntimeError("read back different bytes than written")
    client.delete_object(Bucket=READINESS_BUCKET, Key="probe")
    client.delete_bucket(Bucket=READINESS_BUCKET)


def _filer_answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the filer is serving
    except OSError:
        return False
    return True


def _last_log_line(info: ObjectStoreInfo) -> str:
    try:
        lines = [line.strip() for line in info.log_path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return f": {lines[-1].replace(info.secret_access_key, '***')[:300]}" if lines else ""


def _wait_ready(info: ObjectStoreInfo, ports: dict[str, int], timeout: float, deadline: float) -> None:
    proc = _CHILDREN.get(info.pid)
    last_error = "the filer did not answer"
    filer_up = False
    while True:
        if proc is not None and proc.poll() is not None:
            raise UserError(
                f"object store exited during start-up (exit code {proc.returncode}){_last_log_line(info)}; "
                f"see {info.log_path}"
            )
        filer_up = filer_up or _filer_answers(ports["filer"])
        if filer_up:
            try:
                _round_trip(info.endpoint, info.access_key_id, info.secret_access_key)
                return
            except Exception as exc:  # any failure just means "not ready yet" until the deadline
                last_error = " ".join(f"{type(exc).__name__}: {exc}".split())
        if time.monotonic() > deadline:
            raise UserError(
                f"object store at {info.endpoint} not ready within {timeout:g} s (last error: {last_error}); "
                f"see {info.log_path}"
            )
        time.sleep(0.5)


# --- public API ----------------------------------------------------------------------------------------------


def _info(state: Path, pid: int) -> ObjectStoreInfo | None:
    ports = _read_ports(state)
    config_path = state / "s3.json"
    if ports is None or not config_path.exists():
        return None
    access_key, secret_key = _credentials(state)
    return ObjectStoreInfo(
        endpoint=f"http://{HOST}:{ports['s3']}", access_key_id=access_key, secret_access_key=secret_key,
        pid=pid, state_dir=state, log_path=state / "weed.log",
    )


def status(state_dir: str | os.PathLike | None = None) -> ObjectStoreInfo | None:
    """The running store of `state_dir`, or None when none runs there."""
    state = _resolve(state_dir)
    pid = _read_pid(state)
    if pid is None or not _is_ours(pid, state):
        return None
    return _info(state, pid)


def _launch(weed: Path, state: Path, ports: dict[str, int], config: ObjectStoreConfig, timeout: float,
            deadline: float) -> ObjectStoreInfo:
    """Run weed on these ports and wait until an S3 round-trip succeeds; kill it if it never does."""
    _write_atomic(state / "ports.json", json.dumps(ports, indent=2) + "\n")
    log_path = state / "weed.log"
    if log_path.exists():
        os.replace(log_path, state / "weed.log.1")
    write_security_config(state / "config")
    with open(log_path, "wb") as log:
        # A new session: the server outlives the caller's terminal and stops as one process group. umask 077:
        # its volumes, logs and Unix sockets (/tmp/seaweedfs-*.sock) are the owner's alone.
        proc = subprocess.Popen(
            _command(weed, state, ports, config), cwd=state, env=_server_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
        )
    _CHILDREN[proc.pid] = proc
    _write_atomic(state / "weed.pid", f"{proc.pid}\n")
    info = _info(state, proc.pid)
    assert info is not None
    try:
        _wait_ready(info, ports, timeout, deadline)
    except BaseException:
        _terminate(proc.pid, timeout=5.0)
        (state / "weed.pid").unlink(missing_ok=True)
        raise
    return info


def start(
    state_dir: str | os.PathLike | None = None,
    *,
    timeout: float = 60.0,
    port: int | None = None,
    config: ObjectStoreConfig | None = None,
) -> ObjectStoreInfo:
    """Starts the store (or finds it running) and returns once an S3 round-trip succeeds.

    `port` is the S3 port: None reuses the last one (first time: 8333 when free), 0 takes any free port.
    """
    config = config or ObjectStoreConfig()
    state = _resolve(state_dir)
    deadline = time.monotonic() + timeout
    with _locked(state):
        os.chmod(state, 0o700)
        running = status(state)
        if running is not None and (state / "config" / SECURITY_FILE).exists():
            _wait_ready(running, _read_ports(state) or {}, timeout, deadline)
            return running
        if running is not None:
            # Launched before stores had a security.toml, so its filer, master and gRPC ports are open:
            # relaunch it on the same ports, credentials and data.
            _terminate(running.pid, config.stop_timeout)
            (state / "weed.pid").unlink(missing_ok=True)
        weed = weed_binary()
        for sub in ("data", "logs", "config"):
            (state / sub).mkdir(exist_ok=True)
        _credentials(state)
        saved = _read_ports(state)
        for attempt in range(3):
            ports = _choose_ports(saved, port)
            try:
                info = _launch(weed, state, ports, config, timeout, deadline)
                break
            except UserError as exc:
                # A port free when we looked can be taken before weed binds it (TIME_WAIT, another
                # server starting): pick fresh ones, unless the caller asked for a specific port.
                if "Port allocation failed" not in str(exc) or port or attempt == 2:
                    raise
                saved = None
        return info


def stop(state_dir: str | os.PathLike | None = None, *, timeout: float | None = None) -> bool:
    """Stops the store of `state_dir` by its recorded pid; True when one was running."""
    state = _resolve(state_dir)
    if not state.exists():
        return False
    with _locked(state):
        pid = _read_pid(state)
        was_running = pid is not None and _is_ours(pid, state)
        if was_running:
            _terminate(pid, ObjectStoreConfig().stop_timeout if timeout is None else timeout)
        (state / "weed.pid").unlink(missing_ok=True)
        return was_running


@contextlib.contextmanager
def running(state_dir: str | os.PathLike | None = None, **start_kwargs) -> Iterator[ObjectStoreInfo]:
    """The store of `state_dir`, started if needed; stopped afterwards only if this call started it."""
    found = status(state_dir)
    if found is not None:
        yield found
        return
    info = start(state_dir, **start_kwargs)
    try:
        yield info
    finally:
        stop(state_dir)


def main(argv: list[str] | None = None) -> int:
    """`p2es objectstore start|stop|status [--dir DIR]`; `start` prints shell `export` lines on stdout."""
    parser = argparse.ArgumentParser(prog="p2es objectstore", description="The embedded S3 object store.")
    actions = parser.add_subparsers(dest="action", required=True)
    for name, help_text in (("start", "start it (or find it running) and print the exports"),
                            ("stop", "stop it"), ("status", "say whether it runs, where, and its pid")):
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("--dir", type=Path, default=None, help=f"state directory (default {default_state_dir()})")
        if name == "start":
            sub.add_argument("--port", type=int, default=None, help="S3 port (default: last used, else 8333; 0: any)")
            sub.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    state = _resolve(args.dir)

    if args.action == "start":
        info = start(state, timeout=args.timeout, port=args.port)
        print(f"# p2es object store: {info.endpoint} (pid {info.pid}, state {state}, log {info.log_path})")
        print("\n".join(info.export_lines()))
        return 0
    if args.action == "stop":
        pid = _read_pid(state)
        print(f"stopped the object store (pid {pid})" if stop(state) else f"object store not running ({state})")
        return 0
    info = status(state)
    if info is None:
        print(f"object store not running ({state})")
        return 1
    print(f"object store running: endpoint {info.endpoint}, pid {info.pid}, state {state}, log {info.log_path}")
    return 0


if __name__ == "__main__":
    from p2es_dist.errors import run_main

    sys.exit(run_main(main, sys.argv[1:], prog="p2es objectstore"))
