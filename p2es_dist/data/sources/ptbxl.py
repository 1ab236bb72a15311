"""PTB-XL (Wagner et al. 2020): `ptbxl_database.csv` + WFDB records in `records500/` (500 Hz, default)
or `records100/` (100 Hz).

Keys are the zero-padded `ecg_id` (`00001`), listed for rows whose header exists at the chosen rate
(a partial download, or this repo's shared subset, holds fewer files than the CSV may list).
Quirks handled here:
- `sex` is 0 male / 1 female in PTB-XL, the reverse of ours.
- ages above 89 are stored as 300 (HIPAA): read as 90. A few ages are missing.
- `scp_codes` is a Python dict literal; labels via `p2es_dist.data.labels.labels_from_scp`.
- `strat_fold` (patient-disjoint, stratified): folds 1-8 train, 9 val, 10 test, the dataset's
  recommendation. The subject is `patient_id`. `--set ptbxl.val_folds=[7] --set ptbxl.test_folds=[8]`
  moves other whole folds there (still patient-disjoint): for a partial copy without folds 9-10, such as
  the shared development subset, so that a held-out 12-lead split with real diagnoses exists.
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from p2es_dist.constants import SEX_FEMALE, SEX_MALE, SEX_UNKNOWN
from p2es_dist.data.labels import labels_from_scp
from p2es_dist.data.record import Record, RecordError
from p2es_dist.data.sources.wfdb_common import read_wfdb, to_record
from p2es_dist.data.sources.wfdb_common import record_files as wfdb_record_files
from p2es_dist.errors import UserError

SOURCE = "ptbxl"
DATABASE_CSV = "ptbxl_database.csv"
_FILENAME_COLUMN = {"records500": "filename_hr", "records100": "filename_lr"}
_AGE_TOP_CODE = 300  # PTB-XL's stand-in for "older than 89"


@dataclass(frozen=True)
class PtbxlConfig:
    resolution: str = "records500"  # or "records100"
    min_likelihood: float = 0.0  # see labels_from_scp
    val_folds: tuple[int, ...] = (9,)
    test_folds: tuple[int, ...] = (10,)


def split_of_fold(fold: int, *, val_folds=PtbxlConfig.val_folds, test_folds=PtbxlConfig.test_folds) -> str:
    """`strat_fold` -> split; by default PTB-XL's recommendation: 1-8 train, 9 val, 10 test."""
    if not 1 <= fold <= 10:
        raise ValueError(f"strat_fold must be 1-10, got {fold}")
    if set(val_folds) & set(test_folds):
        raise UserError(f"ptbxl.val_folds {list(val_folds)} and ptbxl.test_folds {list(test_folds)} overlap")
    if fold in test_folds:
        return "test"
    if fold in val_folds:
        return "val"
    return "train"


def _check_resolution(resolution: str) -> str:
    if resolution not in _FILENAME_COLUMN:
        raise UserError(f"ptbxl.resolution: expected one of {', '.join(_FILENAME_COLUMN)}, got {resolution!r}")
    return _FILENAME_COLUMN[resolution]


@functools.lru_cache(maxsize=4)
def _database(csv_path: str, mtime_ns: int) -> pd.DataFrame:
    """The database table indexed by ecg_id; cached per process (readers run many records each)."""
    del mtime_ns  # part of the cache key only
    return pd.read_csv(csv_path, index_col="ecg_id")


def load_database(root: Path) -> pd.DataFrame:
    csv_path = Path(root) / DATABASE_CSV
    if not csv_path.exists():
        raise UserError(f"--input {root}: {DATABASE_CSV} not found (expected the PTB-XL root folder)")
    return _database(str(csv_path), csv_path.stat().st_mtime_ns)


def list_records(
    root: Path,
    *,
    resolution: str = PtbxlConfig.resolution,
    min_likelihood: float = PtbxlConfig.min_likelihood,
    val_folds: tuple[int, ...] = PtbxlConfig.val_folds,
    test_folds: tuple[int, ...] = PtbxlConfig.test_folds,
) -> list[str]:
    """Keys of the records present; the other options belong to `read_record` (one `ptbxl:` section)."""
    split_of_fold(1, val_folds=val_folds, test_folds=test_folds)  # fail on overlapping folds before any work
    root = Path(root)
    column = _check_resolution(resolution)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    database = load_database(root)
    keys = [f"{int(ecg_id):05d}" for ecg_id, path in database[column].items()
            if (root / f"{path}.hea").exists()]
    if not keys:
        raise UserError(f"--input {root}: no {resolution}/ records of {DATABASE_CSV} found")
    return sorted(keys)


def record_files(root: Path, key: str, *, resolution: str = PtbxlConfig.resolution, **_options: object) -> list[Path]:
    """What `read_record` reads for `key` (ingest hashes it to resume and to find duplicates): the WFDB record
    and the database that gives its labels, demographics and split."""
    root = Path(root)
    try:
        path = root / load_database(root).loc[int(key), _check_resolution(resolution)]
    except (KeyError, ValueError):
        return [root / DATABASE_CSV]
    return [root / DATABASE_CSV, *wfdb_record_files(path)]


def _age(value: float) -> float | None:
    if value is None or math.isnan(value):
        return None
    return 90.0 if value >= _AGE_TOP_CODE else float(value)


def _sex(value: float) -> int:
    if value == 0:
        return SEX_MALE
    if value == 1:
        return SEX_FEMALE
    return SEX_UNKNOWN


def read_record(
    root: Path,
    key: str,
    *,
    resolution: str = PtbxlConfig.resolution,
    min_likelihood: float = PtbxlConfig.min_likelihood,
    val_folds: tuple[int, ...] = PtbxlConfig.val_folds,
    test_folds: tuple[int, ...] = PtbxlConfig.test_folds,
) -> Record:
    root = Path(root)
    column = _check_resolution(resolution)
    database = load_database(root)
    try:
        row = database.loc[int(key)]
    except (KeyError, ValueError):
        raise RecordError(f"{key}: no ecg_id {key} in {DATABASE_CSV}") from None
    try:
        scp_codes = ast.literal_eval(row["scp_codes"])
    except (ValueError, SyntaxError):
        raise RecordError(f"{key}: scp_codes is not a dict literal: {row['scp_codes']!r}") from None
    fold = int(row["strat_fold"])
    return to_record(
        read_wfdb(root / row[column]),
        source=SOURCE,
        key=key,
        subject_id=str(int(row["patient_id"])),
        age=_age(row["age"]),
        sex=_sex(row["sex"]),
        labels=labels_from_scp(scp_codes, min_likelihood=min_likelihood),
        split=split_of_fold(fold, val_folds=tuple(val_folds), test_folds=tuple(test_folds)),
    )
