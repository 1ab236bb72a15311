"""Subject-grouped cross-validation folds, written as shard folders whose `split` column is re-assigned.

Every stage reads its split from the shards, so a fold is a copy of a shard folder in which fold k's
subjects are `test`, fold k+1's are `val` (model selection never sees the test subjects) and the rest
`train`. Training, the population templates and `p2es evaluate` then work on a fold unchanged. Meant for
small paired cohorts (BIDMC: 35 subjects, ~11 MB of shards), where a fixed 4-subject test split is too
few to compare models: `p2es evaluate --cv-folds K` (jobs/cross_validate.py) uses it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from p2es_dist.data.read import read_manifest, read_table
from p2es_dist.data.splits import subject_hash
from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib


def fold_groups(subjects: Iterable[str], folds: int, *, seed: int = 0) -> dict[str, int]:
    """subject -> group in [0, folds): subjects shuffled by a seeded stable hash, then dealt round-robin,
    so group sizes differ by at most one subject and a subject added later moves no one else's group much."""
    order = sorted(set(subjects), key=lambda s: (subject_hash(f"{seed}:{s}"), s))
    return {subject: index % folds for index, subject in enumerate(order)}


def fold_split(group: int, fold: int, folds: int) -> str:
    """The split of a subject in `group` for fold `fold`: test, the next group val, the others train."""
    if group == fold:
        return "test"
    return "val" if group == (fold + 1) % folds else "train"


def read_all_windows(uri: str) -> tuple[dict, pa.Table]:
    """(manifest, every row of every shard) of one shard folder."""
    return read_manifest(uri, option="--data"), read_table([uri], None, option="--data")


def write_fold_shards(uri: str, out: str, *, folds: int, seed: int = 0) -> list[str]:
    """Write `folds` shard folders under `out` (`fold_0` ...) from the shard folder `uri`; returns their URIs.

    Subjects of every stored split take part: a fold's test subjects were train or val subjects of the
    stored split just as often as test ones.
    """
    manifest, table = read_all_windows(uri)
    subjects = table.column("subject_id").to_pylist()
    n_subjects = len(set(subjects))
    if folds < 3 or folds > n_subjects:
        raise UserError(f"--cv-folds {folds}: needs 3 to {n_subjects} folds (one test, one val group and at least "
                        f"one train group of the {n_subjects} subjects in {uri})")
    groups = fold_groups(subjects, folds, seed=seed)
    group_of_row = np.array([groups[s] for s in subjects])
    folders = []
    for fold in range(folds):
        splits = np.array([fold_split(g, fold, folds) for g in range(folds)])[group_of_row]
        index = table.schema.get_field_index("split")
        fold_table = table.set_column(index, table.schema.field(index), pa.array(splits, pa.string()))
        buffer = io.BytesIO()
        pq.write_table(fold_table, buffer, compression="zstd")
        folder = uri_lib.join(out, f"fold_{fold}")
        shard_path = "shards/fold.parquet"
        uri_lib.write_bytes_atomic(uri_lib.join(folder, shard_path), buffer.getvalue())
        names, counts = np.unique(splits, return_counts=True)
        fold_manifest = {
            **manifest,
            "shards": [{"path": shard_path, "rows": len(fold_table)}],
            "n_windows": {str(k): int(v) for k, v in zip(names, counts, strict=True)},
            "n_subjects": {split: len({s for s, g in groups.items() if fold_split(g, fold, folds) == split})
                           for split in ("train", "val", "test")},
            "cv": {"from": uri, "folds": folds, "fold": fold, "seed": seed,
                   "test_subjects": sorted(s for s, g in groups.items() if g == fold)},
        }
        uri_lib.write_text_atomic(uri_lib.join(folder, "manifest.json"), json.dumps(fold_manifest, indent=1))
        folders.append(folder)
    return folders
