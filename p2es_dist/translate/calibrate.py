"""`p2es calibrate`: a paired ECG + PPG segment of one patient -> that patient's calibration profile.

    p2es calibrate --input ../shared/data/wfdb_samples/a103l --seconds 60 --out a103l_profile.json
    p2es translate --model bundles/p2es --input ../shared/data/wfdb_samples/a103l \
        --calibration a103l_profile.json --out out/a103l_ecg --png out/a103l_ecg.png

The input is a WFDB record (or a CSV with `--fs`) holding at least one ECG lead and a PPG channel,
found by name as ingest finds them. Both are preprocessed exactly as ingest does (resampling, band-pass,
gap checks: `data.preprocess.condition_signal`), then `data.calibration.estimate_profile` measures the
pulse arrival time and the mean beat per recorded lead over `--seconds` starting at `--start`.
The profile is JSON (see `data/calibration.py`); nothing of the model goes into it, so one profile
serves every model. `--model` only supplies the bundle's preprocessing (filter bands).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2es_dist.constants import FS
from p2es_dist.data.calibration import CalibrationProfile, estimate_profile
from p2es_dist.data.preprocess import PreprocessConfig, condition_signal
from p2es_dist.errors import UserError


@dataclass
class PairedSignals:
    ecg: dict[str, np.ndarray]  # canonical lead -> raw samples at `fs`
    fs: float
    ppg: np.ndarray
    ppg_fs: float
    units: str
    source: str


def read_paired(path: str | Path, *, fs: float | None = None) -> PairedSignals:
    """ECG leads and PPG of one record (WFDB, or CSV at `fs`); UserError naming what is missing."""
    from p2es_dist.data.record import RecordError
    from p2es_dist.data.sources.wfdb_common import Channel, channels, pick_signals, read_wfdb
    from p2es_dist.translate.io import _record_path, is_csv

    path = Path(path)
    if is_csv(path):
        import pandas as pd

        if fs is None or not fs > 0:
            raise UserError(f"--fs: required for CSV input {path} (its sampling rate in Hz)")
        if not path.exists():
            raise UserError(f"--input {path}: no such file")
        table = pd.read_csv(path)
        chans = [Channel(str(name).strip(), "mV", float(fs),
                         pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float32))
                 for name in table.columns]
    else:
        record_path = _record_path(path)
        if not Path(f"{record_path}.hea").exists():
            raise UserError(f"--input {path}: no WFDB header {record_path}.hea (for a CSV, name it *.csv)")
        if fs is not None:
            raise UserError(f"--fs: only for CSV input; the WFDB header of {path} states its rate")
        try:
            chans = channels(read_wfdb(record_path))
        except RecordError as exc:
            raise UserError(f"--input {path}: {exc}") from None
    try:
        signals = pick_signals(chans, context=str(path))
    except RecordError as exc:
        raise UserError(f"--input {exc}") from None
    listed = ", ".join(c.name for c in chans)
    if signals.ppg is None:
        raise UserError(f"--input {path}: no PPG channel (PLETH/PPG) among {listed}: calibration needs ECG + PPG")
    if not signals.ecg:
        raise UserError(f"--input {path}: no ECG lead among {listed}: calibration needs ECG + PPG")
    return PairedSignals(ecg=signals.ecg, fs=signals.fs, ppg=signals.ppg, ppg_fs=signals.ppg_fs or signals.fs,
                         units=signals.ecg_units, source=str(path))


def conditioned(paired: PairedSignals, config: PreprocessConfig) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """125 Hz (leads, lead validity, PPG, PPG validity), as ingest preprocesses them."""
    leads, valid = {}, {}
    for name, samples in paired.ecg.items():
        leads[name], valid[name] = condition_signal(samples, paired.fs, config.ecg_band_hz, config)
    ppg, ppg_valid = condition_signal(paired.ppg, paired.ppg_fs, config.ppg_band_hz, config)
    return leads, valid, ppg, ppg_valid


def calibrate(paired: PairedSignals, *, seconds: float, start_s: float = 0.0,
              config: PreprocessConfig | None = None) -> CalibrationProfile:
    """The profile of `seconds` of paired signal from `start_s`; UserError when it cannot be measured."""
    if not seconds > 0:
        raise UserError(f"--seconds: expected a positive duration, got {seconds}")
    if start_s < 0:
        raise UserError(f"--start: expected >= 0 s, got {start_s}")
    leads, valid, ppg, ppg_valid = conditioned(paired, config or PreprocessConfig())
    first = int(round(start_s * FS))
    needed = first + int(round(seconds * FS))
    if len(ppg) < needed:
        raise UserError(f"--input {paired.source}: {len(ppg) / FS:.1f} s long; --start {start_s:g} + --seconds "
                        f"{seconds:g} need {needed / FS:.1f} s")
    profile = estimate_profile({k: v[first:] for k, v in leads.items()}, ppg[first:],
                               valid={k: v[first:] for k, v in valid.items()}, ppg_valid=ppg_valid[first:],
                               seconds=seconds, units=paired.units, source=paired.source)
    if profile is None:
        raise UserError(f"--input {paired.source}: fewer than 10 beats whose R-peak and PPG pulse match in "
                        f"{start_s:g}-{start_s + seconds:g} s (noisy or missing ECG/PPG there); try another "
                        "--start or more --seconds")
    profile.extra = {"start_s": start_s, "end_s": start_s + seconds}
    return profile


def calibrate_file(*, input: str, out: str, seconds: float = 60.0, start_s: float = 0.0, fs: float | None = None,
                   model: str | None = None) -> dict[str, Any]:
    """`p2es calibrate` as a function: writes the profile to `out` and returns a summary."""
    config = PreprocessConfig()
    if model is not None:
        from p2es_dist.models.checkpoint import load_model
        from p2es_dist.translate.run import preprocess_config

        config = preprocess_config(load_model(model).metadata)
    profile = calibrate(read_paired(input, fs=fs), seconds=seconds, start_s=start_s, config=config)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    return {"profile": str(out), "pat_s": profile.pat_s, "pat_iqr_s": profile.pat_iqr_s,
            "n_beats": profile.n_beats, "leads": sorted(profile.beat), "seconds": seconds, "start_s": start_s}
