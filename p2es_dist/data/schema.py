"""The window shard schema (SPEC section 3) and the one function that builds a shard table from arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from p2es_dist.constants import N_LEADS, WINDOW

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
    ]
)


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
) -> pa.Table:
    """Windows as a shard table.

    Shapes: `ecg` (n, 12, L) lead-major, `ecg_mask` (n, 12) bool, `ppg` (n, L) or None, `ppg_present` (n,)
    bool (rows without PPG become nulls), `age` (n,) with NaN for unknown, `sex` (n,) int, `start` (n,).
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
    }
    return pa.table(columns, schema=SHARD_SCHEMA)
