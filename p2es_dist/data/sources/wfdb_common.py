"""WFDB helpers every WFDB-based reader shares: signal names -> canonical leads, physical units in mV,
header comments -> demographics, and a checked read that turns wfdb's cryptic failures into reasons.

Signals are picked by name, never by position. ECG aliases are case-insensitive (`II`, `ii`, `MLII`,
`DII`, `lead II`...); a chest lead named only `V` or `MCL` is skipped because its electrode position
is unknown; Frank leads (`vx`, `vy`, `vz`) are skipped. PPG is `PLETH`/`Pleth`/`PPG`.

Multi-rate records (`samps_per_frame` > 1) are read unsmoothed, each signal at its own rate. The ECG
keeps the leads at the highest ECG rate (the others are dropped); PPG keeps its own rate in
`Record.ppg_fs`. Nothing is resampled here: preprocessing does that for every source.

Before wfdb reads a record, each signal file's size is checked against the header's sample count, so
a `.dat`/`.mat` cut short, or a header whose sample count lies, ends as a RecordError that says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

from p2es_dist.constants import LEAD_INDEX, SEX_FEMALE, SEX_MALE, SEX_UNKNOWN
from p2es_dist.data.record import Record, RecordError

_LIMB = {"i": "I", "ii": "II", "iii": "III", "avr": "aVR", "avl": "aVL", "avf": "aVF"}
LEAD_ALIASES: dict[str, str] = {
    **_LIMB,
    **{f"v{n}": f"V{n}" for n in range(1, 7)},
    # MIT-BIH's modified limb leads; Brazilian/CODE naming DI, DII, DIII (also D1-D3).
    "mli": "I", "mlii": "II", "mliii": "III",
    "di": "I", "dii": "II", "diii": "III", "d1": "I", "d2": "II", "d3": "III",
}
PPG_NAMES = frozenset({"pleth", "ppg", "plethysmogram", "photoplethysmogram"})
_NAME_PREFIX = re.compile(r"^(ecg|lead)[\s_-]*")

# Voltage units (lowercase; CinC's PTB-XL part writes `mv`) -> factor to mV.
_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}

# Bytes per sample of the fixed-width WFDB formats; FLAC (508/516/524) has no fixed size.
_FORMAT_BYTES = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3,
                 "311": 4 / 3}


def canonical_lead(name: str) -> str | None:
    """`'MLII'`/`'ii'`/`'DII'`/`'lead II'` -> `'II'`; None for anything that is not one of the 12 leads."""
    text = _NAME_PREFIX.sub("", name.strip().lower())
    return LEAD_ALIASES.get(text)


def is_ppg(name: str) -> bool:
    return name.strip().lower() in PPG_NAMES


def mv_factor(units: str | None) -> float | None:
    """Multiplier from a header's units to mV; None when the units are not a voltage."""
    return _TO_MV.get((units or "").strip().lower())


def parse_age(text: str | float | None) -> float | None:
    """'89' -> 89.0, '90+'/'>89' -> 90.0 (top-coded ages), 'NaN'/'Unknown'/'' -> None."""
    if text is None:
        return None
    raw = str(text).strip()
    top_coded = raw.endswith("+") or raw.startswith(">")
    try:
        age = float(raw.strip("+>"))
    except ValueError:
        return None
    if math.isnan(age) or age < 0:
        return None
    return max(age, 90.0) if top_coded else age


def parse_sex(text: str | None) -> int:
    """'M'/'Male'/'male' -> 1, 'F'/'Female' -> 0, anything else -> -1."""
    initial = (text or "").strip().upper()[:1]
    return {"F": SEX_FEMALE, "M": SEX_MALE}.get(initial, SEX_UNKNOWN)


def comment_fields(comments: Iterable[str]) -> dict[str, str]:
    """`Key: value` header comments with lowercase keys (`# Age: 61`, `#<sex>: F`, `# age: 81`)."""
    fields = {}
    for line in comments:
        key, sep, value = line.strip().lstrip("#").partition(":")
        key = key.strip().strip("<>").strip().lower()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    return fields


_MITBIH_DEMOGRAPHICS = re.compile(r"^\s*(\d{1,3}|\?)\s+([MF?])(\s|$)")


def demographics(comments: Sequence[str]) -> tuple[float | None, int]:
    """(age, sex) from `Age:`/`Sex:` comments, or MIT-BIH's `<age> <sex> ...` first comment line."""
    fields = comment_fields(comments)
    if "age" in fields or "sex" in fields:
        return parse_age(fields.get("age")), parse_sex(fields.get("sex"))
    for line in comments:
        match = _MITBIH_DEMOGRAPHICS.match(line)
        if match:
            return parse_age(match.group(1)), parse_sex(match.group(2))
    return None, SEX_UNKNOWN


def dx_codes(comments: Iterable[str]) -> list[str]:
    """SNOMED codes of a CinC-style `# Dx: 164889003,59118001` comment (empty when absent)."""
    text = comment_fields(comments).get("dx", "")
    return [token.strip() for token in text.split(",") if token.strip()]


def read_header(path: Path) -> wfdb.Record | wfdb.MultiRecord:
    """The header of `path` (no extension), or RecordError saying why it cannot be read."""
    if not Path(f"{path}.hea").exists():
        raise RecordError(f"{path.name}.hea: header file not found")
    try:
        return wfdb.rdheader(str(path))
    except Exception as exc:  # wfdb raises bare ValueError/IndexError on malformed headers
        raise RecordError(f"{path.name}.hea: unreadable header ({type(exc).__name__}: {exc})") from None


def check_signal_files(header: wfdb.Record, directory: Path) -> None:
    """Raise RecordError when a signal file is missing or shorter than the header's sample count."""
    if not header.file_name or not header.sig_len:
        return
    spf = header.samps_per_frame or [1] * len(header.file_name)
    offsets = header.byte_offset or [None] * len(header.file_name)
    files: dict[str, list] = {}  # file -> [format, byte offset, samples per frame over its signals]
    for i, file_name in enumerate(header.file_name):
        entry = files.setdefault(file_name, [str(header.fmt[i]), offsets[i] or 0, 0])
        entry[2] += spf[i] or 1
    for file_name, (fmt, offset, frame) in files.items():
        path = directory / file_name
        if not path.exists():
            raise RecordError(f"{file_name}: signal file missing")
        if fmt not in _FORMAT_BYTES:
            continue
        size = path.stat().st_size
        needed = offset + math.ceil(header.sig_len * frame * _FORMAT_BYTES[fmt])
        if size < needed:
            held = max(0, int((size - offset) / (frame * _FORMAT_BYTES[fmt])))
            raise RecordError(
                f"{file_name}: holds {held} of the {header.sig_len} samples per signal that "
                f"{header.record_name}.hea declares (truncated file, or a header whose sample count lies)"
            )


def read_wfdb(path: Path, *, physical: bool = True) -> wfdb.Record:
    """A checked `wfdb.rdrecord`: multi-segment records merged (m2s), multi-rate records unsmoothed
    (`e_p_signal`), failures as RecordError with a reason. `physical=False` keeps digital samples."""
    path = Path(path)
    header = read_header(path)
    multi_segment = isinstance(header, wfdb.MultiRecord)
    if multi_segment:
        for segment in header.seg_name:
            if segment != "~":
                segment_header = read_header(path.parent / segment)
                if isinstance(segment_header, wfdb.Record):
                    check_signal_files(segment_header, path.parent)
        smooth = True
    else:
        check_signal_files(header, path.parent)
        smooth = all((n or 1) == 1 for n in (header.samps_per_frame or []))
    try:
        if multi_segment:
            return wfdb.rdrecord(str(path), m2s=True, physical=physical)
        return wfdb.rdrecord(str(path), smooth_frames=smooth, physical=physical)
    except Exception as exc:  # wfdb's own errors ("cannot reshape array ...") say little; keep them
        raise RecordError(f"{path.name}: wfdb could not read the signals ({type(exc).__name__}: {exc})") from None


@dataclass
class Channel:
    name: str
    units: str
    fs: float
    values: np.ndarray


def channels(rec: wfdb.Record) -> list[Channel]:
    """Every signal of a record with its own rate (unsmoothed multi-rate records included)."""
    names = list(rec.sig_name or [])
    units = list(rec.units or ["mV"] * len(names))
    if rec.e_p_signal is not None:
        spf = rec.samps_per_frame or [1] * len(names)
        return [Channel(n, u, float(rec.fs) * (k or 1), np.asarray(v, dtype=np.float32))
                for n, u, k, v in zip(names, units, spf, rec.e_p_signal, strict=True)]
    if rec.p_signal is None:
        return []
    signal = np.asarray(rec.p_signal, dtype=np.float32).T  # one contiguous row per signal
    return [Channel(n, u, float(rec.fs), np.ascontiguousarray(signal[i]))
            for i, (n, u) in enumerate(zip(names, units, strict=True))]


@dataclass
class Signals:
    ecg: dict[str, np.ndarray]  # canonical lead -> samples, in `ecg_units`, canonical lead order
    fs: float  # rate of the ECG (of the PPG when there is no ECG)
    ecg_units: str
    ppg: np.ndarray | None
    ppg_fs: float | None  # only when the PPG rate differs from `fs`


def pick_signals(chans: Sequence[Channel], *, context: str) -> Signals:
    """ECG leads (in mV) and PPG picked by name from a record's channels.

    The first channel per lead wins; channels without one finite sample carry nothing and are dropped. Leads whose units
    are not a voltage are kept (as `au`) only when no lead has voltage units.
    """
    leads: dict[str, Channel] = {}
    ppg: Channel | None = None
    for chan in chans:
        if not np.isfinite(chan.values).any():
            continue
        lead = canonical_lead(chan.name)
        if lead is not None:
            leads.setdefault(lead, chan)
        elif ppg is None and is_ppg(chan.name):
            ppg = chan
    if not leads and ppg is None:
        names = ", ".join(c.name for c in chans) or "none"
        raise RecordError(f"{context}: no usable ECG lead or PPG among its signals ({names})")

    in_volts = {lead: chan for lead, chan in leads.items() if mv_factor(chan.units) is not None}
    kept = in_volts or leads
    fs = max((chan.fs for chan in kept.values()), default=ppg.fs if ppg is not None else 0.0)
    ecg: dict[str, np.ndarray] = {}
    for lead in sorted(kept, key=LEAD_INDEX.__getitem__):
        chan = kept[lead]
        if chan.fs == fs:  # multi-rate ECG: keep the leads at the highest rate
            factor = mv_factor(chan.units) if in_volts else 1.0
            ecg[lead] = chan.values * np.float32(factor) if factor != 1.0 else chan.values
    return Signals(
        ecg=ecg,
        fs=fs,
        ecg_units="mV" if in_volts or not leads else "au",
        ppg=None if ppg is None else ppg.values,
        ppg_fs=None if ppg is None or ppg.fs == fs else ppg.fs,
    )


def to_record(
    rec: wfdb.Record,
    *,
    source: str,
    key: str,
    subject_id: str,
    age: float | None = None,
    sex: int = SEX_UNKNOWN,
    labels: Sequence[str] = (),
    split: str | None = None,
) -> Record:
    """Our Record from a wfdb.Record read by `read_wfdb`."""
    signals = pick_signals(channels(rec), context=key)
    return Record(
        source=source, record=key, subject_id=subject_id, fs=signals.fs, ecg=signals.ecg, ppg=signals.ppg,
        ppg_fs=signals.ppg_fs, age=age, sex=sex, labels=list(labels), split=split, ecg_units=signals.ecg_units,
    )


def list_headers(root: Path, *, pattern: str = "*.hea") -> list[Path]:
    """Header files under `root`, without multi-segment layout headers (`*_layout.hea`)."""
    return sorted(p for p in Path(root).rglob(pattern) if not p.stem.endswith("_layout"))


def header_first_line(path: Path) -> list[str]:
    """Tokens of a header's record line (the first line that is not a comment), read cheaply."""
    with open(path, errors="replace") as handle:
        for line in handle:
            if line.strip() and not line.lstrip().startswith("#"):
                return line.split()
    return []


def record_files(path: Path) -> list[Path]:
    """The files a WFDB record (`path` without extension) is read from: its header, the signal files the
    header names and, for a multi-segment record, each segment's files. Missing files are left out (the
    reader says why); annotation files are not part of a record's signals."""
    header = Path(f"{path}.hea")
    if not header.is_file():
        return []
    files = [header]
    tokens = header_first_line(header)
    if tokens and "/" in tokens[0]:
        for name in segment_names(header):
            if name != header.stem:  # a master never lists itself; guards against a malformed one
                files += [f for f in record_files(header.parent / name) if f not in files]
        return files
    with open(header, errors="replace") as handle:
        lines = [line.split() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    for signal_line in lines[1:]:
        file = header.parent / signal_line[0]
        if file.is_file() and file not in files:
            files.append(file)
    return files


def segment_names(master: Path) -> list[str]:
    """Segment record names listed by a multi-segment master header (`~` gaps excluded)."""
    names, seen_record_line = [], False
    with open(master, errors="replace") as handle:
        for line in handle:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not seen_record_line:
                seen_record_line = True
                continue
            name = line.split()[0]
            if name != "~":
                names.append(name)
    return names

