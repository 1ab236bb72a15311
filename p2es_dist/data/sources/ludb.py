"""Lobachevsky University ECG Database (Kalyakulina et al. 2020): 12-lead (`i ii ... v6`) at 500 Hz, 10 s.

Layout: `<root>/data/<n>.hea/.dat` (the root may also be the `data/` folder itself). Keys are the record
paths relative to the root (`data/1`). LUDB has one record per patient, so the subject is the record
number; it has no folds, so `split` stays None and ingest hashes the subject. Age, sex and diagnoses
come from the header comments (`#<age>: 51`, `#<sex>: F`, `#Rhythm: Sinus bradycardia.`, ...), the
same text as `ludb.csv`; labels via `p2es_dist.data.labels.labels_from_ludb_text`.

Units quirk (PhysioNet v1.0.1): each lead's header gain equals that lead's digital peak-to-peak, so
wfdb's physical signals span exactly 1 "mV" per lead and the leads no longer add up (II != I + III).
The digital samples do add up exactly and have the amplitudes of microvolts (median lead II QRS
about 1.4 mV, as in PTB-XL). When a header shows this quirk, ECG is read as digital / 1000 (uV -> mV);
a header with real gains is used as is.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import wfdb

from p2es_dist.data.labels import labels_from_ludb_text
from p2es_dist.data.record import Record
from p2es_dist.data.sources.wfdb_common import comment_fields, parse_age, parse_sex, read_wfdb, to_record
from p2es_dist.errors import UserError

SOURCE = "ludb"
_DIGITAL_PER_MV = 1000.0  # the digital samples are microvolts
_MISSING = -32768  # WFDB format 16's invalid-sample value


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    data = root / "data" if (root / "data").is_dir() else root
    keys = sorted(
        header.relative_to(root).with_suffix("").as_posix()
        for header in data.glob("*.hea")
        if header.stem.isdigit()
    )
    if not keys:
        raise UserError(f"--input {root}: no LUDB records (data/<n>.hea) found")
    return keys


def gains_are_ranges(rec: wfdb.Record) -> bool:
    """True when every lead's header gain is its digital peak-to-peak (the v1.0.1 quirk)."""
    digital = rec.d_signal.astype(np.int64)
    spans = digital.max(axis=0) - digital.min(axis=0)
    return bool(np.all(np.abs(spans - np.asarray(rec.adc_gain)) <= 1))


def physical_signal(rec: wfdb.Record) -> np.ndarray:
    """mV from the digital samples: digital / 1000 under the quirk, else the header's gain and baseline."""
    digital = rec.d_signal.astype(np.float64)
    if gains_are_ranges(rec):
        signal = digital / _DIGITAL_PER_MV
    else:
        signal = (digital - np.asarray(rec.baseline)) / np.asarray(rec.adc_gain)
    signal[rec.d_signal == _MISSING] = np.nan
    return signal


def read_record(root: Path, key: str) -> Record:
    rec = read_wfdb(Path(root) / key, physical=False)
    rec.p_signal = physical_signal(rec)
    comments = rec.comments or []
    fields = comment_fields(comments)
    return to_record(
        rec,
        source=SOURCE,
        key=key,
        subject_id=PurePosixPath(key).name,
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
        labels=labels_from_ludb_text(comments),
    )
