"""Reading a PPG signal from a WFDB record or a CSV file, and writing a 12-lead WFDB record.

WFDB input: a record path with or without `.hea` (any signal format wfdb reads, `.dat` or `.mat`).
The PPG channel is found by name (`PLETH`, `Pleth`, `PPG`, ... as ingest knows them) or named with
`--column`; the rate comes from the header. `# Age:`/`# Sex:` comments (or MIT-BIH's `<age> <sex>`
line) give demographics when the header has them.

CSV input (`.csv`, `.csv.gz`): one column of PPG samples, named with `--column` (names are matched
after stripping spaces, then case-insensitively; BIDMC's `" PLETH"` works as `PLETH`), at the rate
given with `--fs`, which a CSV cannot state. Without `--column`, a column named like a PPG is used.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2es_dist.constants import LEADS, SEX_UNKNOWN
from p2es_dist.errors import UserError

CSV_SUFFIXES = (".csv", ".csv.gz")
_RECORD_NAME = re.compile(r"^[-\w]+$")  # what wfdb accepts as a record name


@dataclass
class PPGSignal:
    values: np.ndarray  # (n,) float64 at `fs`, NaN where the file has gaps
    fs: float
    channel: str  # the column or channel it came from
    source: str  # the file, for messages and the output's comments
    age: float | None = None
    sex: int = SEX_UNKNOWN


def is_csv(path: str | Path) -> bool:
    return str(path).lower().endswith(CSV_SUFFIXES)


def read_ppg(path: str | Path, *, column: str | None = None, fs: float | None = None) -> PPGSignal:
    """A PPG signal from a WFDB record or a CSV (see the module docstring); UserError when unusable."""
    if is_csv(path):
        return read_csv_ppg(Path(path), column=column, fs=fs)
    if fs is not None:
        raise UserError(f"--fs: only for CSV input; the WFDB header of {path} states its rate")
    return read_wfdb_ppg(Path(path), column=column)


def _match_column(names: list[str], wanted: str) -> str | None:
    """The name in `names` equal to `wanted` after stripping spaces, else case-insensitively."""
    for name in names:
        if name.strip() == wanted.strip():
            return name
    for name in names:
        if name.strip().lower() == wanted.strip().lower():
            return name
    return None


def read_csv_ppg(path: Path, *, column: str | None, fs: float | None) -> PPGSignal:
    import pandas as pd

    from p2es_dist.data.sources.wfdb_common import is_ppg

    if not path.exists():
        raise UserError(f"--input {path}: no such file")
    if fs is None:
        raise UserError(f"--fs: required for CSV input {path} (the sampling rate in Hz; a CSV cannot state it)")
    if not fs > 0:
        raise UserError(f"--fs: expected a positive rate in Hz, got {fs}")
    try:
        table = pd.read_csv(path)
    except Exception as exc:  # pandas raises several parser error types
        raise UserError(f"--input {path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    names = [str(name) for name in table.columns]
    listed = ", ".join(repr(name.strip()) for name in names)
    if column is None:
        found = [name for name in names if is_ppg(name)]
        if not found:
            raise UserError(f"--column: required for {path}: no column is named like a PPG (columns: {listed})")
        chosen = found[0]
    else:
        chosen = _match_column(names, column)
        if chosen is None:
            raise UserError(f"--column {column!r}: not a column of {path} (columns: {listed})")
    values = pd.to_numeric(table[chosen], errors="coerce").to_numpy(dtype=np.float64)
    return PPGSignal(values=values, fs=float(fs), channel=chosen.strip(), source=str(path))


def _record_path(path: Path) -> Path:
    """`rec`, `rec.hea` -> `rec` (the form wfdb reads)."""
    return path.with_suffix("") if path.suffix.lower() == ".hea" else path


def read_wfdb_ppg(path: Path, *, column: str | None) -> PPGSignal:
    from p2es_dist.data.record import RecordError
    from p2es_dist.data.sources.wfdb_common import channels, demographics, is_ppg, read_wfdb

    record_path = _record_path(path)
    if not Path(f"{record_path}.hea").exists():
        raise UserError(f"--input {path}: no WFDB header {record_path}.hea (for a CSV, name it *.csv or *.csv.gz)")
    try:
        record = read_wfdb(record_path)
    except RecordError as exc:
        raise UserError(f"--input {path}: {exc}") from None
    chans = channels(record)
    names = [chan.name for chan in chans]
    listed = ", ".join(names) or "none"
    if column is not None:
        match = _match_column(names, column)
        picked = [chan for chan in chans if chan.name == match]
        if match is None:
            raise UserError(f"--column {column!r}: no such channel in {record_path}.hea (channels: {listed})")
    else:
        picked = [chan for chan in chans if is_ppg(chan.name)]
        if not picked:
            raise UserError(f"--input {path}: no PPG channel (PLETH/PPG) among its channels ({listed}); "
                            "name one with --column")
    chan = picked[0]
    age, sex = demographics(record.comments or [])
    return PPGSignal(values=np.asarray(chan.values, dtype=np.float64), fs=chan.fs, channel=chan.name,
                     source=str(path), age=age, sex=sex)


def write_ecg_record(prefix: str | Path, ecg_mv: np.ndarray, *, fs: float, comments: list[str]) -> list[Path]:
    """(12, n) ECG in mV -> `PREFIX.hea` + `PREFIX.dat` (format 16, leads in `constants.LEADS` order).

    Both files are written in a temp folder beside the target and moved in, the data file first, so a
    reader never finds a header whose data is not there yet.
    """
    import wfdb

    prefix = Path(prefix)
    name = prefix.name
    if not _RECORD_NAME.match(name):
        raise UserError(f"--out {prefix}: the record name {name!r} may hold only letters, digits, '_' and '-'")
    if ecg_mv.shape[0] != len(LEADS) or not np.all(np.isfinite(ecg_mv)):
        raise ValueError(f"expected 12 finite leads, got shape {ecg_mv.shape}")
    directory = prefix.parent
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".{name}.") as scratch:
        wfdb.wrsamp(name, fs=fs, units=["mV"] * len(LEADS), sig_name=list(LEADS),
                    p_signal=np.ascontiguousarray(ecg_mv.T, dtype=np.float64), fmt=["16"] * len(LEADS),
                    comments=comments, write_dir=scratch)
        written = []
        for suffix in (".dat", ".hea"):
            target = directory / f"{name}{suffix}"
            os.replace(Path(scratch) / f"{name}{suffix}", target)
            written.append(target)
    return written
