"""The `weed` server as an OS process: free ports on 127.0.0.1, liveness, and stopping its process group."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from p2es_dist.errors import UserError

HOST = "127.0.0.1"
DEFAULT_S3_PORT = 8333  # SeaweedFS's own default; used when free and no port was asked for
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "admin")
# The mini worker dials the admin gRPC port at admin + 10000 whatever -admin.port.grpc says.
ADMIN_GRPC_OFFSET = 10000

# Servers this process launched, kept so they are reaped (a zombie child still answers kill(pid, 0)).
CHILDREN: dict[int, subprocess.Popen] = {}


def alive(pid: int) -> bool:
    if pid in CHILDREN:
        return CHILDREN[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def is_ours(pid: int, state: Path) -> bool:
    """Guards against a recycled pid: the process must be a weed serving this state directory."""
    if not alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return True  # no procfs (macOS): trust the pid file
    except PermissionError:
        return False
    return Path(os.fsdecode(argv[0])).name == "weed" and f"-dir={state / 'data'}".encode() in argv


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners do
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def choose_ports(saved: dict[str, int] | None, s3_port: int | None) -> dict[str, int]:
    """Reuses the recorded ports when all are free; otherwise picks free ones (S3 prefers 8333)."""
    if s3_port and not port_free(s3_port):
        raise UserError(f"port {s3_port} on {HOST} is already in use: pass another --port, or 0 for any free port")
    if saved and s3_port in (None, saved["s3"]):
        wanted = [*saved.values(), saved["admin"] + ADMIN_GRPC_OFFSET]
        if all(port_free(p) for p in wanted):
            return saved
    ports: dict[str, int] = {}
    if s3_port:
        ports["s3"] = s3_port
    elif s3_port is None and port_free(DEFAULT_S3_PORT):
        ports["s3"] = DEFAULT_S3_PORT
    taken = set(ports.values())
    for name in PORT_NAMES:
        while name not in ports:
            port = random.randint(20000, 65535 - ADMIN_GRPC_OFFSET)
            group = (port, port + ADMIN_GRPC_OFFSET) if name == "admin" else (port,)
            if taken.isdisjoint(group) and all(port_free(p) for p in group):
                ports[name] = port
                taken.update(group)
    return {name: ports[name] for name in PORT_NAMES}


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after `timeout` seconds."""
    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        signal_group(sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive(pid):
            break
    CHILDREN.pop(pid, None)
