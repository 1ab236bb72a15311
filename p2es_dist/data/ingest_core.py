"""One record -> one shard table plus quarantine lines. Pure functions; the Ray job fans them out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from p2es_dist.constants import FS, LABEL_INDEX
from p2es_dist.data.preprocess import PreprocessConfig, make_windows
from p2es_dist.data.record import Record, RecordError
from p2es_dist.data.schema import SHARD_SCHEMA, build_table
from p2es_dist.data.sources import reader
from p2es_dist.data.splits import hash_split


def record_to_table(record: Record, config: PreprocessConfig) -> tuple[pa.Table, list[dict]]:
    """Windows of a record as shard rows, and one quarantine line per rejected window."""
    windows = make_windows(record, config)
    quarantine = [
        {"record": record.record, "source": record.source, "start": r["start"], "reason": r["reason"]}
        for r in windows.rejected
    ]
    n = len(windows.start)
    unknown = [label for label in record.labels if label not in LABEL_INDEX]
    if unknown:
        raise RecordError(f"labels outside the canonical vocabulary: {unknown}")
    split = record.split or hash_split(record.subject_id)
    table = build_table(
        source=record.source,
        record=[record.record] * n,
        subject_id=[record.subject_id] * n,
        split=[split] * n,
        start=windows.start,
        ecg=windows.ecg,
        ecg_mask=windows.ecg_mask,
        ppg=windows.ppg,
        ppg_present=None,
        age=np.full(n, np.nan if record.age is None else record.age, dtype=np.float32),
        sex=np.full(n, record.sex, dtype=np.int8),
        labels=[record.labels] * n,
        quality=windows.quality,
        fs=FS,
        upstrokes=windows.upstrokes,
        calibration=_calibration(windows),
    )
    return table, quarantine


def _calibration(windows) -> tuple[float, np.ndarray, np.ndarray, int] | None:
    if windows.calibration is None:
        return None
    beat, mask = windows.calibration.beat_array()
    return windows.calibration.pat_s, beat, mask, windows.calibration_end


def ingest_record(source: str, root: str | Path, key: str, config: PreprocessConfig,
                  reader_options: dict | None = None) -> dict:
    """Read and window one record; every failure becomes a quarantine line instead of an exception."""
    try:
        record = reader(source).read_record(Path(root), key, **(reader_options or {}))
        table, quarantine = record_to_table(record, config)
    except RecordError as exc:
        return {"key": key, "table": SHARD_SCHEMA.empty_table(), "quarantine": [_line(source, key, exc)],
                "ok": False, "units": None}
    except Exception as exc:  # noqa: BLE001 (a bad record must never stop an ingest)
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return {"key": key, "table": SHARD_SCHEMA.empty_table(),
                "quarantine": [{"record": key, "source": source, "reason": reason}], "ok": False, "units": None}
    if table.num_rows == 0:
        quarantine.append({"record": record.record, "source": source, "reason": "no usable window"})
    return {"key": key, "table": table, "quarantine": quarantine, "ok": table.num_rows > 0,
            "units": {"ecg": record.ecg_units, "ppg": record.ppg_units if record.ppg is not None else None}}


def _line(source: str, key: str, exc: Exception) -> dict:
    return {"record": key, "source": source, "reason": str(exc)}
