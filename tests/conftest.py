"""Shared fixtures. Real PhysioNet data lives in ../shared/data; tests that need it skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_s3 import *  # noqa: F403 (pytest discovers the s3_store and s3_bucket fixtures by name)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
NO_DATA_REASON = f"real PhysioNet data not found at {DATA_ROOT} (see ../shared/data/DATA.md)"



def require_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test with a reason."""
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{NO_DATA_REASON}; needs {'/'.join(parts)}")
    return path


@pytest.fixture(scope="session")
def ray_local(s3_store):
    """One local Ray runtime for the whole session (starting Ray costs seconds).

    It depends on the object store so that the S3 endpoint and credentials are in the environment
    before Ray starts: its worker processes inherit the environment of that moment.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def data_root() -> Path:
    return require_data()


def bidmc_windows_table(n_windows: int = 32, records: tuple[str, ...] = ("bidmc_01", "bidmc_02")):
    """Real BIDMC windows through the ingest path (reader -> preprocessing -> shard table)."""
    from p2es_dist.data.ingest_core import record_to_table
    from p2es_dist.data.preprocess import PreprocessConfig
    from p2es_dist.data.sources import bidmc

    root = require_data("bidmc")
    per_record = -(-n_windows // len(records))
    tables = []
    for name in records:
        record = bidmc.read_record(root, f"bidmc_csv/{name}")
        table, _ = record_to_table(record, PreprocessConfig())
        tables.append(table.slice(0, per_record))
    import pyarrow as pa

    return pa.concat_tables(tables).slice(0, n_windows)


@pytest.fixture(scope="session")
def bidmc_batch() -> dict[str, torch.Tensor]:
    """32 real BIDMC windows (PPG + lead II and aVR) in model space, as the loader yields them."""
    from p2es_dist.data.batches import table_to_batch

    batch = table_to_batch(bidmc_windows_table(32))
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}
