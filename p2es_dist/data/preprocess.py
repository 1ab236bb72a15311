"""Raw record -> clean 125 Hz windows: gap repair, resampling, band-pass, artefact checks, windowing.

Order matters: non-finite samples (NaN, +-inf) are gaps; runs of them, flat lines and clipping are found
on the raw samples (filters smear them), short gaps are interpolated, then each signal is resampled
polyphase to 125 Hz and band-passed with a zero-phase Butterworth filter. Windows touching a long gap, a
flat line or a clipped run lose that signal; a window left without PPG (when the record has PPG) or
without any ECG lead is rejected with a reason that ingest writes to `quarantine.jsonl`. A record whose
filtered signal exceeds what a float16 shard can hold (wrong units or gain) is refused whole: stored, it
would be inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import signal as sps

from p2es_dist.constants import FS, LEAD_INDEX, LEADS, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile, estimate_profile
from p2es_dist.data.quality import quality_index
from p2es_dist.data.record import Record, RecordError

FLOAT16_MAX = float(np.finfo(np.float16).max)  # shards store signals as float16: beyond this is inf


@dataclass
class PreprocessConfig:
    hop: int = 512  # samples between window starts at 125 Hz
    ecg_band_hz: tuple[float, float] = (0.5, 40.0)
    ppg_band_hz: tuple[float, float] = (0.5, 8.0)
    filter_order: int = 3
    max_gap_s: float = 0.5  # NaN runs up to this long are interpolated; longer ones invalidate windows
    flat_s: float = 1.0  # a constant run this long is a flat line (lead off, sensor detached)
    clip_s: float = 0.08  # a constant run this long at the signal's extreme value is saturation
    # Windows below this quality index are rejected. 0.1 is an ECG no more QRS-like than white noise (or a
    # pulseless PPG): on the shared data it drops 1 of 4,625 BIDMC windows and 68 of 3,777 CinC 2015 ones.
    min_quality: float = 0.1
    # Paired records: windows where fewer than this share of R-peaks have their PPG pulse at the record's
    # PAT (+-0.1 s) are rejected: ECG and PPG that disagree on beats teach a translator noise.
    min_beat_agreement: float = 0.6
    calibration_s: float = 60.0  # paired records: the first seconds that give the stored calibration profile


@dataclass
class Windows:
    """Windows of one record at 125 Hz: `ecg` (n, 12, L) physical units, zeros where a lead is absent."""

    start: np.ndarray  # (n,) first sample at 125 Hz
    ecg: np.ndarray  # (n, 12, L) float32
    ecg_mask: np.ndarray  # (n, 12) bool
    ppg: np.ndarray | None  # (n, L) float32, or None when the record has no PPG
    quality: np.ndarray  # (n,) float32
    rejected: list[dict]  # {"start", "reason"} for each dropped window
    upstrokes: list[np.ndarray] | None = None  # per window, PPG upstrokes relative to its start
    calibration: CalibrationProfile | None = None  # from the record's first `calibration_s` seconds
    calibration_end: int = 0  # sample where that segment ends


def _constant_runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, length and value of each run of identical consecutive samples (NaN runs included)."""
    same = np.isclose(x[1:], x[:-1], rtol=0.0, atol=1e-9) | (np.isnan(x[1:]) & np.isnan(x[:-1]))
    change = np.flatnonzero(~same) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [len(x)]]))
    return starts, lengths, x[starts]


def _artefact_mask(x: np.ndarray, fs: float, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample reason codes at native rate (0 ok, 1 gap, 2 flat, 3 clipped) and the gap-filled signal."""
    reason = np.zeros(len(x), dtype=np.int8)
    starts, lengths, values = _constant_runs(x)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        reason[:] = 1
        return reason, np.zeros_like(x)
    top, bottom = finite.max(), finite.min()
    # Only runs long enough to matter reach the Python loop (noise changes every sample).
    worth_checking = (lengths >= min(config.clip_s, config.flat_s) * fs) | np.isnan(values)
    for start, length, value in zip(
        starts[worth_checking], lengths[worth_checking], values[worth_checking], strict=True
    ):
        stop = start + length
        if np.isnan(value):
            if length > config.max_gap_s * fs:
                reason[start:stop] = 1
        elif length >= config.flat_s * fs:
            reason[start:stop] = 2
        elif length >= config.clip_s * fs and value in (top, bottom):
            reason[start:stop] = 3
    # Short gaps: linear interpolation; long gaps are zero-filled and masked as invalid.
    filled = x.copy()
    nan = np.isnan(filled)
    if nan.any():
        idx = np.arange(len(x))
        filled[nan] = np.interp(idx[nan], idx[~nan], filled[~nan])
        filled[reason == 1] = 0.0
    return reason, filled


def resample(x: np.ndarray, fs_in: float, fs_out: float = FS) -> np.ndarray:
    """Polyphase resampling by the nearest small rational factor (exact for 100/250/360/400/500/1000 Hz)."""
    if fs_in == fs_out:
        return x.astype(np.float64, copy=False)
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return sps.resample_poly(x, ratio.numerator, ratio.denominator)


def bandpass(x: np.ndarray, band_hz: tuple[float, float], order: int, fs: float = FS) -> np.ndarray:
    high = min(band_hz[1], 0.45 * fs)
    sos = sps.butter(order, [band_hz[0], high], btype="bandpass", fs=fs, output="sos")
    # Removing the offset and padding by a few seconds keeps the record's first window free of the
    # step response a DC offset would otherwise leave at the edges.
    centred = x - np.median(x)
    return sps.sosfiltfilt(sos, centred, padtype="even", padlen=min(len(x) - 1, int(3 * fs)))


def _reason_at_rate(reason: np.ndarray, fs_in: float, n_out: int) -> np.ndarray:
    """Map per-sample reason codes to 125 Hz by time (a max over the covered native samples)."""
    if fs_in == FS:
        return reason[:n_out]
    edges = np.minimum((np.arange(n_out + 1) * fs_in / FS).astype(np.int64), len(reason))
    out = np.zeros(n_out, dtype=np.int8)
    bad = np.flatnonzero(reason)
    bins = np.searchsorted(edges, bad, side="right") - 1
    inside = (bins >= 0) & (bins < n_out)
    # Any bad native sample marks the 125 Hz sample that covers it.
    np.maximum.at(out, bins[inside], reason[bad[inside]])
    return out


_REASON_NAMES = {1: "NaN gap", 2: "flat line", 3: "saturation", 4: "non-finite values"}


def _condition(x: np.ndarray, fs: float, band_hz: tuple[float, float], config: PreprocessConfig):
    """One raw signal -> (125 Hz filtered signal, 125 Hz reason codes)."""
    x = np.asarray(x, dtype=np.float64)
    # One inf would spread through the filters to the whole signal; as NaN it is an ordinary gap.
    x = np.where(np.isfinite(x), x, np.nan)
    reason, filled = _artefact_mask(x, fs, config)
    filtered = bandpass(resample(filled, fs), band_hz, config.filter_order)
    reason = _reason_at_rate(reason, fs, len(filtered))
    # Whatever got past the gap repair (a filter's NaN), no sample is kept as recorded unless finite; a huge
    # value stays huge for `_check_range` to refuse instead of overflowing float32 into inf.
    nonfinite = ~np.isfinite(filtered)
    big = float(np.finfo(np.float32).max)
    clean = np.clip(filtered, -big, big).astype(np.float32)
    if nonfinite.any():
        reason = np.where(nonfinite, np.int8(4), reason)
        clean[nonfinite] = 0.0
    return clean, reason


def condition_signal(x: np.ndarray, fs: float, band_hz: tuple[float, float],
                     config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """One raw signal -> (125 Hz filtered float32 signal, per-sample validity), exactly as ingest does it."""
    clean, reason = _condition(x, fs, band_hz, config)
    return clean, reason == 0


def window_starts(n_samples: int, hop: int, window: int = WINDOW) -> np.ndarray:
    if n_samples < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_samples - window + 1, hop, dtype=np.int64)


def _check_range(name: str, clean: np.ndarray) -> None:
    """RecordError when a filtered signal holds values a float16 shard cannot store."""
    finite = clean[np.isfinite(clean)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if peak > FLOAT16_MAX:
        raise RecordError(f"{name}: filtered amplitude reaches {peak:.3g}, beyond the float16 range of shards "
                          f"({FLOAT16_MAX:.0f}); wrong units or gain?")


def make_windows(record: Record, config: PreprocessConfig) -> Windows:
    """Cut a record into 125 Hz windows; raises RecordError when the record yields no window at all."""
    if not record.ecg and record.ppg is None:
        raise RecordError("no ECG lead and no PPG signal")
    if record.fs <= 0:
        raise RecordError(f"invalid sampling rate {record.fs}")
    leads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    ecg_signals = record.ecg
    if record.leads_scaled_separately and len(ecg_signals) > 1:
        # Leads in unrelated units must not meet (see Record): keep the one PPG translation is judged on.
        keep = "II" if "II" in ecg_signals else next(iter(ecg_signals))
        ecg_signals = {keep: ecg_signals[keep]}
    for name, samples in ecg_signals.items():
        if name not in LEAD_INDEX:
            raise RecordError(f"unknown lead name {name!r}")
        leads[LEAD_INDEX[name]] = _condition(samples, record.fs, config.ecg_band_hz, config)
        _check_range(name, leads[LEAD_INDEX[name]][0])
    ppg = None
    if record.ppg is not None:
        ppg = _condition(record.ppg, record.ppg_fs or record.fs, config.ppg_band_hz, config)
        _check_range("PPG", ppg[0])
    lengths = [len(s) for s, _ in leads.values()] + ([len(ppg[0])] if ppg else [])
    n_samples = min(lengths)
    starts = window_starts(n_samples, config.hop)
    if starts.size == 0:
        seconds = n_samples / FS
        raise RecordError(f"shorter than one window ({seconds:.1f} s at {FS} Hz < {WINDOW / FS:.3f} s)")

    offsets = starts[:, None] + np.arange(WINDOW)[None, :]
    n = len(starts)
    ecg = np.zeros((n, N_LEADS, WINDOW), dtype=np.float32)
    ecg_mask = np.zeros((n, N_LEADS), dtype=bool)
    reasons = [dict() for _ in range(n)]  # first bad signal per reason, for the quarantine line
    for lead, (samples, reason) in leads.items():
        bad = reason[offsets].max(axis=1)
        ecg[:, lead] = samples[offsets]
        ecg_mask[:, lead] = bad == 0
        ecg[bad > 0, lead] = 0.0
        for i in np.flatnonzero(bad):
            reasons[i].setdefault(_REASON_NAMES[int(bad[i])], []).append(LEADS[lead])
    ppg_windows = None
    keep = ecg_mask.any(axis=1) if leads else np.ones(n, dtype=bool)
    if ppg is not None:
        samples, reason = ppg
        ppg_windows = samples[offsets]
        bad = reason[offsets].max(axis=1)
        for i in np.flatnonzero(bad):
            reasons[i].setdefault(_REASON_NAMES[int(bad[i])], []).append("PPG")
        keep &= bad == 0
    quality = quality_index(ecg, ecg_mask, ppg_windows)
    low_quality = quality < config.min_quality
    beats = _beat_timing(record, leads, ppg, starts, config)
    disagree = beats.agreement < config.min_beat_agreement  # NaN (not measurable) never rejects
    rejected = []
    for i in np.flatnonzero(~keep | low_quality | disagree):
        if not keep[i]:
            detail = "; ".join(f"{kind} in {', '.join(names)}" for kind, names in reasons[i].items())
        elif low_quality[i]:
            detail = f"quality {quality[i]:.2f} below {config.min_quality:.2f}"
        else:
            detail = (f"beats disagree: {beats.agreement[i]:.2f} of R-peaks have their PPG pulse at the record's "
                      f"PAT, below min_beat_agreement {config.min_beat_agreement:.2f}")
        rejected.append({"start": int(starts[i]), "reason": detail})
    keep &= ~low_quality & ~disagree
    return Windows(
        start=starts[keep],
        ecg=ecg[keep],
        ecg_mask=ecg_mask[keep],
        ppg=None if ppg_windows is None else ppg_windows[keep],
        quality=quality[keep],
        rejected=rejected,
        upstrokes=None if beats.upstrokes is None else [beats.upstrokes[i] for i in np.flatnonzero(keep)],
        calibration=beats.calibration,
        calibration_end=beats.calibration_end,
    )


@dataclass
class _BeatTiming:
    agreement: np.ndarray  # (n,) share of R-peaks with their pulse; NaN where not measurable
    upstrokes: list[np.ndarray] | None
    calibration: CalibrationProfile | None
    calibration_end: int


def _beat_timing(record: Record, leads: dict[int, tuple[np.ndarray, np.ndarray]],
                 ppg: tuple[np.ndarray, np.ndarray] | None, starts: np.ndarray,
                 config: PreprocessConfig) -> _BeatTiming:
    """Upstrokes per window, beat agreement per window and the calibration profile of a paired record.

    Peaks are found once on the whole record, not per window, so a window's edge beats are found too.
    """
    n = len(starts)
    nothing = _BeatTiming(np.full(n, np.nan), None, None, 0)
    if ppg is None:
        return nothing
    ppg_signal, ppg_reason = ppg
    ppg_valid = ppg_reason == 0
    upstrokes = timing.ppg_upstrokes(np.where(ppg_valid, ppg_signal, 0.0))
    upstrokes = upstrokes[ppg_valid[upstrokes]]
    per_window = timing.upstrokes_per_window(upstrokes, starts, WINDOW)
    if not leads:
        return _BeatTiming(np.full(n, np.nan), per_window, None, 0)
    named = {LEADS[i]: signal for i, (signal, _) in leads.items()}
    valid = {LEADS[i]: reason == 0 for i, (_, reason) in leads.items()}
    end = int(round(config.calibration_s * FS))
    calibration = estimate_profile(named, ppg_signal, valid=valid, ppg_valid=ppg_valid,
                                   seconds=config.calibration_s, units=record.ecg_units, source=record.record)
    agreement = np.full(n, np.nan)
    peak_lead = timing.peak_lead(named)
    peaks = timing.r_peaks(np.where(valid[peak_lead], named[peak_lead], 0.0))
    peaks = peaks[valid[peak_lead][peaks]]
    arrival = timing.pulse_arrival(peaks, upstrokes)
    if arrival is not None:
        for i, start in enumerate(starts):
            window_valid = valid[peak_lead][start:start + WINDOW].all() and ppg_valid[start:start + WINDOW].all()
            in_window = peaks[(peaks >= start) & (peaks < start + WINDOW - arrival.pat_s * FS)]
            if window_valid and len(in_window):
                agreement[i] = timing.beat_agreement(in_window, upstrokes, arrival.pat_s)
    return _BeatTiming(agreement, per_window, calibration, end if calibration is not None else 0)

