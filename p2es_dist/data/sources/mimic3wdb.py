"""MIMIC-III Waveform Database, matched-subset layout (source `mimic3wdb`).

Layout: `[pXX/]pNNNNNN/<record>_NNNN.hea/.dat` segments of a multi-segment record `<record>`, often
with a master header `<record>.hea` and `<record>_layout.hea`. The master may be absent (as in
`../shared/data/wfdb_samples/multi-segment/p000878`). Keys are `<folders>/<record>`; the subject is the
`pNNNNNN` folder (the patient), so every record of a patient lands in one split.

Segments are assembled on one time axis, NaN where a segment lacks a signal or between segments:
with a master header, from its segment lengths (`~` entries are gaps); without one, from each
segment's base time (snapped to the previous segment's end when within 1 s, the header's resolution;
a time before the previous end is taken as the next day). Signals are picked by name (`II`, `AVR`,
`PLETH`...); `V` and `MCL` are skipped as their chest position is unknown. Numerics records (`*n`) and
the patient-level `pNNNNNN-YYYY-...` headers are not read. The waveform headers carry no demographics
or diagnoses: age, sex and labels stay unknown (link the MIMIC-III clinical database for them).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import wfdb

from p2es_dist.data.record import Record, RecordError
from p2es_dist.data.sources.wfdb_common import Channel, channels, pick_signals, read_header, read_wfdb
from p2es_dist.errors import UserError

SOURCE = "mimic3wdb"
_SEGMENT = re.compile(r"^(\d+)_(\d{4})$")
_PATIENT = re.compile(r"^p\d{6}$")
_SNAP_S = 1.0  # base times have one-second resolution
_DAY_S = 86400.0


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    keys = set()
    for header in root.rglob("*_[0-9][0-9][0-9][0-9].hea"):
        match = _SEGMENT.match(header.stem)
        if match:
            keys.add((header.parent.relative_to(root) / match.group(1)).as_posix())
    if not keys:
        raise UserError(f"--input {root}: no MIMIC-III waveform segments (<record>_NNNN.hea) found")
    return sorted(keys)


def subject_of(root: Path, key: str) -> str:
    """The nearest `pNNNNNN` folder (the root itself may be one), else the record."""
    parts = [Path(root).resolve().name, *PurePosixPath(key).parts[:-1]]
    for part in reversed(parts):
        if _PATIENT.match(part):
            return part
    return key


def _layout_from_master(master: wfdb.MultiRecord) -> list[tuple[str | None, float]]:
    """(segment name or None for a gap, start in seconds) from the master's segment lengths."""
    layout, start = [], 0.0
    for name, length in zip(master.seg_name, master.seg_len, strict=True):
        if name.endswith("_layout") or not length:
            continue
        layout.append((None if name == "~" else name, start))
        start += length / float(master.fs)
    return layout


def _seconds(time) -> float:
    return time.hour * 3600 + time.minute * 60 + time.second + time.microsecond / 1e6


def _layout_from_base_times(headers: list[wfdb.Record]) -> list[tuple[str | None, float]]:
    """(segment name, start in seconds) from each segment's base time, relative to the first."""
    origin = headers[0].base_time
    layout, end = [], 0.0
    for header in headers:
        if origin is None or header.base_time is None:
            start = end
        else:
            start = _seconds(header.base_time) - _seconds(origin)
            while start < end - _SNAP_S:
                start += _DAY_S
            if abs(start - end) < _SNAP_S:
                start = end
        layout.append((header.record_name, start))
        end = start + (header.sig_len or 0) / float(header.fs)
    return layout


def read_record(root: Path, key: str) -> Record:
    root = Path(root)
    directory, record = (root / key).parent, PurePosixPath(key).name
    master_path = directory / f"{record}.hea"
    if master_path.exists():
        master = read_header(directory / record)
        if not isinstance(master, wfdb.MultiRecord):
            raise RecordError(f"{key}.hea: expected a multi-segment master header")
        layout = _layout_from_master(master)
    else:
        segment_paths = sorted(directory.glob(f"{record}_[0-9][0-9][0-9][0-9].hea"))
        if not segment_paths:
            raise RecordError(f"{key}: no segments found")
        headers = [read_header(path.with_suffix("")) for path in segment_paths]
        layout = _layout_from_base_times(headers)

    pieces: list[tuple[float, list[Channel]]] = []
    for name, start in layout:
        if name is not None:
            pieces.append((start, channels(read_wfdb(directory / name))))
    if not pieces:
        raise RecordError(f"{key}: the master header lists no signal segments")
    rates = {chan.fs for _, chans in pieces for chan in chans}
    total_s = max(start + len(chan.values) / chan.fs for start, chans in pieces for chan in chans)

    merged: dict[str, Channel] = {}
    for start, chans in pieces:
        for chan in chans:
            if chan.name in merged and merged[chan.name].fs != chan.fs:
                raise RecordError(f"{key}: signal {chan.name} changes rate between segments ({sorted(rates)})")
            target = merged.get(chan.name)
            if target is None:
                values = np.full(int(round(total_s * chan.fs)), np.nan, dtype=np.float32)
                target = merged[chan.name] = Channel(chan.name, chan.units, chan.fs, values)
            first = int(round(start * chan.fs))
            stop = min(first + len(chan.values), len(target.values))
            target.values[first:stop] = chan.values[: stop - first]

    signals = pick_signals(list(merged.values()), context=key)
    return Record(
        source=SOURCE, record=key, subject_id=subject_of(root, key), fs=signals.fs, ecg=signals.ecg,
        ppg=signals.ppg, ppg_fs=signals.ppg_fs, ecg_units=signals.ecg_units,
    )
