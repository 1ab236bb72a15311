"""Beat timing shared by ingest, calibration, templates and evaluation: R-peaks, PPG upstrokes, PAT.

The pulse arrival time (PAT) is the delay from an ECG R-peak to the upstroke of the PPG pulse it
causes: ~0.56 s at the fingertip, steady within a recording (IQR ~16 ms on BIDMC) but ~47 ms apart
between patients, which is more than enough to put a translated QRS where no QRS is. Everything that
turns PPG timing into ECG timing goes through `pulse_arrival` and `render_template`, so ingest, the
calibration profile, the template baselines and the models' template input agree sample for sample.

Conventions: signals at `constants.FS` (125 Hz) after preprocessing; positions are sample indices.
The upstroke of a pulse is its point of steepest rise (maximum first derivative) in the 0.3 s before
its systolic peak: a point that band-pass filtering moves least, unlike the foot or the peak.
A beat template spans `BEAT_PRE` samples before the R-peak to `BEAT_POST` after it (0.3 s + 0.5 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2es_dist.constants import FS

BEAT_PRE = 38  # samples before the R-peak (0.3 s: the P wave)
BEAT_POST = 62  # samples from the R-peak on (0.5 s: QRS and T wave)
BEAT_SAMPLES = BEAT_PRE + BEAT_POST
PAT_RANGE_S = (0.15, 1.5)  # pulse arrival times searched for (ICU monitors add up to ~0.6 s of PPG latency)
UPSTROKE_PAD = 2**30  # pads fixed-width upstroke arrays (batch key `upstrokes`): past any window
# Which lead finds the R-peaks, in order of preference: II is what single-lead spot checks record.
PEAK_LEADS = ("II", "I", "V5", "V2", "aVF", "III", "V1", "V6", "V4", "V3", "aVL", "aVR")
_UPSTROKE_SEARCH_S = 0.3
_ELGENDI_BEAT_OFFSET = 0.02  # neurokit2's `beatoffset` default
_MATCH_TOLERANCE_S = 0.1  # an upstroke this close to R + PAT belongs to that R


def peak_lead(leads) -> str | None:
    """The lead of `leads` (names) whose R-peaks a record's beat timing is measured on."""
    return next((name for name in PEAK_LEADS if name in leads), None)


def r_peaks(lead: np.ndarray, fs: float = FS) -> np.ndarray:
    """R-peak sample indices of one ECG lead (neurokit2's detector; inverted leads such as aVR flipped)."""
    import neurokit2 as nk

    lead = np.asarray(lead, dtype=np.float64)
    if not np.isfinite(lead).all() or np.ptp(lead) == 0:
        return np.zeros(0, dtype=np.int64)
    # A lead whose largest deflections point down (aVR, some V1) is searched upside down.
    if np.percentile(lead, 0.5) + np.percentile(lead, 99.5) < 2 * np.median(lead):
        lead = -lead
    _, info = nk.ecg_peaks(lead, sampling_rate=int(round(fs)), method="neurokit")
    return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)


def ppg_upstrokes(ppg: np.ndarray, fs: float = FS, *, mean_square: float | None = None) -> np.ndarray:
    """Upstroke sample indices (steepest rise before each systolic peak) of a PPG signal.

    `mean_square`: when `ppg` is a piece of a longer signal, that signal's mean of max(x, 0)^2. Elgendi's
    threshold (neurokit2's default method) adds 0.02 times this mean, so with it a piece finds the peaks
    the whole signal would (translate streams long inputs in pieces).
    """
    import neurokit2 as nk

    ppg = np.asarray(ppg, dtype=np.float64)
    if not np.isfinite(ppg).all() or np.ptp(ppg) == 0:
        return np.zeros(0, dtype=np.int64)
    options = {}
    if mean_square is not None and (own := float(np.mean(np.maximum(ppg, 0.0) ** 2))) > 0:
        options["beatoffset"] = _ELGENDI_BEAT_OFFSET * mean_square / own
    peaks = np.asarray(nk.ppg_findpeaks(ppg, sampling_rate=int(round(fs)), **options)["PPG_Peaks"], dtype=np.int64)
    slope = np.gradient(ppg)
    search = int(round(_UPSTROKE_SEARCH_S * fs))
    upstrokes = []
    previous = -1
    for peak in peaks:
        lo = max(previous + 1, peak - search, 0)
        if peak - lo >= 2:
            upstrokes.append(lo + int(np.argmax(slope[lo:peak])))
        previous = peak
    return np.unique(np.asarray(upstrokes, dtype=np.int64))


@dataclass(frozen=True)
class PulseArrival:
    pat_s: float  # median delay R-peak -> upstroke over matched beats
    iqr_s: float  # interquartile range of the per-beat delays
    n_beats: int  # matched beats
    matched_r: np.ndarray  # R-peaks that found their upstroke
    delays_s: np.ndarray  # their delays


def pulse_arrival(r: np.ndarray, upstrokes: np.ndarray, fs: float = FS) -> PulseArrival | None:
    """PAT from R-peaks and upstrokes of the same recording; None when fewer than 5 beats match.

    Two passes, because at high heart rates the previous beat's pulse can land in the search range:
    the mode of all pairwise R -> upstroke delays in `PAT_RANGE_S` (8 ms bins) fixes the delay the
    recording actually has, then each R-peak takes the upstroke nearest to R + mode within 0.1 s.
    """
    r, upstrokes = np.asarray(r, dtype=np.int64), np.asarray(upstrokes, dtype=np.int64)
    if len(r) < 5 or len(upstrokes) < 5:
        return None
    lo, hi = (int(round(x * fs)) for x in PAT_RANGE_S)
    delays = (upstrokes[None, :] - r[:, None]).ravel()
    delays = delays[(delays >= lo) & (delays <= hi)]
    if delays.size < 5:
        return None
    bin_width = max(1, int(round(0.008 * fs)))
    counts = np.bincount((delays - lo) // bin_width)
    # Smooth over neighbouring bins so a delay that straddles two bins still wins.
    smoothed = np.convolve(counts, np.ones(3), mode="same")
    mode = lo + (int(np.argmax(smoothed)) + 0.5) * bin_width
    nearest = np.searchsorted(upstrokes, r + mode)
    candidates = np.stack([np.clip(nearest - 1, 0, len(upstrokes) - 1), np.clip(nearest, 0, len(upstrokes) - 1)])
    chosen = upstrokes[candidates]
    pick = np.argmin(np.abs(chosen - (r + mode)[None, :]), axis=0)
    delay = chosen[pick, np.arange(len(r))] - r
    ok = np.abs(delay - mode) <= _MATCH_TOLERANCE_S * fs
    if ok.sum() < 5:
        return None
    delays_s = delay[ok] / fs
    q1, median, q3 = np.percentile(delays_s, [25, 50, 75])
    return PulseArrival(pat_s=float(median), iqr_s=float(q3 - q1), n_beats=int(ok.sum()),
                        matched_r=r[ok], delays_s=delays_s)


def beat_agreement(r: np.ndarray, upstrokes: np.ndarray, pat_s: float, fs: float = FS) -> float:
    """Share of R-peaks whose pulse arrives at R + `pat_s` (+-0.1 s): 1.0 when ECG and PPG beat together.

    Ectopic beats without a pulse, a PPG from another rhythm or a detached probe lower it.
    """
    if len(r) == 0:
        return 0.0
    if len(upstrokes) == 0:
        return 0.0
    expected = r + pat_s * fs
    nearest = np.searchsorted(upstrokes, expected)
    before = upstrokes[np.clip(nearest - 1, 0, len(upstrokes) - 1)]
    after = upstrokes[np.clip(nearest, 0, len(upstrokes) - 1)]
    distance = np.minimum(np.abs(before - expected), np.abs(after - expected))
    return float(np.mean(distance <= _MATCH_TOLERANCE_S * fs))


def beat_template(ecg: np.ndarray, r: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(leads, BEAT_SAMPLES) median beat of each row of `ecg` (leads, n) around the R-peaks `r`.

    Beats that would cross the signal's ends or touch an invalid sample (`valid` (n,) bool) are
    skipped. Returns the template and the number of beats it is the median of (0: all zeros).
    """
    ecg = np.atleast_2d(np.asarray(ecg, dtype=np.float64))
    n = ecg.shape[-1]
    r = np.asarray(r, dtype=np.int64)
    r = r[(r - BEAT_PRE >= 0) & (r + BEAT_POST <= n)]
    if valid is not None and len(r):
        bad = np.concatenate([[0], np.cumsum(~np.asarray(valid, dtype=bool))])
        r = r[bad[r + BEAT_POST] - bad[r - BEAT_PRE] == 0]
    if len(r) == 0:
        return np.zeros((ecg.shape[0], BEAT_SAMPLES)), 0
    index = r[:, None] + np.arange(-BEAT_PRE, BEAT_POST)[None, :]
    return np.median(ecg[:, index], axis=1), int(len(r))


def render_template(beat: np.ndarray, r_positions: np.ndarray, length: int) -> np.ndarray:
    """Place `beat` (leads, BEAT_SAMPLES) at each R position -> (leads, length), zeros elsewhere.

    Where two beats overlap (RR shorter than 0.8 s), each sample takes the beat whose span started
    last: the next beat's P wave wins over the previous beat's T-wave tail. Positions may lie outside
    [0, length): a beat that starts before the window still draws its tail into it.
    """
    beat = np.atleast_2d(np.asarray(beat, dtype=np.float32))
    out = np.zeros((beat.shape[0], length), dtype=np.float32)
    starts = np.sort(np.asarray(r_positions, dtype=np.int64)) - BEAT_PRE
    starts = starts[(starts < length) & (starts + BEAT_SAMPLES > 0)]
    if len(starts) == 0:
        return out
    t = np.arange(length)
    owner = np.searchsorted(starts, t, side="right") - 1  # last beat starting at or before t
    offset = t - starts[np.clip(owner, 0, None)]
    covered = (owner >= 0) & (offset < BEAT_SAMPLES)
    out[:, covered] = beat[:, offset[covered]]
    return out


def template_from_upstrokes(beat: np.ndarray, upstrokes: np.ndarray, pat_s: float, length: int,
                            fs: float = FS) -> np.ndarray:
    """The ECG a PPG implies: `beat` placed at each upstroke minus the PAT, (leads, length)."""
    r_positions = np.asarray(upstrokes, dtype=np.int64) - int(round(pat_s * fs))
    return render_template(beat, r_positions, length)


def normalise_template(template: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale a (..., 12, L) template so max |x| over its leads is 1 per window, like model-space ECG."""
    template = np.asarray(template, dtype=np.float32)
    # max and -min per lead, then the mask on (..., 12): no |x| copy of the whole block (`ecg_scale` too).
    peak_per_lead = np.maximum(template.max(axis=-1), -template.min(axis=-1))
    peak = np.where(np.asarray(mask, dtype=bool), peak_per_lead, 0.0).max(axis=-1)[..., None, None]
    return np.where(peak > 0, template / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32, copy=False)


def upstroke_margin() -> tuple[int, int]:
    """(before, after) samples around a window whose upstrokes can place a beat inside it."""
    return BEAT_POST, BEAT_PRE + int(round(PAT_RANGE_S[1] * FS))


def upstrokes_per_window(upstrokes: np.ndarray, starts: np.ndarray, window: int) -> list[np.ndarray]:
    """The sorted upstrokes of a whole signal, per window relative to its start, margins included
    (`upstroke_margin`): what ingest stores and translate hands the models."""
    before, after = upstroke_margin()
    bounds = np.searchsorted(upstrokes, np.stack([starts - before, starts + window + after], axis=1))
    return [(upstrokes[lo:hi] - start).astype(np.int32) for (lo, hi), start in zip(bounds, starts, strict=True)]


__all__ = [
    "BEAT_POST", "BEAT_PRE", "BEAT_SAMPLES", "PulseArrival", "beat_agreement", "beat_template",
    "normalise_template", "peak_lead", "ppg_upstrokes", "pulse_arrival", "r_peaks", "render_template",
    "template_from_upstrokes", "upstroke_margin", "upstrokes_per_window",
]
