"""The embedded object store: lifecycle through the API and `p2es objectstore`, readiness, errors, capacity."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
from pathlib import Path

import boto3
import pytest

from p2es_dist.errors import UserError
from p2es_dist.storage import objectstore, weed_process

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = shlex.split(value)[0]
    return env


def s3_client(env: dict[str, str]):
    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
    )


def test_default_state_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("P2ES_OBJECTSTORE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert objectstore.default_state_dir() == tmp_path / "cache" / "p2es" / "objectstore"
    monkeypatch.setenv("P2ES_OBJECTSTORE_DIR", str(tmp_path / "explicit"))
    assert objectstore.default_state_dir() == tmp_path / "explicit"


def test_weed_binary_comes_from_the_wheel():
    weed = objectstore.weed_binary()
    assert weed.name == "weed" and os.access(weed, os.X_OK)


def test_identities_template_matches_generated_config(tmp_path):
    objectstore._credentials(tmp_path)
    generated = json.loads((tmp_path / "s3.json").read_text())["identities"][0]
    template = json.loads((REPO_ROOT / "infra/objectstore/s3.identities.template.json").read_text())
    expected = template["identities"][0]
    assert generated["name"] == expected["name"] and generated["actions"] == expected["actions"]
    assert set(generated["credentials"][0]) == set(expected["credentials"][0])
    assert stat.S_IMODE((tmp_path / "s3.json").stat().st_mode) == 0o600


@pytest.mark.s3
def test_api_status_and_idempotent_start(s3_store):
    state = s3_store.state_dir
    found = objectstore.status(state)
    assert found == s3_store
    again = objectstore.start(state)
    assert again.pid == s3_store.pid and again.endpoint == s3_store.endpoint
    assert again.secret_access_key == s3_store.secret_access_key
    assert s3_store.endpoint.startswith("http://127.0.0.1:")
    assert s3_store.secret_access_key not in repr(s3_store)
    assert stat.S_IMODE((state / "s3.json").stat().st_mode) == 0o600
    # Its own process group, so the caller's terminal signals do not reach it.
    assert os.getpgid(s3_store.pid) == s3_store.pid != os.getpgid(0)


@pytest.mark.s3
def test_running_reuses_a_store_without_stopping_it(s3_store):
    with objectstore.running(s3_store.state_dir) as info:
        assert info.pid == s3_store.pid
    assert objectstore.status(s3_store.state_dir) is not None


@pytest.mark.s3
def test_many_buckets(s3_store):
    """Each bucket is a SeaweedFS collection with its own volume: -volume.max must leave room for many."""
    client = s3_client(s3_store.env())
    names = [f"many-{i:02d}-{s3_store.pid}" for i in range(20)]
    for i, name in enumerate(names):
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="k", Body=f"payload {i}".encode())
    for i, name in enumerate(names):
        assert client.get_object(Bucket=name, Key="k")["Body"].read() == f"payload {i}".encode()
    listed = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert set(names) <= listed
    for name in names:
        client.delete_object(Bucket=name, Key="k")
        client.delete_bucket(Bucket=name)


@pytest.mark.s3
def test_log_never_holds_the_secret(s3_store):
    logs = [s3_store.log_path, *(s3_store.state_dir / "logs").iterdir()]
    for path in logs:
        if path.is_file():
            assert s3_store.secret_access_key not in path.read_text(errors="replace"), path


@pytest.mark.s3
def test_cli_lifecycle_and_persistence(tmp_path, capsys):
    state = tmp_path / "store"
    assert objectstore.main(["start", "--dir", str(state), "--port", "0"]) == 0
    first = capsys.readouterr().out
    env = parse_exports(first)
    assert set(env) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    pid = objectstore.status(state).pid
    try:
        client = s3_client(env)
        client.create_bucket(Bucket="kept")
        client.put_object(Bucket="kept", Key="a/b.txt", Body=b"survives a restart")

        assert objectstore.main(["start", "--dir", str(state)]) == 0  # already running: same exports
        assert parse_exports(capsys.readouterr().out) == env

        assert objectstore.main(["status", "--dir", str(state)]) == 0
        out = capsys.readouterr().out
        assert str(pid) in out and env["AWS_ENDPOINT_URL"] in out
        assert env["AWS_SECRET_ACCESS_KEY"] not in out
    finally:
        assert objectstore.main(["stop", "--dir", str(state)]) == 0
    assert f"pid {pid}" in capsys.readouterr().out
    assert not (state / "weed.pid").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert objectstore.main(["status", "--dir", str(state)]) == 1
    assert "not running" in capsys.readouterr().out
    assert objectstore.main(["stop", "--dir", str(state)]) == 0
    assert "not running" in capsys.readouterr().out

    # Restart on the same state: same credentials and endpoint, the data is still there; `running`
    # started it, so it stops it.
    with objectstore.running(state) as info:
        assert info.env()["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
        assert info.endpoint == env["AWS_ENDPOINT_URL"]
        body = s3_client(info.env()).get_object(Bucket="kept", Key="a/b.txt")["Body"].read()
        assert body == b"survives a restart"
    assert objectstore.status(state) is None


def test_busy_port_is_a_user_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} .* in use"):
            objectstore.start(tmp_path / "store", port=port)
    assert not (tmp_path / "store" / "weed.pid").exists()


def test_missing_binary_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("P2ES_WEED_BIN", str(tmp_path / "no-such-weed"))
    with pytest.raises(UserError, match="P2ES_WEED_BIN"):
        objectstore.start(tmp_path / "store", port=0)


@pytest.mark.s3
def test_not_ready_by_deadline_cleans_up(tmp_path):
    state = tmp_path / "store"
    with pytest.raises(UserError) as caught:
        objectstore.start(state, port=0, timeout=0)
    message = str(caught.value)
    assert "\n" not in message and str(state / "weed.log") in message
    secret = json.loads((state / "s3.json").read_text())["identities"][0]["credentials"][0]["secretKey"]
    assert secret not in message
    assert objectstore.status(state) is None and not (state / "weed.pid").exists()
    assert weed_processes_serving(state) == []


def weed_processes_serving(state: Path) -> list[int]:
    """Pids of live weed processes whose command line names this state's data dir (Linux /proc)."""
    needle = f"-dir={state / 'data'}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "cmdline").read_bytes().split(b"\0") and weed_process.alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
