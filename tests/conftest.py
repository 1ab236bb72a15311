"""Shared fixtures. Real PhysioNet data lives in ../shared/data; tests that need it skip when it is absent."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_s3 import *  # noqa: F403 (pytest discovers the s3_store and s3_bucket fixtures by name)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
NO_DATA_REASON = f"real PhysioNet data not found at {DATA_ROOT} (see ../shared/data/DATA.md)"



# The unit lane (`make test-fast`): `-m "not ray and not s3 and not real_data and not slow"`, and P2ES_FAST=1 so that a
# test reaching ../shared/data through a helper the marking below cannot see still skips instead of reading it.
FAST = os.environ.get("P2ES_FAST") == "1"
# Fixtures (anywhere in a test's fixture closure) that put it in a lane: Ray, the object store, real data.
FIXTURE_MARKS = {"ray_local": ("ray", "s3"), "s3_store": ("s3",), "s3_bucket": ("s3",), "data_root": ("real_data",),
                 "bidmc_batch": ("real_data",), "multinode_cluster": ("ray", "s3", "multinode")}
# Calls in a test's (or one of its fixtures') own source that read ../shared/data.
DATA_CALLS = ("require_data(", "bidmc_windows_table(")


def _calls_data(function, cache: dict) -> bool:
    if function not in cache:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            source = ""
        cache[function] = any(call in source for call in DATA_CALLS)
    return cache[function]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a unit test of more than ~5 s on 2 cores (DeepSpeed engines in "
                            "subprocesses, bootstraps, retry back-offs); in `make test`, not in `make test-fast`")
    config.addinivalue_line("markers", "multinode: starts a Ray cluster of several nodes on this machine "
                            "(tests/test_multinode.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the `ray`, `s3` and `real_data` markers from what a test uses, so `-m` can select the lanes."""
    cache: dict = {}
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        marks = {mark for name in names & set(FIXTURE_MARKS) for mark in FIXTURE_MARKS[name]}
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for definitions in (getattr(info, "name2fixturedefs", None) or {}).values():
            functions += [getattr(definition, "func", None) for definition in definitions]
        if any(_calls_data(function, cache) for function in functions if function is not None):
            marks.add("real_data")
        for mark in sorted(marks - {m.name for m in item.iter_markers()}):
            item.add_marker(mark)


def require_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the calling test with a reason (always, under P2ES_FAST=1)."""
    if FAST:
        pytest.skip("P2ES_FAST=1: the unit lane does not read ../shared/data")
    path = DATA_ROOT.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{NO_DATA_REASON}; needs {'/'.join(parts)}")
    return path


@pytest.fixture()
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only waits for a busy core (tens of
    times slower on a loaded machine). Restores the count after (benches set one thread for the process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_local(s3_store):
    """One local Ray runtime per test module (starting Ray costs seconds).

    Not one for the whole session: in two fresh-clone `make test` runs, a Ray kept for the whole suite lost
    its GCS ~16 min after it started (during Ray Train's teardown in test_train.py; no OOM, no crash trace),
    and 60 s later Ray's core worker ended pytest with exit code 1 and no summary. The same modules on a
    fresh Ray pass.

    It depends on the object store so that the S3 endpoint and credentials are in the environment
    before Ray starts: its worker processes inherit the environment of that moment. It is this session's
    own instance, as the jobs start theirs (`start_local_ray`): RAY_ADDRESS names it while it runs, so
    Ray's helpers never pick another Ray on the machine.
    """
    from p2es_dist.jobs.common import start_local_ray, stop_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    yield
    stop_local_ray()


@pytest.fixture(scope="session")
def data_root() -> Path:
    return require_data()


def bidmc_windows_table(n_windows: int = 32, records: tuple[str, ...] = ("bidmc_01", "bidmc_02"), *,
                        all_leads: bool = False):
    """Real BIDMC windows through the ingest path (reader -> preprocessing -> shard table).

    Ingest keeps lead II alone (BIDMC scaled each lead on its own); `all_leads` keeps II and aVR anyway,
    for tests of mechanics that need a second recorded lead (e.g. scoring the leads not given as input).
    """
    from p2es_dist.data.ingest_core import record_to_table
    from p2es_dist.data.preprocess import PreprocessConfig
    from p2es_dist.data.sources import bidmc

    root = require_data("bidmc")
    per_record = -(-n_windows // len(records))
    tables = []
    for name in records:
        record = bidmc.read_record(root, f"bidmc_csv/{name}")
        record.leads_scaled_separately = not all_leads
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
