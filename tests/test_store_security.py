"""Only the embedded store's S3 port serves data without a secret (issue 14).

Each test makes the real requests a local user without the S3 credentials could make: HTTP to the filer,
master and volume server, gRPC to every gRPC port, SeaweedFS's own `weed backup`. Before the store wrote a
security.toml these all got data (see the legacy-store test, which reproduces that on purpose first).
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from boto3.s3.transfer import TransferConfig

from p2es_dist.storage import objectstore, uri, weed_process

PAYLOAD = b'{"schema": "p2es-run", "secret_field": "' + uuid.uuid4().hex.encode() + b'"}'


def ports_of(info: objectstore.ObjectStoreInfo) -> dict[str, int]:
    return json.loads((info.state_dir / "ports.json").read_text())


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers); status 0 when the connection itself is refused or reset."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)
    except (urllib.error.URLError, ConnectionError):
        return 0, b"", {}


def multipart(name: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def client(info: objectstore.ObjectStoreInfo):
    return boto3.client("s3", endpoint_url=info.endpoint, aws_access_key_id=info.access_key_id,
                        aws_secret_access_key=info.secret_access_key, region_name=objectstore.REGION)


@pytest.fixture
def bucket(s3_bucket: str) -> str:
    return s3_bucket.removeprefix("s3://")


def test_security_config_is_private_and_fresh_at_each_launch(tmp_path):
    from cryptography import x509

    config_dir = tmp_path / "config"
    first = tomllib.loads(weed_process.write_security_config(config_dir).read_text())
    keys = [first["jwt"]["signing"]["key"], first["jwt"]["signing"]["read"]["key"],
            first["jwt"]["filer_signing"]["key"], first["jwt"]["filer_signing"]["read"]["key"]]
    assert all(re.fullmatch(r"[0-9a-f]{64}", key) for key in keys) and len(set(keys)) == 4
    assert first["access"]["ui"] is False
    ca = x509.load_pem_x509_certificate(Path(first["grpc"]["ca"]).read_bytes())
    for component in weed_process.GRPC_COMPONENTS:
        leaf = x509.load_pem_x509_certificate(Path(first["grpc"][component]["cert"]).read_bytes())
        leaf.verify_directly_issued_by(ca)
        assert Path(first["grpc"][component]["key"]).is_file()
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in config_dir.iterdir()} == {
        name: 0o600 for name in ("security.toml", "grpc-ca.crt", "grpc.crt", "grpc.key")}

    second = tomllib.loads(weed_process.write_security_config(config_dir).read_text())
    assert second["jwt"]["signing"]["key"] not in keys
    assert x509.load_pem_x509_certificate(Path(second["grpc"]["ca"]).read_bytes()) != ca


def test_server_env_drops_settings_that_override_security_toml(monkeypatch):
    monkeypatch.setenv("WEED_JWT_SIGNING_KEY", "")
    monkeypatch.setenv("WEED_JWT_FILER_SIGNING_READ_KEY", "known")
    monkeypatch.setenv("P2ES_KEEP_ME", "1")
    env = weed_process.server_env()
    assert not any(name.startswith("WEED_") for name in env) and env["P2ES_KEEP_ME"] == "1"


@pytest.mark.s3
def test_filer_http_refuses_unsigned_reads_of_s3_objects(s3_store, bucket):
    client(s3_store).put_object(Bucket=bucket, Key="run/manifest.json", Body=PAYLOAD)
    filer = f"http://127.0.0.1:{ports_of(s3_store)['filer']}"
    for path in (f"/buckets/{bucket}/run/manifest.json", f"/buckets/{bucket}/run/", f"/buckets/{bucket}/", "/"):
        status, body, _ = http("GET", filer + path)
        assert status in (0, 401, 403, 404), (path, status)
        assert PAYLOAD not in body and b"manifest.json" not in body, path


@pytest.mark.s3
def test_filer_http_refuses_unsigned_writes(s3_store, bucket):
    s3 = client(s3_store)
    s3.put_object(Bucket=bucket, Key="run/manifest.json", Body=PAYLOAD)
    filer = f"http://127.0.0.1:{ports_of(s3_store)['filer']}"
    body, headers = multipart("evil.json", b"forged")
    status, _, _ = http("POST", f"{filer}/buckets/{bucket}/run/evil.json", body, headers)
    assert status in (0, 401, 403, 404)
    status, _, _ = http("PUT", f"{filer}/buckets/{bucket}/run/manifest.json", b"overwritten")
    assert status in (0, 401, 403, 404)

    with pytest.raises(botocore.exceptions.ClientError) as missing:
        s3.head_object(Bucket=bucket, Key="run/evil.json")
    assert missing.value.response["Error"]["Code"] in ("404", "NoSuchKey")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["run/manifest.json"]
    assert s3.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read() == PAYLOAD


@pytest.mark.s3
def test_master_hands_out_no_volume_tokens(s3_store):
    master = f"http://127.0.0.1:{ports_of(s3_store)['master']}"
    for path in ("/dir/assign", "/dir/lookup?volumeId=1", "/dir/lookup?fileId=1,01637037d6", "/vol/grow?count=1"):
        status, _, headers = http("GET", master + path)
        assert status in (0, 401, 403, 404), (path, status)
        assert "Authorization" not in headers, path


def chunk_file_id(info: objectstore.ObjectStoreInfo, path: str, cwd: Path) -> str:
    """The volume file id of an object's first chunk, asked the way the owner can: weed shell with the certs."""
    ports = ports_of(info)
    result = subprocess.run(
        [str(objectstore.weed_binary()), f"-config_dir={info.state_dir / 'config'}", "shell",
         f"-master=127.0.0.1:{ports['master']}.{ports['master_grpc']}",
         f"-filer=127.0.0.1:{ports['filer']}.{ports['filer_grpc']}"],
        input=f"fs.meta.cat {path}\n", capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "HOME": str(cwd)},
    )
    found = re.search(r'"fileId":\s*"(\d+,[0-9a-f]+)"', result.stdout)
    assert found, result.stdout[-500:] + result.stderr[-500:]
    return found.group(1)


@pytest.mark.s3
def test_volume_server_refuses_unsigned_reads_and_writes(s3_store, bucket, tmp_path):
    s3 = client(s3_store)
    s3.put_object(Bucket=bucket, Key="run/manifest.json", Body=PAYLOAD)
    fid = chunk_file_id(s3_store, f"/buckets/{bucket}/run/manifest.json", tmp_path)
    volume = f"http://127.0.0.1:{ports_of(s3_store)['volume']}"

    status, body, _ = http("GET", f"{volume}/{fid}")
    assert status == 401 and PAYLOAD not in body
    forged, headers = multipart("manifest.json", b"forged")
    assert http("POST", f"{volume}/{fid}", forged, headers)[0] == 401
    assert http("DELETE", f"{volume}/{fid}")[0] == 401
    assert s3.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read() == PAYLOAD


@pytest.mark.s3
def test_grpc_ports_require_the_store_certificate(s3_store, tmp_path):
    grpc = pytest.importorskip("grpc")
    config = s3_store.state_dir / "config"
    ca, cert, key = ((config / name).read_bytes() for name in ("grpc-ca.crt", "grpc.crt", "grpc.key"))
    foreign = weed_process.write_security_config(tmp_path / "foreign").parent
    foreign_cert, foreign_key = (foreign / "grpc.crt").read_bytes(), (foreign / "grpc.key").read_bytes()
    ports = ports_of(s3_store)

    def call(port: int, credentials) -> str:
        target = f"127.0.0.1:{port}"
        with (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)) as channel:
            try:
                channel.unary_unary("/p2es.Probe/Ping")(b"", timeout=10)
            except grpc.RpcError as exc:
                return exc.code().name
        return "OK"

    grpc_ports = {name: ports[name] for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc")}
    grpc_ports["admin_grpc"] = ports["admin"] + weed_process.ADMIN_GRPC_OFFSET
    for name, port in grpc_ports.items():
        assert call(port, None) == "UNAVAILABLE", name
        assert call(port, grpc.ssl_channel_credentials(root_certificates=ca)) == "UNAVAILABLE", name
        assert call(port, grpc.ssl_channel_credentials(ca, foreign_key, foreign_cert)) == "UNAVAILABLE", name
        # With the store's own certificate the same call reaches the server, which knows no such method.
        assert call(port, grpc.ssl_channel_credentials(ca, key, cert)) == "UNIMPLEMENTED", name


@pytest.mark.s3
def test_weed_backup_without_the_certificate_copies_no_volume(s3_store, bucket, tmp_path):
    client(s3_store).put_object(Bucket=bucket, Key="run/manifest.json", Body=PAYLOAD)
    ports = ports_of(s3_store)
    status, body, _ = http("GET", f"http://127.0.0.1:{ports['volume']}/status")
    volume_ids = [volume["Id"] for volume in json.loads(body)["Volumes"]] if status == 200 else [1, 2, 3]
    for volume_id in volume_ids:
        subprocess.run(
            [str(objectstore.weed_binary()), "backup", f"-server=127.0.0.1:{ports['master']}.{ports['master_grpc']}",
             f"-volumeId={volume_id}", f"-dir={tmp_path}"],
            capture_output=True, timeout=60, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
        )
    copied = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert not [path for path in copied if path.suffix == ".dat"]
    assert not [path for path in copied if PAYLOAD in path.read_bytes()]


@pytest.mark.s3
def test_s3_still_round_trips(s3_store, s3_bucket, bucket):
    s3 = client(s3_store)
    big = os.urandom(11 * 1024 * 1024)  # random, so weed cannot compress it: several chunks, multipart upload
    transfer = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_fileobj(io.BytesIO(big), bucket, "shards/big.bin", Config=transfer)
    assert s3.get_object(Bucket=bucket, Key="shards/big.bin")["Body"].read() == big
    ranged = s3.get_object(Bucket=bucket, Key="shards/big.bin", Range="bytes=6291450-6291459")["Body"].read()
    assert ranged == big[6291450:6291460]
    s3.copy_object(Bucket=bucket, Key="shards/copy.bin", CopySource={"Bucket": bucket, "Key": "shards/big.bin"})
    assert s3.head_object(Bucket=bucket, Key="shards/copy.bin")["ContentLength"] == len(big)

    uri.write_bytes_atomic(f"{s3_bucket}/run/manifest.json", PAYLOAD)
    assert uri.read_bytes(f"{s3_bucket}/run/manifest.json") == PAYLOAD
    listed = {Path(path).name for path in uri.ls(f"{s3_bucket}/shards")}
    assert listed == {"big.bin", "copy.bin"}
    uri.rm(f"{s3_bucket}/shards", recursive=True)
    assert not uri.exists(f"{s3_bucket}/shards/big.bin")


@pytest.mark.s3
def test_store_started_without_security_config_is_secured_on_next_start(tmp_path, monkeypatch):
    state = tmp_path / "store"
    # Launch it the way the store ran before it had a security.toml, and show the hole is real.
    original = objectstore._command
    monkeypatch.setattr(objectstore, "write_security_config", lambda config_dir: None)
    monkeypatch.setattr(objectstore, "_command", lambda *a: [x for x in original(*a) if x != "-disableHttp"])
    legacy = objectstore.start(state, port=0, timeout=120)
    try:
        client(legacy).create_bucket(Bucket="legacy")
        client(legacy).put_object(Bucket="legacy", Key="run/manifest.json", Body=PAYLOAD)
        filer = f"http://127.0.0.1:{ports_of(legacy)['filer']}/buckets/legacy/run/manifest.json"
        assert http("GET", filer)[:2] == (200, PAYLOAD)
        assert not (state / "config" / "security.toml").exists()
        monkeypatch.undo()

        secured = objectstore.start(state, timeout=120)  # finds it running, unsecured: relaunches it
        assert secured.pid != legacy.pid
        # Same credentials; the same ports too unless another process took one meanwhile (then new ones).
        assert secured.secret_access_key == legacy.secret_access_key
        assert stat.S_IMODE((state / "config" / "security.toml").stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        filer = f"http://127.0.0.1:{ports_of(secured)['filer']}/buckets/legacy/run/manifest.json"
        status, body, _ = http("GET", filer)
        assert status in (0, 401, 403, 404) and PAYLOAD not in body
        assert client(secured).get_object(Bucket="legacy", Key="run/manifest.json")["Body"].read() == PAYLOAD
        assert objectstore.start(state).pid == secured.pid  # secured now: found, not relaunched
    finally:
        objectstore.stop(state)
