"""One record -> one shard table plus quarantine lines, and what a record is made of (its files and their
content hash, which resume and duplicate detection go by). Pure functions; the Ray job fans them out."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from p2es_dist.constants import FS, LABEL_INDEX
from p2es_dist.data.preprocess import PreprocessConfig, make_windows
from p2es_dist.data.record import Record, RecordError
from p2es_dist.data.schema import SHARD_SCHEMA, build_table
from p2es_dist.data.sources import reader
from p2es_dist.data.sources.wfdb_common import record_files as wfdb_record_files
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


def record_files(source: str, root: Path, key: str, options: dict | None = None,
                 listings: dict[Path, list[Path]] | None = None) -> tuple[list[Path], str]:
    """(files a record is read from, the part of its key inside a container file such as an HDF5 exam id).

    A reader may say it itself (`record_files(root, key, **options)`); otherwise: a WFDB header's files, the
    key's container file, or the files beside the key named after it (`bidmc_01_Signals.csv.gz`, ...).
    `listings` caches folder listings across the records of one plan.
    """
    root = Path(root)
    hook = getattr(reader(source), "record_files", None)
    if hook is not None:
        return hook(root, key, **(options or {})), ""
    path = root / key
    files = wfdb_record_files(path)
    if files:
        return files, ""
    for container in path.parents:
        if container == root:
            break
        if container.is_file():
            return [container], path.relative_to(container).as_posix()
    listings = {} if listings is None else listings
    folder, stem = path.parent, path.name
    if folder not in listings:
        listings[folder] = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    # `bidmc_01_Fix.txt` and `bidmc_01.csv` belong to bidmc_01, `bidmc_010.csv` does not.
    return [f for f in listings[folder] if f.name.startswith(stem) and f.name[len(stem):][:1] in ("", "_", ".")], ""


def file_digests(paths: list[Path], cache: dict[str, list]) -> dict[Path, str]:
    """BLAKE2b of each file, in parallel threads (hashlib releases the GIL). `cache` maps a path to
    [size, mtime_ns, digest] and is updated: a file whose size and mtime did not change is not read again."""
    def digest(path: Path) -> str:
        stat = path.stat()
        entry = cache.get(str(path))
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        with open(path, "rb") as handle:
            value = hashlib.file_digest(handle, "blake2b").hexdigest()[:32]
        cache[str(path)] = [stat.st_size, stat.st_mtime_ns, value]
        return value

    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(digest, unique), strict=True))


def record_digest(key: str, files: list[Path], inside: str, digests: dict[Path, str]) -> str:
    """A record's content hash: its files' contents under names relative to the record, so the same
    recording copied to another folder hashes the same. A record with no file found hashes its key."""
    if not files:
        return hashlib.sha256(f"no files:{key}".encode()).hexdigest()[:32]
    stem = Path(key).name
    parts = sorted([f.name.replace(stem, "*", 1) if f.name.startswith(stem) else f.name, digests[f]] for f in files)
    return hashlib.sha256(json.dumps([parts, inside]).encode()).hexdigest()[:32]
