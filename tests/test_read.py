"""data/read.py, the one shard reader: manifests, split filter, row filter, subset determinism, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from p2es_dist.data.folds import read_all_windows
from p2es_dist.data.read import (
    calibration_available,
    calibration_present,
    iter_tables,
    read_manifest,
    read_table,
    shard_paths,
    subset_key,
)
from p2es_dist.errors import UserError


def _rows(prefix: str, n: int, splits: tuple[str, ...] = ("train", "val", "test")) -> pa.Table:
    return pa.table({
        "window_id": [f"{prefix}-{i:03d}" for i in range(n)],
        "split": [splits[i % len(splits)] for i in range(n)],
        "quality": [i / n for i in range(n)],
    })


def _write_folder(folder: Path, shards: dict[str, pa.Table], *, schema_version: int = 1,
                  unlisted: pa.Table | None = None) -> str:
    """A shard folder like an ingest output; `unlisted` is a shard on disk that the manifest does not name
    (an interrupted ingest's leftover)."""
    (folder / "shards").mkdir(parents=True)
    for name, table in shards.items():
        pq.write_table(table, folder / "shards" / name)
    if unlisted is not None:
        pq.write_table(unlisted, folder / "shards" / "zz-unlisted.parquet")
    manifest = {"schema_version": schema_version, "shards": [{"path": f"shards/{name}"} for name in shards]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def _ids(table: pa.Table) -> list[str]:
    return table.column("window_id").to_pylist()


@pytest.fixture
def two_folders(tmp_path) -> list[str]:
    # Manifest order (b before a) differs from file-name order: rows must follow the manifest.
    first = _write_folder(tmp_path / "one", {"b.parquet": _rows("b", 7), "a.parquet": _rows("a", 5)},
                          unlisted=_rows("ghost", 4))
    second = _write_folder(tmp_path / "two", {"c.parquet": _rows("c", 6)}, schema_version=2)
    return [first, second]


def test_manifests_resolve_to_listed_shards_in_manifest_order(two_folders):
    _, paths = shard_paths(two_folders)
    assert [Path(p).name for p in paths] == ["b.parquet", "a.parquet", "c.parquet"]
    everything = _ids(read_table(two_folders, ["window_id"]))
    expected = _ids(_rows("b", 7)) + _ids(_rows("a", 5)) + _ids(_rows("c", 6))
    assert everything == expected  # shard order; the unlisted shard is never read
    assert read_manifest(two_folders[1])["schema_version"] == 2


def test_split_and_row_filters(two_folders):
    train = read_table(two_folders, ["window_id", "split"], split="train")
    assert set(train.column("split").to_pylist()) == {"train"} and len(train) == 3 + 2 + 2
    both = read_table(two_folders, ["window_id"], split=["train", "val"])
    assert len(both) == 18 - len(read_table(two_folders, ["window_id"], split="test"))
    assert len(read_table(two_folders, ["window_id"], split="all")) == 18
    good = read_table(two_folders, ["window_id", "quality"], split="train", where=ds.field("quality") >= 0.5)
    assert _ids(good) == ["b-006", "a-003", "c-003"]
    # optional columns come along only where the shards have them
    table = read_table(two_folders, ["window_id"], optional=["quality", "record"])
    assert table.column_names == ["window_id", "quality"]


def test_subset_is_the_lowest_hashes_and_nested(two_folders):
    test_ids = _ids(read_table(two_folders, ["window_id"], split="test"))
    small = _ids(read_table(two_folders, ["window_id"], split="test", subset=3))
    larger = _ids(read_table(two_folders, ["window_id"], split="test", subset=4))
    assert set(small) == set(sorted(test_ids, key=subset_key)[:3])
    assert set(small) < set(larger) and small == _ids(read_table(two_folders, ["window_id"], split="test", subset=3))
    assert _ids(read_table(two_folders, ["window_id"], split="test", subset=100)) == test_ids


def test_iter_tables_streams_the_first_rows_in_fixed_batches(two_folders):
    train = _ids(read_table(two_folders, ["window_id"], split="train"))
    batches = list(iter_tables(two_folders, ["window_id"], split="train", batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]  # batches span shard boundaries
    assert [i for b in batches for i in _ids(b)] == train
    limited = list(iter_tables(two_folders, ["window_id"], split="train", limit=4, batch_size=3))
    assert [i for b in limited for i in _ids(b)] == train[:4]
    assert list(iter_tables(two_folders, ["window_id"], split="train", limit=0)) == []


def test_missing_manifest_and_empty_folders_are_clear_errors(tmp_path, two_folders):
    with pytest.raises(UserError, match=r"^data.uris: .*nowhere has no manifest.json"):
        shard_paths([two_folders[0], str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=r"^--data: .*nowhere has no manifest.json"):
        read_table([str(tmp_path / "nowhere")], ["window_id"], option="--data")
    with pytest.raises(UserError, match=r"^data.uris: expected at least one shard folder"):
        shard_paths([])
    with pytest.raises(UserError, match=r"^data.uris: mix local folders and s3://"):
        shard_paths([two_folders[0], "s3://bucket/shards"])
    empty = _write_folder(tmp_path / "empty", {})
    with pytest.raises(UserError, match="list no shards"):
        shard_paths([empty])
    with pytest.raises(UserError, match=r"^--data: .*nowhere has no manifest.json"):
        read_all_windows(str(tmp_path / "nowhere"))


def test_calibration_needs_every_folder_at_schema_two(two_folders, tmp_path):
    assert calibration_available(two_folders[1:]) and not calibration_available(two_folders)
    assert not calibration_available([]) and not calibration_available([str(tmp_path / "nowhere")])


def test_calibration_is_present_unless_every_shard_counts_none(tmp_path):
    folder = Path(_write_folder(tmp_path / "f", {"a.parquet": _rows("a", 3), "b.parquet": _rows("b", 3)},
                                schema_version=2))
    assert calibration_present([str(folder)])  # not counted (a manifest older than the count): maybe
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard, count in zip(manifest["shards"], (0, 2), strict=True):
        shard["calibrated_rows"] = count
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert calibration_present([str(folder)])
    manifest["shards"][1]["calibrated_rows"] = 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert not calibration_present([str(folder)]) and calibration_available([str(folder)])


def test_read_all_windows_is_the_whole_folder(two_folders):
    manifest, table = read_all_windows(two_folders[0])
    assert len(manifest["shards"]) == 2 and _ids(table) == _ids(_rows("b", 7)) + _ids(_rows("a", 5))
    assert table.column_names == ["window_id", "split", "quality"]
