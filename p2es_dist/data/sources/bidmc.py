"""BIDMC PPG and Respiration Dataset (Pimentel et al. 2017): PLETH + ECG from MIMIC-II ICU patients.

Layout: `bidmc_NN_Signals.csv[.gz]` beside `bidmc_NN_Fix.txt`. Column names carry leading spaces and
their order differs between records, so signals are picked by name. The dataset rescaled every signal
to roughly 0-1, so ECG here is not in mV (the manifest says `normalised`). Several records can come
from one patient: the subject is the MIMIC-II id in the `_Fix.txt`, never the record name. Leads `V`
and `MCL` are skipped: MIMIC does not say which chest position they were recorded at. Each signal
was rescaled on its own, so II and aVR are in different units: the record says so
(`leads_scaled_separately`) and preprocessing keeps lead II alone.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from p2es_dist.constants import SEX_FEMALE, SEX_MALE, SEX_UNKNOWN
from p2es_dist.data.record import Record, RecordError
from p2es_dist.errors import UserError

SOURCE = "bidmc"
ECG_UNITS = "normalised (dataset-scaled, roughly 0-1 per signal before filtering)"
_LEADS = {"I": "I", "II": "II", "III": "III", "AVR": "aVR", "AVL": "aVL", "AVF": "aVF"}
_SUFFIXES = ("_Signals.csv.gz", "_Signals.csv")


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    keys = {
        str(path.relative_to(root))[: -len(suffix)]
        for suffix in _SUFFIXES
        for path in root.rglob(f"*{suffix}")
    }
    if not keys:
        raise UserError(f"--input {root}: no BIDMC *_Signals.csv[.gz] files found")
    return sorted(keys)


def _signals_path(root: Path, key: str) -> Path:
    for suffix in _SUFFIXES:
        path = root / f"{key}{suffix}"
        if path.exists():
            return path
    raise RecordError(f"{key}: signals file not found")


def parse_fix(path: Path) -> dict[str, str]:
    """The `Key: value` lines of a `_Fix.txt`."""
    fields = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def parse_age(text: str | None) -> float | None:
    """'88' -> 88.0, '90+' -> 90.0 (HIPAA top-coding), 'NaN'/'' -> None."""
    if not text:
        return None
    try:
        age = float(text.rstrip("+"))
    except ValueError:
        return None
    return None if math.isnan(age) else age


def parse_sex(text: str | None) -> int:
    return {"F": SEX_FEMALE, "M": SEX_MALE}.get((text or "").strip().upper()[:1], SEX_UNKNOWN)


def read_record(root: Path, key: str) -> Record:
    root = Path(root)
    signals_path = _signals_path(root, key)
    fix_path = root / f"{key}_Fix.txt"
    if not fix_path.exists():
        # Without the MIMIC-II id we cannot keep the patient's other records in the same split.
        raise RecordError(f"{fix_path.name} missing: subject unknown, cannot split patient-disjointly")
    fix = parse_fix(fix_path)
    subject = fix.get("MIMIC II matched wdb ID")
    if not subject:
        raise RecordError(f"{fix_path.name}: no 'MIMIC II matched wdb ID' line")
    try:
        frame = pd.read_csv(signals_path, skipinitialspace=True)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise RecordError(f"{signals_path.name}: truncated or corrupt ({type(exc).__name__}: {exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    columns = {c.upper(): c for c in frame.columns}
    if "PLETH" not in columns:
        raise RecordError(f"{signals_path.name}: no PLETH column (has {', '.join(frame.columns)})")
    fs = _sampling_rate(fix, frame)
    ecg = {
        canonical: frame[columns[name]].to_numpy(dtype=np.float64)
        for name, canonical in _LEADS.items()
        if name in columns
    }
    if not ecg:
        raise RecordError(f"{signals_path.name}: no ECG lead among {', '.join(frame.columns)}")
    return Record(
        source=SOURCE,
        record=Path(key).name,
        subject_id=f"bidmc-{subject}",
        fs=fs,
        ecg=ecg,
        ppg=frame[columns["PLETH"]].to_numpy(dtype=np.float64),
        age=parse_age(fix.get("Age")),
        sex=parse_sex(fix.get("Gender")),
        ecg_units=ECG_UNITS,
        ppg_units="normalised",
        leads_scaled_separately=True,
    )


def _sampling_rate(fix: dict[str, str], frame: pd.DataFrame) -> float:
    stated = fix.get("Signals sampling frequency", "").split()
    if stated:
        try:
            return float(stated[0])
        except ValueError:
            pass
    time_column = next((c for c in frame.columns if c.lower().startswith("time")), None)
    if time_column is None or len(frame) < 2:
        raise RecordError("sampling rate unknown: no 'Signals sampling frequency' line and no time column")
    return float(round(1.0 / np.median(np.diff(frame[time_column].to_numpy()[:1000]))))
