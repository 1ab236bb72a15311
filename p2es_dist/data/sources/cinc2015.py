"""PhysioNet/CinC Challenge 2015, false ICU arrhythmia alarms (Clifford et al., CinC 2015; ODC-By 1.0).

Layout (PhysioNet's): `<record>.hea` + `<record>.mat` (MATLAB v4, 250 Hz, a gain per channel in the
header), a `RECORDS` file at the root listing the record names (when it is absent, every `*.hea` under
the root is a record). Names are `<alarm letter><3 digits><s|l>`: a(systole), b(radycardia),
t(achycardia), v(entricular tachycardia), f (ventricular flutter/fibrillation).

Signals are picked by name (the channel order varies: `a439l` has I before II) and converted to
physical units with the header gains: ECG lead II plus whichever second lead maps to one of the 12
canonical leads (`I`, `III`; `wfdb_common.canonical_lead`), PLETH as `ppg` (arbitrary units). The
second lead is most often `V` or `MCL`: neither has a canonical 12-lead equivalent (the chest position
of `V` is not recorded, and MCL is a bipolar modified chest lead), so both are dropped. NaN gaps stay
NaN: preprocessing interpolates short ones and masks windows touching long ones.

Alarm segment, dropped: every record ends with the alarm: the alarm fires 300 s into each record, and
the long `*l` records add 30 s after it. So the last 30 s of a `*s` record (300 s) and the last 60 s
of a `*l` record (330 s) are cut off, which keeps the first 270 s of both (any other name loses its
last 30 s). Windows therefore never show the alarm event nor what followed it.

No demographics and no patient ids: one record is one subject (`cinc2015:<record>`), split by a hash
of it. Labels are none: the alarm type and its true/false verdict map to nothing in the canonical
vocabulary. The same subject id is given by the generic `wfdb` reader to a Challenge-2015 record it
meets (`a103l`, `v102s` in the wfdb samples), so both copies fall in the same split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from p2es_dist.data.record import Record, RecordError
from p2es_dist.data.sources.wfdb_common import list_headers, read_wfdb, to_record
from p2es_dist.errors import UserError

SOURCE = "cinc2015"
SUBJECT_NOTE = "no patient ids in CinC 2015: one record = one subject"
RECORDS_FILE = "RECORDS"
RECORD_NAME = re.compile(r"^[abtvf]\d{3}[ls]$")
ALARM_TAIL_S = {"s": 30.0, "l": 60.0}  # by the name's last letter; anything else loses 30 s
DEFAULT_TAIL_S = 30.0


def subject_of(name: str) -> str:
    return f"{SOURCE}:{name}"


def is_challenge_record(name: str, comments: Sequence[str] = ()) -> bool:
    """A Challenge-2015 record: its name fits the pattern and a header comment says `True/False alarm`."""
    return bool(RECORD_NAME.match(name)) and any(c.strip().lower().endswith("alarm") for c in comments)


def alarm_tail_s(name: str) -> float:
    """Seconds cut off the end of a record: the alarm segment and, for `*l` records, what follows it."""
    return ALARM_TAIL_S.get(name[-1:], DEFAULT_TAIL_S)


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    listing = root / RECORDS_FILE
    if listing.is_file():
        keys = sorted({line.strip() for line in listing.read_text(errors="replace").splitlines() if line.strip()})
    else:
        keys = [header.relative_to(root).with_suffix("").as_posix() for header in list_headers(root)]
    if not keys:
        raise UserError(f"--input {root}: no Challenge 2015 records ({RECORDS_FILE} or *.hea) found")
    return keys


def read_record(root: Path, key: str) -> Record:
    rec = read_wfdb(Path(root) / key)
    name = Path(key).name
    record = to_record(rec, source=SOURCE, key=key, subject_id=subject_of(name))
    names = ", ".join(rec.sig_name or []) or "none"
    if record.ppg is None:
        raise RecordError(f"{key}: no usable PLETH signal (has {names})")
    if not record.ecg:
        raise RecordError(f"{key}: no usable ECG lead (has {names}; V and MCL map to no canonical lead)")
    tail_s = alarm_tail_s(name)
    keep = record.n_samples - round(tail_s * record.fs)
    if keep <= 0:
        raise RecordError(f"{key}: {record.n_samples / record.fs:.1f} s long, not longer than the {tail_s:.0f} s "
                          "alarm segment that is dropped")
    record.ecg = {lead: values[:keep] for lead, values in record.ecg.items()}
    ppg_fs = record.ppg_fs or record.fs
    record.ppg = record.ppg[: len(record.ppg) - round(tail_s * ppg_fs)]
    return record
