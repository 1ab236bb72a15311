"""Pytest fixtures for tests that need S3: one real embedded object store per session, a fresh bucket per test.

`tests/conftest.py` does `from fixtures_s3 import *`, and marks every test using them `s3` (see its
`pytest_collection_modifyitems`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from p2es_dist.storage import objectstore, uri

__all__ = ["s3_store", "s3_bucket"]


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[objectstore.ObjectStoreInfo]:
    """A running store in a temp state dir, its AWS_* variables set in os.environ for the session."""
    state_dir = tmp_path_factory.mktemp("objectstore")
    # Any free port, so a developer's own store on 8333 is left alone; generous timeout for 2-core CI.
    info = objectstore.start(state_dir, port=0, timeout=120)
    env = info.env()
    saved = {name: os.environ.get(name) for name in (*env, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    for name in saved:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield info
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        objectstore.stop(state_dir)


@pytest.fixture
def s3_bucket(s3_store: objectstore.ObjectStoreInfo) -> Iterator[str]:
    """`s3://<fresh bucket>`, removed with its contents afterwards (frees its volume)."""
    bucket = f"s3://test-{uuid.uuid4().hex[:16]}"
    uri.ensure_bucket(bucket)
    yield bucket
    uri.rm(bucket, recursive=True)
