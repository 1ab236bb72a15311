"""Storage URIs: the same operations on local paths, file:// and a real S3 store; one-line errors."""

from __future__ import annotations

import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2es_dist.errors import UserError
from p2es_dist.storage import uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_join_and_is_s3(tmp_path):
    assert uri.join("s3://bucket", "a", "b.parquet") == "s3://bucket/a/b.parquet"
    assert uri.join("s3://bucket/prefix/", "/a/", "b") == "s3://bucket/prefix/a/b"
    assert uri.join("file:///tmp/x", "y") == "file:///tmp/x/y"
    assert uri.join(str(tmp_path), "y", "z") == os.path.join(str(tmp_path), "y", "z")
    assert uri.is_s3("s3://b/k") and not uri.is_s3("/tmp/x") and not uri.is_s3("file:///tmp/x")


def test_bad_uris_are_user_errors():
    with pytest.raises(UserError, match="unsupported URI scheme 'gs'"):
        uri.filesystem("gs://bucket/x")
    with pytest.raises(UserError, match="needs a bucket"):
        uri.filesystem("s3:///x")


def round_trip(base: str) -> None:
    """Everything a job does with its output location, asserted identically for every backend."""
    uri.ensure_bucket(base)
    payload = bytes(range(256)) * 64
    uri.write_bytes_atomic(uri.join(base, "shards", "b.bin"), payload)
    uri.write_bytes_atomic(uri.join(base, "shards", "a.bin"), b"first")
    uri.write_bytes_atomic(uri.join(base, "shards", "a.bin"), b"second")  # replaces whole
    uri.write_text_atomic(uri.join(base, "shards", "c.json"), '{"rows": 3}')
    assert uri.read_bytes(uri.join(base, "shards", "b.bin")) == payload
    assert uri.read_bytes(uri.join(base, "shards", "a.bin")) == b"second"
    assert uri.read_text(uri.join(base, "shards", "c.json")) == '{"rows": 3}'

    shards = uri.join(base, "shards")
    assert uri.ls(shards) == [uri.join(shards, n) for n in ("a.bin", "b.bin", "c.json")]
    assert uri.ls(shards, ".bin") == [uri.join(shards, "a.bin"), uri.join(shards, "b.bin")]
    assert uri.ls(uri.join(base, "nothing-here"), missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        uri.ls(uri.join(base, "nothing-here"))

    # A failed atomic write leaves neither the object nor a temp file; a good one commits.
    with pytest.raises(RuntimeError), uri.atomic_output(uri.join(shards, "broken.parquet")) as f:
        f.write(b"partial bytes")
        raise RuntimeError("writer died")
    assert not uri.exists(uri.join(shards, "broken.parquet"))
    table = pa.table({"window_id": ["x:1:0", "x:1:512"], "quality": pa.array([0.5, 1.0], pa.float32())})
    with uri.atomic_output(uri.join(shards, "d.parquet")) as f:
        pq.write_table(table, f)
    with uri.open_input(uri.join(shards, "d.parquet")) as f:
        assert pq.read_table(f).equals(table)
    fs, path = uri.pyarrow_filesystem(uri.join(shards, "d.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert len(uri.ls(shards)) == 4  # a, b, c, d: no leftovers

    with pytest.raises(uri.MissingObjectError) as caught:
        uri.read_bytes(uri.join(shards, "absent.bin"))
    assert isinstance(caught.value, UserError) and "absent.bin" in str(caught.value)

    uri.rm(uri.join(shards, "a.bin"))
    uri.rm(uri.join(shards, "a.bin"))  # already gone: fine
    assert not uri.exists(uri.join(shards, "a.bin")) and uri.exists(uri.join(shards, "b.bin"))
    uri.rm(shards, recursive=True)
    assert uri.ls(shards, missing_ok=True) == []


def test_local_round_trip(tmp_path):
    round_trip(str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == []  # no temp files anywhere


def test_file_uri_round_trip(tmp_path):
    round_trip(f"file://{tmp_path}/out")
    uri.write_bytes_atomic(f"file://{tmp_path}/x.bin", b"1")
    assert (tmp_path / "x.bin").read_bytes() == b"1"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(uri.TMP_SUFFIX)] == []


@pytest.mark.s3
def test_s3_round_trip(s3_bucket):
    round_trip(uri.join(s3_bucket, "run1"))


@pytest.mark.s3
def test_s3_pyarrow_filesystem_writes(s3_bucket):
    fs, path = uri.pyarrow_filesystem(uri.join(s3_bucket, "t.parquet"))
    pq.write_table(pa.table({"a": [1, 2, 3]}), path, filesystem=fs)
    assert uri.ls(s3_bucket) == [uri.join(s3_bucket, "t.parquet")]
    with uri.open_input(uri.join(s3_bucket, "t.parquet")) as f:
        assert pq.read_table(f).column("a").to_pylist() == [1, 2, 3]


@pytest.mark.s3
def test_s3_missing_bucket_and_bad_secret(s3_store, monkeypatch):
    with pytest.raises(uri.MissingObjectError, match="bucket 'no-such-bucket-p2es' does not exist"):
        uri.read_bytes("s3://no-such-bucket-p2es/x")
    uri.ensure_bucket("s3://p2es-denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-SENTINEL")
    with pytest.raises(UserError) as caught:
        uri.write_bytes_atomic("s3://p2es-denied/x", b"1")
    message = str(caught.value)
    assert "permission denied" in message and "SENTINEL" not in message and "\n" not in message
    monkeypatch.undo()
    uri.rm("s3://p2es-denied", recursive=True)


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line_without_secret(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "P2ESTESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SENTINEL-secret-never-shown")
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as caught:
        uri.read_bytes("s3://bucket/manifest.json", endpoint_url=endpoint)
    message = str(caught.value)
    assert endpoint in message and "p2es objectstore start" in message
    assert "SENTINEL" not in message and "\n" not in message

    # The same translation for pyarrow.fs calls that other modules make themselves.
    fs, path = uri.pyarrow_filesystem("s3://bucket/x", endpoint_url=endpoint)
    with pytest.raises(UserError, match="cannot reach"), uri.storage_errors("s3://bucket/x", endpoint_url=endpoint):
        fs.get_file_info(path)
