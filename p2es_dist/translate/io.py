"""Reading a PPG signal from a WFDB record or a CSV file, and writing a 12-lead WFDB record.

WFDB input: a record path with or without `.hea` (any signal format wfdb reads, `.dat` or `.mat`).
The PPG channel is found by name (`PLETH`, `Pleth`, `PPG`, ... as ingest knows them) or named with
`--column`; the rate comes from the header. `# Age:`/`# Sex:` comments (or MIT-BIH's `<age> <sex>`
line) give demographics when the header has them.

CSV input (`.csv`, `.csv.gz`): one column of PPG samples, named with `--column` (names are matched
after stripping spaces, then case-insensitively; BIDMC's `" PLETH"` works as `PLETH`), at the rate
given with `--fs`, which a CSV cannot state. Without `--column`, a column named like a PPG is used.
Rates outside `FS_RANGE_HZ` (10 Hz to 10 kHz), from `--fs` or a header, are refused.

Both are read in pieces (`PPGStream.chunks`): a CSV with pandas' `chunksize`, the PPG channel alone; a
single-segment WFDB record with `wfdb.rdrecord(sampfrom=, sampto=)`. A multi-segment WFDB record is read
whole (wfdb merges its segments in memory). `EcgRecordWriter` writes the output the same way, in pieces.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from p2es_dist.constants import LEADS, SEX_UNKNOWN
from p2es_dist.errors import UserError

CSV_SUFFIXES = (".csv", ".csv.gz")
_RECORD_NAME = re.compile(r"^[-\w]+$")  # what wfdb accepts as a record name
# Below 10 Hz the PPG's pulse shape (up to ~8 Hz) is gone; no PPG device samples above 10 kHz, and a
# typo such as 1e6 would otherwise ask resample_poly for ratios it cannot approximate.
FS_RANGE_HZ = (10.0, 10_000.0)
READ_CHUNK = 1 << 18  # input samples per piece read


def check_fs(fs: float, *, what: str = "--fs") -> float:
    """`fs` as a float when it is a finite rate within `FS_RANGE_HZ`; UserError naming `what` otherwise."""
    low, high = FS_RANGE_HZ
    if not (isinstance(fs, int | float) and math.isfinite(fs) and low <= fs <= high):
        raise UserError(f"{what}: expected a sampling rate between {low:g} and {high:g} Hz, got {fs}")
    return float(fs)


@dataclass
class PPGSignal:
    values: np.ndarray  # (n,) float64 at `fs`, NaN where the file has gaps
    fs: float
    channel: str  # the column or channel it came from
    source: str  # the file, for messages and the output's comments
    age: float | None = None
    sex: int = SEX_UNKNOWN

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for first in range(0, len(self.values), size):
            yield np.asarray(self.values[first:first + size], dtype=np.float64)


@dataclass
class PPGStream:
    """A PPG input read in pieces: what `PPGSignal` says about it, without holding its samples."""

    fs: float
    channel: str
    source: str
    age: float | None = None
    sex: int = SEX_UNKNOWN
    columns: tuple[str, ...] = ()  # every column or channel name of the input
    read: Callable[[int], Iterator[np.ndarray]] = field(default=lambda size: iter(()), repr=False)

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """The samples in order as float64, at most `size` at a time, NaN where the file has none."""
        return self.read(size)


def is_csv(path: str | Path) -> bool:
    return str(path).lower().endswith(CSV_SUFFIXES)


def open_ppg(path: str | Path, *, column: str | None = None, fs: float | None = None) -> PPGStream:
    """A PPG input, checked but not yet read (see the module docstring); UserError when unusable."""
    if is_csv(path):
        return open_csv_ppg(Path(path), column=column, fs=fs)
    if fs is not None:
        raise UserError(f"--fs: only for CSV input; the WFDB header of {path} states its rate")
    return open_wfdb_ppg(Path(path), column=column)


def read_ppg(path: str | Path, *, column: str | None = None, fs: float | None = None) -> PPGSignal:
    """A PPG signal from a WFDB record or a CSV, all of it in memory; UserError when unusable."""
    stream = open_ppg(path, column=column, fs=fs)
    pieces = list(stream.chunks(READ_CHUNK))
    values = np.concatenate(pieces) if pieces else np.zeros(0)
    return PPGSignal(values=values, fs=stream.fs, channel=stream.channel, source=stream.source, age=stream.age,
                     sex=stream.sex)


def _match_column(names: list[str], wanted: str) -> str | None:
    """The name in `names` equal to `wanted` after stripping spaces, else case-insensitively."""
    for name in names:
        if name.strip() == wanted.strip():
            return name
    for name in names:
        if name.strip().lower() == wanted.strip().lower():
            return name
    return None


def open_csv_ppg(path: Path, *, column: str | None, fs: float | None) -> PPGStream:
    import pandas as pd

    from p2es_dist.data.sources.wfdb_common import is_ppg

    if not path.exists():
        raise UserError(f"--input {path}: no such file")
    if fs is None:
        raise UserError(f"--fs: required for CSV input {path} (the sampling rate in Hz; a CSV cannot state it)")
    fs = check_fs(fs)
    try:
        names = [str(name) for name in pd.read_csv(path, nrows=0).columns]
    except Exception as exc:  # pandas raises several parser error types
        raise UserError(f"--input {path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
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

    def read(size: int) -> Iterator[np.ndarray]:
        try:
            for part in pd.read_csv(path, usecols=[chosen], chunksize=size):
                yield pd.to_numeric(part[chosen], errors="coerce").to_numpy(dtype=np.float64)
        except Exception as exc:  # pandas and the decompressors raise many error types
            raise UserError(f"--input {path}: not a readable CSV ({type(exc).__name__}: {exc})") from None

    return PPGStream(fs=fs, channel=chosen.strip(), source=str(path), columns=tuple(n.strip() for n in names),
                     read=read)


def _record_path(path: Path) -> Path:
    """`rec`, `rec.hea` -> `rec` (the form wfdb reads)."""
    return path.with_suffix("") if path.suffix.lower() == ".hea" else path


def open_wfdb_ppg(path: Path, *, column: str | None) -> PPGStream:
    import wfdb

    from p2es_dist.data.record import RecordError
    from p2es_dist.data.sources import wfdb_common as common_wfdb

    record_path = _record_path(path)
    if not Path(f"{record_path}.hea").exists():
        raise UserError(f"--input {path}: no WFDB header {record_path}.hea (for a CSV, name it *.csv or *.csv.gz)")
    try:
        header = common_wfdb.read_header(record_path)
    except RecordError as exc:
        raise UserError(f"--input {path}: {exc}") from None
    # wfdb merges a multi-segment record's segments (or finds a length the header omits) only by reading it
    # whole; such records are held in memory.
    whole = None
    if isinstance(header, wfdb.MultiRecord) or not header.sig_len:
        try:
            whole = common_wfdb.channels(common_wfdb.read_wfdb(record_path))
        except RecordError as exc:
            raise UserError(f"--input {path}: {exc}") from None
    names = [chan.name for chan in whole] if whole is not None else list(header.sig_name or [])
    listed = ", ".join(names) or "none"
    if column is not None:
        match = _match_column(names, column)
        if match is None:
            raise UserError(f"--column {column!r}: no such channel in {record_path}.hea (channels: {listed})")
    else:
        match = next((name for name in names if common_wfdb.is_ppg(name)), None)
        if match is None:
            raise UserError(f"--input {path}: no PPG channel (PLETH/PPG) among its channels ({listed}); "
                            "name one with --column")
    index = names.index(match)
    age, sex = common_wfdb.demographics(header.comments or [])
    common = {"channel": match, "source": str(path), "age": age, "sex": sex, "columns": tuple(names)}
    what = f"--input {path}: channel {match}'s rate"
    if whole is not None:
        chan = whole[index]
        signal = PPGSignal(values=np.asarray(chan.values, dtype=np.float64), fs=chan.fs, channel=match, source="")
        return PPGStream(fs=check_fs(chan.fs, what=what), read=signal.chunks, **common)
    try:
        common_wfdb.check_signal_files(header, record_path.parent)
    except RecordError as exc:
        raise UserError(f"--input {path}: {exc}") from None
    frame = list(header.samps_per_frame or [1] * len(names))
    per_frame = frame[index] or 1
    smooth = all((n or 1) == 1 for n in frame)  # as `read_wfdb`: multi-rate records are read unsmoothed
    fs = check_fs(float(header.fs) * per_frame, what=what)

    def read(size: int) -> Iterator[np.ndarray]:
        frames = max(1, size // per_frame)
        for first in range(0, header.sig_len, frames):
            try:
                record = wfdb.rdrecord(str(record_path), sampfrom=first, sampto=min(header.sig_len, first + frames),
                                       channels=[index], smooth_frames=smooth)
            except Exception as exc:  # wfdb's own errors; keep them, as read_wfdb does
                raise UserError(f"--input {path}: wfdb could not read the signals ({type(exc).__name__}: "
                                f"{exc})") from None
            # Through float32, as `channels` gives every reader its samples.
            yield np.asarray(common_wfdb.channels(record)[0].values, dtype=np.float64)

    return PPGStream(fs=fs, read=read, **common)


class EcgRecordWriter:
    """A 12-lead record written in pieces: `append` (12, m) blocks in mV in order, then `finish`.

    The blocks wait in a float32 file in a temp folder beside the target; `finish` then picks each lead's
    ADC gain and baseline from its range exactly as `wfdb.wrsamp` does (format 16), converts the file piece
    by piece, writes the header, and moves both files in, the data file first, so a reader never finds a
    header whose data is not there yet. Memory: one piece, whatever the record's length.
    """

    def __init__(self, prefix: str | Path, *, fs: float, piece: int = 1 << 16) -> None:
        prefix = Path(prefix)
        if not _RECORD_NAME.match(prefix.name):
            raise UserError(f"--out {prefix}: the record name {prefix.name!r} may hold only letters, digits, "
                            "'_' and '-'")
        self.prefix, self.fs, self.piece, self.n = prefix, float(fs), piece, 0
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = tempfile.TemporaryDirectory(dir=prefix.parent, prefix=f".{prefix.name}.")
        self.scratch = Path(self._scratch.name)  # also holds the caller's temporary files
        self._raw_path = self.scratch / "ecg.f32"
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 - closed by finish/close
        self._low = np.full(len(LEADS), np.inf)
        self._high = np.full(len(LEADS), -np.inf)

    def __enter__(self) -> EcgRecordWriter:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def append(self, block: np.ndarray) -> None:
        rows = np.ascontiguousarray(np.asarray(block).T, dtype=np.float32)  # (m, 12): wfdb's sample order
        if rows.ndim != 2 or rows.shape[1] != len(LEADS) or not np.all(np.isfinite(rows)):
            raise ValueError(f"expected 12 finite leads, got shape {np.shape(block)}")
        if len(rows):
            self._low = np.minimum(self._low, rows.min(axis=0))
            self._high = np.maximum(self._high, rows.max(axis=0))
        self._raw.write(rows.tobytes())
        self.n += len(rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        """(12, m) float64: the samples appended so far in [start, stop)."""
        self._raw.flush()
        start, stop = max(0, start), min(stop, self.n)
        rows = np.fromfile(self._raw_path, dtype=np.float32, count=max(0, stop - start) * len(LEADS),
                           offset=start * len(LEADS) * 4)
        return rows.reshape(-1, len(LEADS)).T.astype(np.float64)

    def lead(self, index: int) -> np.ndarray:
        """(n,) one lead of everything appended (4 bytes a sample)."""
        self._raw.flush()
        rows = np.memmap(self._raw_path, dtype=np.float32, mode="r", shape=(self.n, len(LEADS)))
        return np.array(rows[:, index], dtype=np.float64)

    def finish(self, comments: list[str]) -> list[Path]:
        """Write PREFIX.dat + PREFIX.hea; returns their paths."""
        import wfdb

        if self.n == 0:
            raise ValueError("no samples appended")
        name, fmt = self.prefix.name, ["16"] * len(LEADS)
        gains, baselines = wfdb.Record(p_signal=np.stack([self._low, self._high]).astype(np.float64),
                                       fmt=fmt).calc_adc_params()
        checksum = np.zeros(len(LEADS), dtype=np.int64)
        first = None
        with open(self.scratch / f"{name}.dat", "wb") as dat:
            for start in range(0, self.n, self.piece):
                physical = self.read(start, start + self.piece).T
                digital = wfdb.Record(p_signal=physical, fmt=fmt, adc_gain=gains, baseline=baselines).adc()
                first = digital[0] if first is None else first
                checksum += digital.sum(axis=0)
                dat.write(digital.astype("<i2").tobytes())
        header = wfdb.Record(record_name=name, n_sig=len(LEADS), fs=self.fs, sig_len=self.n,
                             file_name=[f"{name}.dat"] * len(LEADS), fmt=fmt, adc_gain=gains, baseline=baselines,
                             units=["mV"] * len(LEADS), sig_name=list(LEADS), init_value=list(first),
                             checksum=[int(c) for c in checksum % 65536], comments=comments)
        header.set_defaults()
        header.wrheader(write_dir=str(self.scratch), expanded=False)
        written = []
        for suffix in (".dat", ".hea"):
            target = self.prefix.parent / f"{name}{suffix}"
            os.replace(self.scratch / f"{name}{suffix}", target)
            written.append(target)
        return written

    def close(self) -> None:
        self._raw.close()
        self._scratch.cleanup()


def write_ecg_record(prefix: str | Path, ecg_mv: np.ndarray, *, fs: float, comments: list[str]) -> list[Path]:
    """(12, n) ECG in mV -> `PREFIX.hea` + `PREFIX.dat` (format 16, leads in `constants.LEADS` order)."""
    with EcgRecordWriter(prefix, fs=fs) as writer:
        writer.append(ecg_mv)
        return writer.finish(comments)
