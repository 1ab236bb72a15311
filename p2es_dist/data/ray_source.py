"""Window shards as a Ray Data source, planned from the manifests (`data/read.read_windows` builds it).

Ray's own Parquet reader lists the files and samples their footers at every execution, i.e. in every
epoch: 12 s of a 25 s pass over 100 shards of 500 windows on 2 cores (`p2es bench data`). The manifests
already say which shards there are and how many rows each holds, so planning here reads one footer (for
the schema) and costs the same at 100 or 10,000 shards.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from p2es_dist.errors import UserError

# Read tasks per cluster CPU. Each task reads its shards one after the other and yields a block per shard, so
# fewer tasks than shards costs no streaming; fewer tasks cost less scheduling: on 2 cores, one task per
# shard (100 tasks) ran one at a time at ~3,500 windows/s, 4 tasks ran two at a time at ~5,500/s.
TASKS_PER_CPU = 2


def read_task_count(shards: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(shards, TASKS_PER_CPU * cpus))


def scan_shards(filesystem: pa.fs.FileSystem, paths: Sequence[str], columns: Sequence[str],
                row_filter: ds.Expression | None, include_paths: bool) -> Iterator[pa.Table]:
    """One table per shard: `columns` of the rows passing `row_filter` (and the shard's path as `path`)."""
    for path in paths:
        table = ds.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=list(columns),
                                                                                   filter=row_filter)
        if include_paths:
            table = table.append_column("path", pa.array([path] * len(table), pa.string()))
        yield table


class ShardSource(Datasource):
    """`paths` (with `rows` each, from the manifests; None where unknown) read in `count` tasks, shards dealt
    round robin so that a record's neighbouring shards land in different tasks."""

    def __init__(self, filesystem: pa.fs.FileSystem, paths: Sequence[str], rows: Sequence[int | None],
                 columns: Sequence[str], *, row_filter: ds.Expression | None = None, include_paths: bool = False):
        super().__init__()
        self.filesystem, self.paths, self.rows = filesystem, list(paths), list(rows)
        self.columns, self.row_filter, self.include_paths = list(columns), row_filter, include_paths
        first = ds.dataset(self.paths[0], filesystem=filesystem, format="parquet")
        missing = [c for c in self.columns if c not in first.schema.names]
        if missing:
            raise UserError(f"shard {self.paths[0]} has no column {missing[0]!r} (written by an older "
                            "`p2es ingest`? ingest it again)")
        self.row_bytes = row_bytes(first, self.columns)

    def estimate_inmemory_data_size(self) -> int | None:
        return None if None in self.rows else sum(self.rows) * self.row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        count = max(1, min(parallelism, len(self.paths)))
        tasks = []
        for group in range(count):
            paths, listed = self.paths[group::count], self.rows[group::count]
            rows = None if None in listed else sum(listed)
            # Rows are known only without a filter; bytes are an upper bound either way.
            metadata = BlockMetadata(num_rows=None if self.row_filter is not None else rows,
                                     size_bytes=None if rows is None else rows * self.row_bytes, exec_stats=None,
                                     input_files=paths)
            read = functools.partial(scan_shards, self.filesystem, paths, self.columns, self.row_filter,
                                     self.include_paths)
            tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


def row_bytes(dataset: ds.Dataset, columns: Sequence[str]) -> int:
    """Uncompressed bytes per row of `columns`, from a shard's Parquet footer."""
    metadata = next(iter(dataset.get_fragments())).metadata
    wanted = set(columns)
    total = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        total += sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                     if group.column(i).path_in_schema.split(".")[0] in wanted)
    return max(1, total // max(1, metadata.num_rows))
