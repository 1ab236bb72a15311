"""The one reader of window shard folders: manifests -> shard paths -> Arrow tables or a Ray Dataset.

    filesystem, paths = shard_paths(["s3://p2es/bidmc"])                    # what the manifests list
    table = read_table(uris, ["window_id", "ecg"], split="test", subset=500)  # pyarrow, in this process
    for table in iter_tables(uris, columns, split="train", limit=1000): ...   # pyarrow, streamed
    dataset = read_windows(uris, columns, split="train")                     # Ray Data, for training

Shards are found through each folder's `manifest.json`, never by listing the folder, so a shard of an
interrupted ingest is never read. The split is a filter pushed down into the Parquet scan. Rows come in
shard order (manifest order, then row order within a shard). `option` names the setting the user gave
the folders with (`data.uris` in configs, `--data` on command lines), so errors point at it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.dataset as ds

from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib

Split = str | Sequence[str] | None  # one split, several, or None / "all" for every row


def manifest_bytes(folder: str, *, option: str = "data.uris") -> bytes:
    """The raw `manifest.json` of a shard folder (its bytes identify the data, e.g. for cache keys)."""
    manifest_uri = uri_lib.join(folder, "manifest.json")
    if not uri_lib.exists(manifest_uri):
        raise UserError(f"{option}: {folder} has no manifest.json (not an ingest output, or unfinished)")
    return uri_lib.read_bytes(manifest_uri)


def read_manifest(folder: str, *, option: str = "data.uris") -> dict:
    return json.loads(manifest_bytes(folder, option=option))


def shard_paths(uris: Sequence[str], *, option: str = "data.uris") -> tuple[pa.fs.FileSystem, list[str]]:
    """The pyarrow filesystem and every shard path listed by the manifests under `uris`."""
    filesystem, paths, _ = manifest_shards(uris, option=option)
    return filesystem, paths


def manifest_shards(uris: Sequence[str], *,
                    option: str = "data.uris") -> tuple[pa.fs.FileSystem, list[str], list[int | None]]:
    """`shard_paths` and the rows of each shard as the manifests list them (None where a manifest written
    by hand leaves them out), reading each manifest once."""
    if not uris:
        raise UserError(f"{option}: expected at least one shard folder (the --output of `p2es ingest`)")
    if len({uri_lib.is_s3(u) for u in uris}) > 1:
        raise UserError(f"{option}: mix local folders and s3:// in separate runs, got {list(uris)}")
    filesystem, paths, rows = None, [], []
    for folder in uris:
        for shard in read_manifest(folder, option=option)["shards"]:
            fs, path = uri_lib.pyarrow_filesystem(uri_lib.join(folder, shard["path"]))
            filesystem = filesystem or fs
            paths.append(path)
            rows.append(int(shard["rows"]) if "rows" in shard else None)
    if not paths:
        raise UserError(f"{option}: the manifests under {list(uris)} list no shards")
    return filesystem, paths, rows


def calibration_state(uris: Sequence[str]) -> tuple[bool, bool]:
    """(`calibration_available`, `calibration_present`) from one read of each manifest."""
    manifest_uris = [uri_lib.join(u, "manifest.json") for u in uris]
    if not manifest_uris or not all(uri_lib.exists(m) for m in manifest_uris):
        return False, False  # `shard_paths` names the folder without a manifest
    manifests = [json.loads(uri_lib.read_text(m)) for m in manifest_uris]
    available = min(m.get("schema_version", 1) for m in manifests) >= 2
    # A shard whose manifest does not count its calibrated rows (older, hand-written) may have some.
    present = available and any(shard.get("calibrated_rows", 1) > 0 for m in manifests for shard in m["shards"])
    return available, present


def calibration_available(uris: Sequence[str]) -> bool:
    """Whether every shard folder under `uris` carries beat timing and calibration (shard schema >= 2)."""
    return calibration_state(uris)[0]


def calibration_present(uris: Sequence[str]) -> bool:
    """Whether some shard under `uris` may hold a calibration beat: shard schema >= 2 and a manifest that
    counts rows with one (`calibrated_rows`, written by ingest) above zero, or does not count them."""
    return calibration_state(uris)[1]


def _splits(split: Split) -> list[str] | None:
    if split is None or split == "all":
        return None
    return [split] if isinstance(split, str) else list(split)


def split_filter(split: Split) -> ds.Expression | None:
    """The pyarrow row filter of `split` (None: every row)."""
    splits = _splits(split)
    if splits is None:
        return None
    return ds.field("split") == splits[0] if len(splits) == 1 else ds.field("split").isin(splits)


def _both(a: ds.Expression | None, b: ds.Expression | None) -> ds.Expression | None:
    return b if a is None else a if b is None else a & b


def subset_key(window_id: str) -> bytes:
    return hashlib.blake2b(window_id.encode(), digest_size=8).digest()


def read_table(uris: Sequence[str], columns: Sequence[str] | None, *, split: Split = None,
               where: ds.Expression | None = None, subset: int | None = None, optional: Sequence[str] = (),
               option: str = "data.uris") -> pa.Table:
    """`columns` (None: all) of the rows of `split` that pass `where`, in shard order, with pyarrow.

    `optional` columns are read besides where the shards have them. With `subset`, only the `subset`
    windows whose ids hash lowest (blake2b) are kept: a deterministic subset spread over records and
    subjects (the first N ids would all come from one record), and stable when windows are added (a
    larger N keeps every window of a smaller one).
    """
    filesystem, paths = shard_paths(uris, option=option)
    row_filter = _both(split_filter(split), where)
    with uri_lib.storage_errors(",".join(uris)):
        dataset = ds.dataset(paths, filesystem=filesystem, format="parquet")
        if columns is not None:
            columns = list(columns) + [c for c in optional if c in dataset.schema.names and c not in columns]
        if subset is not None:
            ids = dataset.to_table(columns=["window_id"], filter=row_filter).column("window_id").to_pylist()
            if subset < len(ids):
                chosen = pa.array(sorted(ids, key=subset_key)[:subset], pa.string())
                row_filter = _both(row_filter, ds.field("window_id").isin(chosen))
        return dataset.to_table(columns=columns, filter=row_filter)


def iter_tables(uris: Sequence[str], columns: Sequence[str], *, split: Split = None, limit: int | None = None,
                batch_size: int = 64, option: str = "data.uris") -> Iterator[pa.Table]:
    """The first `limit` rows of `split` (all without a limit) in shard order, streamed as tables of
    `batch_size` rows (the last one shorter); only a batch's worth is held in memory."""
    filesystem, paths = shard_paths(uris, option=option)
    left = math.inf if limit is None else limit
    pending: list[pa.RecordBatch] = []
    with uri_lib.storage_errors(",".join(uris)):
        dataset = ds.dataset(paths, filesystem=filesystem, format="parquet")
        scan = dataset.to_batches(columns=list(columns), filter=split_filter(split), batch_size=batch_size)
        for record_batch in scan:
            pending.append(record_batch.slice(0, int(min(left, record_batch.num_rows))))
            left -= pending[-1].num_rows
            table = pa.Table.from_batches(pending)
            whole = len(table) // batch_size * batch_size
            for start in range(0, whole, batch_size):
                yield table.slice(start, batch_size).combine_chunks()
            pending = table.slice(whole).to_batches()
            if left <= 0:
                break
        if pending and sum(b.num_rows for b in pending):
            yield pa.Table.from_batches(pending).combine_chunks()


def read_windows(uris: Sequence[str], columns: Sequence[str], *, split: Split = None, min_quality: float = 0.0,
                 include_paths: bool = False, option: str = "data.uris"):
    """Shard rows as a Ray Dataset, filtered to a split (pushed down into the Parquet scan). `include_paths`
    adds each row's shard as `path`, for errors that name it. Planned from the manifests alone
    (`data/ray_source.ShardSource`)."""
    import ray.data

    from p2es_dist.data.ray_source import ShardSource, read_task_count

    row_filter = split_filter(split)
    if min_quality > 0:
        row_filter = _both(row_filter, ds.field("quality") >= min_quality)
    filesystem, paths, rows = manifest_shards(uris, option=option)
    with uri_lib.storage_errors(",".join(uris)):
        source = ShardSource(filesystem, paths, rows, columns, row_filter=row_filter, include_paths=include_paths)
    return ray.data.read_datasource(source, override_num_blocks=read_task_count(len(paths)))
