"""The window shard schema (README "Ingest: raw records -> window shards") and the one function that builds a
shard table from arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from p2es_dist.constants import N_LEADS, WINDOW
from p2es_dist.data.timing import BEAT_SAMPLES

SHARD_SCHEMA = pa.schema(
    [
        pa.field("window_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("record", pa.string(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("fs", pa.int16(), nullable=False),
        pa.field("start", pa.int64(), nullable=False),
        pa.field("ppg", pa.list_(pa.float16(), WINDOW), nullable=True),
        pa.field("ecg", pa.list_(pa.float16(), N_LEADS * WINDOW), nullable=False),
        pa.field("ecg_mask", pa.list_(pa.bool_(), N_LEADS), nullable=False),
        pa.field("age", pa.float32(), nullable=True),
        pa.field("sex", pa.int8(), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("quality", pa.float32(), nullable=False),
        # Beat timing (`p2es_dist/data/timing.py`), paired records only, null elsewhere. Upstrokes are the
        # PPG pulses found on the whole record, relative to the window's start, including those up to
        # ~1.3 s past its end and 0.5 s before it (their beats reach into the window).
        pa.field("ppg_upstrokes", pa.list_(pa.int32()), nullable=True),
        # The record's calibration profile (`p2es_dist/data/calibration.py`) from its first
        # `preprocess.calibration_s` seconds, which end at sample `calib_end`: PAT and mean beat per lead
        # in the record's units. Windows starting before `calib_end` overlap the calibration segment.
        pa.field("calib_pat_s", pa.float32(), nullable=True),
        pa.field("calib_beat", pa.list_(pa.float16(), N_LEADS * BEAT_SAMPLES), nullable=True),
        pa.field("calib_beat_mask", pa.list_(pa.bool_(), N_LEADS), nullable=True),
        pa.field("calib_end", pa.int64(), nullable=True),
    ]
)
CALIBRATION_COLUMNS = ["ppg_upstrokes", "calib_pat_s", "calib_beat", "calib_beat_mask", "calib_end"]


def _fixed_list(values: np.ndarray, width: int, dtype: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """A FixedSizeListArray from a 2-D numpy block without per-row Python."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=mask)


def build_table(
    *,
    source: str,
    record: Sequence[str],
    subject_id: Sequence[str],
    split: Sequence[str],
    start: np.ndarray,
    ecg: np.ndarray,
    ecg_mask: np.ndarray,
    ppg: np.ndarray | None,
    ppg_present: np.ndarray | None = None,
    age: np.ndarray,
    sex: np.ndarray,
    labels: Sequence[Sequence[str]],
    quality: np.ndarray,
    fs: int = 125,
    upstrokes: Sequence[np.ndarray | None] | None = None,
    calibration: tuple[float, np.ndarray, np.ndarray, int] | None = None,
) -> pa.Table:
    """Windows as a shard table.

    Shapes: `ecg` (n, 12, L) lead-major, `ecg_mask` (n, 12) bool, `ppg` (n, L) or None, `ppg_present` (n,)
    bool (rows without PPG become nulls), `age` (n,) with NaN for unknown, `sex` (n,) int, `start` (n,).
    `upstrokes`: per window the PPG upstroke positions relative to its start (None: no PPG).
    `calibration`: the record's (PAT s, beat (12, BEAT_SAMPLES), beat mask (12,), end sample), or None.
    """
    n = len(record)
    ecg = np.asarray(ecg)
    if ecg.shape != (n, N_LEADS, WINDOW):
        raise ValueError(f"ecg must be (n, {N_LEADS}, {WINDOW}), got {ecg.shape}")
    if ppg is None:
        ppg_array = pa.nulls(n, type=SHARD_SCHEMA.field("ppg").type)
    else:
        if ppg.shape != (n, WINDOW):
            raise ValueError(f"ppg must be (n, {WINDOW}), got {ppg.shape}")
        ppg_array = _fixed_list(ppg.astype(np.float16), WINDOW, pa.float16(), ppg_present)
    window_id = [f"{source}:{rec}:{int(s)}" for rec, s in zip(record, start, strict=True)]
    age = np.asarray(age, dtype=np.float32)
    columns = {
        "window_id": pa.array(window_id, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "record": pa.array(list(record), pa.string()),
        "subject_id": pa.array(list(subject_id), pa.string()),
        "split": pa.array(list(split), pa.string()),
        "fs": pa.array(np.full(n, fs, dtype=np.int16)),
        "start": pa.array(np.asarray(start, dtype=np.int64)),
        "ppg": ppg_array,
        "ecg": _fixed_list(ecg.astype(np.float16), N_LEADS * WINDOW, pa.float16()),
        "ecg_mask": _fixed_list(np.asarray(ecg_mask, dtype=bool), N_LEADS, pa.bool_()),
        "age": pa.array(age, mask=np.isnan(age)),
        "sex": pa.array(np.asarray(sex, dtype=np.int8)),
        "labels": pa.array([list(x) for x in labels], pa.list_(pa.string())),
        "quality": pa.array(np.asarray(quality, dtype=np.float32)),
        "ppg_upstrokes": pa.array(
            [None if u is None else np.asarray(u, dtype=np.int32) for u in upstrokes] if upstrokes is not None
            else [None] * n, pa.list_(pa.int32())),
        **_calibration_columns(calibration, n),
    }
    return pa.table(columns, schema=SHARD_SCHEMA)


def _calibration_columns(calibration: tuple[float, np.ndarray, np.ndarray, int] | None, n: int) -> dict:
    """The record's calibration repeated on each of its `n` rows (or nulls)."""
    if calibration is None:
        return {name: pa.nulls(n, type=SHARD_SCHEMA.field(name).type) for name in CALIBRATION_COLUMNS[1:]}
    pat_s, beat, beat_mask, end = calibration
    beat_rows = np.repeat(np.asarray(beat, dtype=np.float16).reshape(1, -1), n, axis=0)
    mask_rows = np.repeat(np.asarray(beat_mask, dtype=bool).reshape(1, -1), n, axis=0)
    return {
        "calib_pat_s": pa.array(np.full(n, pat_s, dtype=np.float32)),
        "calib_beat": _fixed_list(beat_rows, N_LEADS * BEAT_SAMPLES, pa.float16()),
        "calib_beat_mask": _fixed_list(mask_rows, N_LEADS, pa.bool_()),
        "calib_end": pa.array(np.full(n, end, dtype=np.int64)),
    }
