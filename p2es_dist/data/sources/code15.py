"""CODE-15% (Ribeiro et al.; zenodo 4916206): `exams_part{i}.hdf5` + `exams.csv`.

Each HDF5 holds `tracings` (N, 4096, 12) float at 400 Hz, leads DI, DII, DIII, AVR, AVL, AVF, V1-V6
(our canonical order), and `exam_id` (N,). Values are read as mV, as the PhysioNet Challenge 2025
conversion of CODE-15% does. Recordings of 7 s (2800 samples) or 10 s (4000) were zero-padded,
centred, to 4096: rows where all 12 leads are exactly zero are stripped from both ends. The part files
end with a padding row of `exam_id` 0, which is skipped.

`exams.csv` columns: exam_id, age, is_male, nn_predicted_age, 1dAVb, RBBB, LBBB, SB, ST, AF,
patient_id, death, timey, normal_ecg, trace_file. Keys are `<hdf5 path relative to root>/<exam_id>`,
listed for exams present in both the HDF5 files and `exams.csv`. The subject is `patient_id`; there
are no official folds, so `split` stays None (ingest hashes the subject).

The same exams converted to WFDB (PhysioNet Challenge 2025's preparation script: `<exam_id>.hea` +
`.dat`, 400 Hz, 1000 adu/mV, zero padding removed) are read too: when the root holds `*.hea` files,
keys are their paths without `.hea`. Header comments give `Exam ID`, `Patient ID`, `Age`, `Sex` and
the challenge's weak `Chagas label`, which is not in the canonical vocabulary (no labels). The subject is
the patient id as in the HDF5 layout (same string), so a patient lands in the same split either way.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pandas as pd

from p2es_dist.constants import LEADS, SEX_FEMALE, SEX_MALE, SEX_UNKNOWN
from p2es_dist.data.labels import labels_from_code15
from p2es_dist.data.record import Record, RecordError
from p2es_dist.data.sources.wfdb_common import (
    comment_fields,
    list_headers,
    parse_age,
    parse_sex,
    read_wfdb,
    to_record,
)
from p2es_dist.errors import UserError

SOURCE = "code15"
FS = 400.0
EXAMS_CSV = "exams.csv"
_PADDING_EXAM_ID = 0


@functools.lru_cache(maxsize=2)
def _exams(csv_path: str, mtime_ns: int) -> pd.DataFrame:
    del mtime_ns  # part of the cache key only
    return pd.read_csv(csv_path).set_index("exam_id")


def load_exams(root: Path) -> pd.DataFrame:
    csv_path = Path(root) / EXAMS_CSV
    if not csv_path.exists():
        raise UserError(f"--input {root}: {EXAMS_CSV} not found (expected the CODE-15% folder)")
    return _exams(str(csv_path), csv_path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _exam_rows(hdf5_path: str, mtime_ns: int) -> dict[int, int]:
    """exam_id -> row of one part file (cached: every record of a part needs it)."""
    del mtime_ns
    with h5py.File(hdf5_path, "r") as handle:
        exam_ids = np.asarray(handle["exam_id"][:], dtype=np.int64)
    return {int(exam_id): row for row, exam_id in enumerate(exam_ids) if exam_id != _PADDING_EXAM_ID}


def exam_rows(path: Path) -> dict[int, int]:
    try:
        return _exam_rows(str(path), path.stat().st_mtime_ns)
    except (OSError, KeyError) as exc:
        raise RecordError(f"{path.name}: not a CODE-15% part file ({exc})") from None


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    headers = list_headers(root)
    if headers:  # the WFDB conversion
        return [header.relative_to(root).with_suffix("").as_posix() for header in headers]
    exams = load_exams(root)
    known = set(exams.index.astype(np.int64).tolist())
    keys = []
    for path in sorted([*root.rglob("*.hdf5"), *root.rglob("*.h5")]):
        try:
            rows = exam_rows(path)
        except RecordError as exc:
            raise UserError(f"--input {root}: {exc}") from None
        relative = path.relative_to(root).as_posix()
        keys.extend(f"{relative}/{exam_id}" for exam_id in rows if exam_id in known)
    if not keys:
        raise UserError(f"--input {root}: no exams of {EXAMS_CSV} found in *.hdf5 files")
    return sorted(keys)


def strip_zero_padding(tracing: np.ndarray) -> np.ndarray:
    """Drop leading and trailing samples where all leads are exactly 0 (the dataset's padding)."""
    active = np.flatnonzero(np.any(tracing != 0, axis=1))
    if active.size == 0:
        return tracing[:0]
    return tracing[active[0] : active[-1] + 1]


def _age(value) -> float | None:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(age) else age


def _sex(value) -> int:
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return SEX_UNKNOWN
    return SEX_MALE if bool(value) else SEX_FEMALE


def read_wfdb_exam(root: Path, key: str) -> Record:
    """One exam of the WFDB conversion; demographics and patient from its header comments."""
    rec = read_wfdb(Path(root) / key)
    fields = comment_fields(rec.comments or [])
    patient = fields.get("patient id", "")
    exam = fields.get("exam id") or PurePosixPath(key).name
    return to_record(
        rec,
        source=SOURCE,
        key=key,
        subject_id=str(int(patient)) if patient.isdigit() else f"exam{exam}",  # as the HDF5 layout
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
    )


def read_record(root: Path, key: str) -> Record:
    root = Path(root)
    if (root / f"{key}.hea").is_file():
        return read_wfdb_exam(root, key)
    file_part, _, exam_text = key.rpartition("/")
    path = root / file_part
    if not exam_text.isdigit() or not path.exists():
        raise RecordError(f"{key}: expected <part file>/<exam_id> with an existing part file")
    exam_id = int(exam_text)
    row = exam_rows(path).get(exam_id)
    exams = load_exams(root)
    if row is None or exam_id not in exams.index:
        raise RecordError(f"{key}: exam {exam_id} is not in both {PurePosixPath(file_part).name} and {EXAMS_CSV}")
    try:
        with h5py.File(path, "r") as handle:
            tracing = np.asarray(handle["tracings"][row], dtype=np.float32)
    except (OSError, KeyError) as exc:
        raise RecordError(f"{key}: cannot read tracings ({exc})") from None
    if tracing.ndim != 2 or tracing.shape[1] != len(LEADS):
        raise RecordError(f"{key}: tracing shape {tracing.shape}, expected (samples, 12)")
    tracing = strip_zero_padding(tracing)
    if len(tracing) == 0:
        raise RecordError(f"{key}: tracing is all zeros")
    meta = exams.loc[exam_id]
    return Record(
        source=SOURCE,
        record=key,
        subject_id=str(int(meta["patient_id"])) if not pd.isna(meta["patient_id"]) else f"exam{exam_id}",
        fs=FS,
        ecg={lead: np.ascontiguousarray(tracing[:, i]) for i, lead in enumerate(LEADS)},
        age=_age(meta.get("age")),
        sex=_sex(meta.get("is_male")),
        labels=labels_from_code15(meta),
    )
