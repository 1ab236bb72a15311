"""Training-time augmentations of paired PPG + 12-lead ECG windows, on numpy batches in model space.

`augment_batch` runs inside Ray Data `map_batches`, before conversion to torch. A batch is a dict of numpy
arrays: `ppg` (B, L), `ppg_mask` (B,), `ecg` (B, 12, L) in `LEADS` order, `ecg_mask` (B, 12), plus any
other keys, which pass through untouched. Each augmentation fires per window with its own probability:

1. STAR (Sinusoidal Time-Amplitude Resampling): R-peaks are found on lead II (else the first recorded
   lead); between successive R-peaks the time axis is warped by a half-sine that fixes both peaks and
   the amplitude is modulated by `1 + b*sin(...)`, zero at the peaks. The same warp moves all 12 leads
   and the PPG, so the pair stays aligned and linear relations between leads (III = II - I, ...)
   survive. Head and tail stay unchanged.
2. Amplitude scaling: one factor for all 12 leads (inter-lead ratios kept), a separate one for the PPG.
   Model space is scale-normalised per window, so this leaves values slightly outside [-1, 1] when the
   factor exceeds 1; we do not re-normalise, because a modest range (default 0.8-1.2) keeps the ECG
   "[-1, 1]-ish" and re-normalising would undo the augmentation.
3. Baseline wander: respiration-like sinusoids (0.1-0.5 Hz), same phase on every recorded lead with a
   lead-specific amplitude, as electrode impedance changes with breathing.
4. PPG motion artifacts: in one or two short segments, a low-frequency high-amplitude burst plus spikes.
5. PPG timing shift (`ppg_shift_ms`, off by default): every window's PPG moves against its ECG by a
   whole number of samples drawn uniformly from +-`ppg_shift_ms` (positive: the pulse arrives later),
   the vacated end repeating the edge sample (no wrap-around). Pulse arrival time differs by ~50 ms
   between patients (issue 13), so a model that must not lean on one exact delay can be taught to hedge.
   Only the PPG moves: the ECG and a calibration `template` (placed with the patient's own PAT, so
   aligned with the ECG) stay. Its draws come from their own stream of the same seed (`ppg_shifts`), so
   switching it on changes no other augmentation's draws.

Absent leads and absent PPG stay exactly zero. Deterministic under `seed` (the caller derives one seed
per batch, e.g. from the epoch and batch index); the input batch is never mutated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, find_peaks, sosfiltfilt

from p2es_dist.constants import FS, LEAD_INDEX, N_LEADS

# A half-sine displacement a*D*sin(pi*u) over an R-R interval of D samples has slope a*pi*cos(pi*u),
# so the warp t -> t + displacement is monotone only while |a| < 1/pi.
MAX_STAR_TIME_STRENGTH = 1.0 / np.pi

# R-peak detection: no two beats closer than 0.3 s (200 bpm), and a QRS must stand out by a good part
# of the window's strongest QRS energy so that noise and P/T-wave remnants are not taken for beats.
R_PEAK_QRS_BAND_HZ = (8.0, 30.0)
R_PEAK_MIN_DISTANCE_S = 0.3
R_PEAK_MIN_PROMINENCE = 0.3  # fraction of the 99.5th percentile of the rectified QRS band
R_PEAK_REFINE_S = 0.04
MIN_R_PEAKS = 3  # fewer peaks than this give too few beats to warp; the window is left as is

MOTION_BURST_HZ = (0.5, 3.0)  # wrist or finger movement, in the band of the pulse itself
MOTION_SEGMENT_S = (0.5, 2.0)  # duration of one motion segment
MOTION_SPIKES_PER_SEGMENT = 3
PPG_SHIFT_STREAM = 0x5A1F7  # spawns the PPG shift's own generator from a batch's seed


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per window) and strengths of each augmentation; strengths are in model space."""

    enabled: bool = True
    star_p: float = 0.5
    star_time_strength: float = 0.1  # max displacement per beat as a fraction of its R-R interval
    star_amp_strength: float = 0.1  # max relative amplitude change at the middle of a beat
    amp_scale_p: float = 0.5
    amp_scale_range: tuple[float, float] = (0.8, 1.2)
    baseline_wander_p: float = 0.3
    baseline_wander_amp: float = 0.05  # max amplitude of each wander sinusoid
    baseline_wander_hz: tuple[float, float] = (0.1, 0.5)
    ppg_motion_p: float = 0.2
    ppg_motion_amp: float = 0.5  # max amplitude of the burst and of each spike
    ppg_shift_ms: float = 0.0  # PPG moved against the ECG by U[-this, +this] ms per window; 0: off

    def __post_init__(self) -> None:
        for name in ("star_p", "amp_scale_p", "baseline_wander_p", "ppg_motion_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.star_time_strength < MAX_STAR_TIME_STRENGTH:
            raise ValueError(
                f"star_time_strength: expected in [0, {MAX_STAR_TIME_STRENGTH:.3f}) so that the warp stays "
                f"monotone, got {self.star_time_strength}"
            )
        if not 0.0 <= self.star_amp_strength < 1.0:
            raise ValueError(f"star_amp_strength: expected in [0, 1), got {self.star_amp_strength}")
        for name in ("amp_scale_range", "baseline_wander_hz"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"{name}: expected 0 < low <= high, got {getattr(self, name)}")
        for name in ("baseline_wander_amp", "ppg_motion_amp", "ppg_shift_ms"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")


def find_r_peaks(lead: np.ndarray, *, fs: float = FS) -> np.ndarray:
    """Sample indices of the R-peaks of one ECG lead (either polarity), sorted and unique; may be empty."""
    return find_r_peaks_batch(lead[None, :], fs=fs)[0]


def find_r_peaks_batch(leads: np.ndarray, *, fs: float = FS) -> list[np.ndarray]:
    """R-peaks of each row of `leads` (N, L), as in `find_r_peaks`; filtering is vectorised over rows.

    Peaks are found on the rectified QRS band (8-30 Hz), where baseline wander and tall T waves fade,
    then moved to the extreme of the lead itself within +-40 ms so that they sit on the R-peak sample.
    """
    centred = leads.astype(np.float64) - np.median(leads, axis=-1, keepdims=True)
    qrs_energy = np.abs(sosfiltfilt(_qrs_band(fs), centred, axis=-1))
    top = np.percentile(qrs_energy, 99.5, axis=-1)
    low, high = np.percentile(centred, [0.5, 99.5], axis=-1)
    # A lead whose QRS points down (aVR, or II with an odd axis) has its R-peaks at minima.
    polarised = np.where((-low > high)[:, None], -centred, centred)
    half_width = max(1, round(R_PEAK_REFINE_S * fs))
    offsets = np.arange(-half_width, half_width + 1)
    r_peaks = []
    for row in range(leads.shape[0]):
        if top[row] <= 0.0:
            r_peaks.append(np.zeros(0, dtype=np.int64))
            continue
        candidates, _ = find_peaks(
            qrs_energy[row],
            distance=max(1, round(R_PEAK_MIN_DISTANCE_S * fs)),
            prominence=R_PEAK_MIN_PROMINENCE * top[row],
        )
        neighbourhood = np.clip(candidates[:, None] + offsets, 0, leads.shape[-1] - 1)
        best = np.argmax(polarised[row][neighbourhood], axis=1)
        r_peaks.append(np.unique(neighbourhood[np.arange(candidates.size), best]).astype(np.int64))
    return r_peaks


@functools.cache
def _qrs_band(fs: float) -> np.ndarray:
    return butter(2, R_PEAK_QRS_BAND_HZ, btype="bandpass", fs=fs, output="sos")


def reference_lead(ecg_mask_row: np.ndarray) -> int | None:
    """Lead II when recorded, else the first recorded lead, else None."""
    if ecg_mask_row[LEAD_INDEX["II"]]:
        return LEAD_INDEX["II"]
    recorded = np.flatnonzero(ecg_mask_row)
    return int(recorded[0]) if recorded.size else None


def star_warp(
    signals: np.ndarray, r_peaks: np.ndarray, time_shift: np.ndarray, amp_shift: np.ndarray
) -> np.ndarray:
    """Warp channels (C, L) beat by beat between successive `r_peaks` (sorted, at least 2).

    Beat k (from r_k to r_{k+1}, D_k samples) reads the input at t + time_shift[k]*D_k*sin(pi*u) and
    scales it by 1 + amp_shift[k]*sin(pi*u), u = (t - r_k)/D_k. Samples before the first and from the
    last R-peak on, and the R-peaks themselves, are copied exactly.
    """
    n_channels, length = signals.shape
    first, last = int(r_peaks[0]), int(r_peaks[-1])
    t = np.arange(first, last)
    beat = np.searchsorted(r_peaks, t, side="right") - 1
    beat_length = np.diff(r_peaks)[beat].astype(np.float64)
    bump = np.sin(np.pi * (t - r_peaks[beat]) / beat_length)  # exactly 0 at every R-peak
    source = t + time_shift[beat] * beat_length * bump
    gain = 1.0 + amp_shift[beat] * bump
    # One np.interp call for all channels: lay them end to end, each source position offset into its
    # own channel; positions never leave [first, last], so no channel reads from its neighbour.
    offsets = (np.arange(n_channels) * length)[:, None]
    flat_positions = np.arange(n_channels * length, dtype=np.float64)
    warped = np.interp(source[None, :] + offsets, flat_positions, signals.reshape(-1).astype(np.float64))
    out = signals.copy()
    out[:, first:last] = (warped * gain).astype(signals.dtype)
    return out


def _star(ppg: np.ndarray, ecg: np.ndarray, ecg_mask: np.ndarray, config: AugmentConfig,
          rng: np.random.Generator, template: np.ndarray | None = None) -> None:
    """STAR in place on the working copies; the warp itself is per window, as its beats are.

    A calibration template (placed by the PPG's upstrokes) is warped with the PPG it was placed by."""
    chosen = rng.random(ecg.shape[0]) < config.star_p
    rows = [row for row in np.flatnonzero(chosen) if reference_lead(ecg_mask[row]) is not None]
    if not rows:
        return
    leads = np.stack([ecg[row, reference_lead(ecg_mask[row])] for row in rows])
    for row, r_peaks in zip(rows, find_r_peaks_batch(leads), strict=True):
        if r_peaks.size < MIN_R_PEAKS:
            continue
        n_beats = r_peaks.size - 1
        time_shift = rng.uniform(-config.star_time_strength, config.star_time_strength, n_beats)
        amp_shift = rng.uniform(-config.star_amp_strength, config.star_amp_strength, n_beats)
        parts = [ecg[row], ppg[row][None, :]] + ([template[row]] if template is not None else [])
        warped = star_warp(np.concatenate(parts, axis=0), r_peaks, time_shift, amp_shift)
        ecg[row], ppg[row] = warped[:N_LEADS], warped[N_LEADS]
        if template is not None:
            template[row] = warped[N_LEADS + 1:]


def _amplitude_scale(ppg: np.ndarray, ecg: np.ndarray, config: AugmentConfig,
                     rng: np.random.Generator) -> None:
    batch_size = ecg.shape[0]
    chosen = rng.random(batch_size) < config.amp_scale_p
    low, high = config.amp_scale_range
    ecg_factor = np.where(chosen, rng.uniform(low, high, batch_size), 1.0).astype(ecg.dtype)
    ppg_factor = np.where(chosen, rng.uniform(low, high, batch_size), 1.0).astype(ppg.dtype)
    ecg *= ecg_factor[:, None, None]
    ppg *= ppg_factor[:, None]


def _baseline_wander(ecg: np.ndarray, ecg_mask: np.ndarray, config: AugmentConfig,
                     rng: np.random.Generator) -> None:
    batch_size, n_leads, length = ecg.shape
    rows = np.flatnonzero(rng.random(batch_size) < config.baseline_wander_p)
    n_components = 2  # breathing is rarely one clean sinusoid
    draws = (rows.size, n_components, 1)
    hz = rng.uniform(*config.baseline_wander_hz, draws)
    phase = rng.uniform(0.0, 2.0 * np.pi, draws)
    amplitude = rng.uniform(0.0, config.baseline_wander_amp, draws)
    lead_gain = rng.uniform(0.5, 1.0, (rows.size, n_leads)) * ecg_mask[rows]
    seconds = np.arange(length) / FS
    wander = (amplitude * np.sin(2.0 * np.pi * hz * seconds + phase)).sum(axis=1)  # (rows, L)
    ecg[rows] += lead_gain.astype(ecg.dtype)[:, :, None] * wander.astype(ecg.dtype)[:, None, :]


def _ppg_motion(ppg: np.ndarray, ppg_mask: np.ndarray, config: AugmentConfig,
                rng: np.random.Generator) -> None:
    batch_size, length = ppg.shape
    rows = np.flatnonzero((rng.random(batch_size) < config.ppg_motion_p) & ppg_mask)
    n_segments = 2  # the first always fires, the second half the time
    draws = (rows.size, n_segments)
    segment_on = np.stack([np.ones(rows.size, bool), rng.random(rows.size) < 0.5], axis=1)
    duration = np.round(rng.uniform(*MOTION_SEGMENT_S, draws) * FS).astype(np.int64)
    start = (rng.random(draws) * (length - duration)).astype(np.int64)
    hz = rng.uniform(*MOTION_BURST_HZ, draws)
    phase = rng.uniform(0.0, 2.0 * np.pi, draws)
    burst_amp = rng.uniform(0.3, 1.0, draws) * config.ppg_motion_amp * segment_on
    t = np.arange(length)
    into_segment = (t - start[..., None]) / duration[..., None]  # (rows, S, L), in [0, 1) inside a segment
    inside = (into_segment >= 0.0) & (into_segment < 1.0)
    envelope = np.where(inside, np.sin(np.pi * into_segment) ** 2, 0.0)  # smooth on- and offset
    burst = burst_amp[..., None] * envelope * np.sin(2.0 * np.pi * hz[..., None] * t / FS + phase[..., None])
    ppg[rows] += burst.sum(axis=1).astype(ppg.dtype)

    spike_shape = (rows.size, n_segments, MOTION_SPIKES_PER_SEGMENT)
    spike_at = start[..., None] + (rng.random(spike_shape) * duration[..., None]).astype(np.int64)
    spike_sign = np.where(rng.random(spike_shape) < 0.5, -1.0, 1.0)
    spike_amp = spike_sign * rng.uniform(0.5, 1.5, spike_shape) * config.ppg_motion_amp
    spike_amp *= segment_on[..., None] & (rng.random(spike_shape) < 0.7)
    spike_rows = np.broadcast_to(rows[:, None, None], spike_shape)
    np.add.at(ppg, (spike_rows.ravel(), spike_at.ravel()), spike_amp.ravel().astype(ppg.dtype))


def ppg_shifts(config: AugmentConfig, n_windows: int, *, seed: int) -> np.ndarray:
    """(n_windows,) int: samples each window's PPG moves by (positive: later), U[-ppg_shift_ms, +ppg_shift_ms]
    rounded to whole samples; all zero when the shift is off. What `augment_batch` applies under `seed`."""
    if config.ppg_shift_ms <= 0.0:
        return np.zeros(n_windows, dtype=np.int64)
    rng = np.random.default_rng([seed, PPG_SHIFT_STREAM])
    milliseconds = rng.uniform(-config.ppg_shift_ms, config.ppg_shift_ms, n_windows)
    return np.rint(milliseconds * FS / 1000.0).astype(np.int64)


def shift_edge_padded(signals: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Rows of `signals` (N, L) delayed by `shifts` (N,) samples (negative: advanced); the samples
    shifted in repeat the row's first (or last) sample rather than wrapping around."""
    length = signals.shape[-1]
    source = np.clip(np.arange(length)[None, :] - np.asarray(shifts)[:, None], 0, length - 1)
    return np.take_along_axis(signals, source, axis=-1)


def _ppg_shift(ppg: np.ndarray, ppg_mask: np.ndarray, config: AugmentConfig, seed: int) -> None:
    shifts = ppg_shifts(config, ppg.shape[0], seed=seed) * ppg_mask
    if shifts.any():
        ppg[:] = shift_edge_padded(ppg, shifts)


def augment_batch(batch: dict[str, np.ndarray], config: AugmentConfig, *, seed: int) -> dict[str, np.ndarray]:
    """Augmented copy of a model-space batch; same seed and input give the same output.

    Returns a new dict whose `ppg` and `ecg` are new arrays; every other key (and everything when the
    config is disabled) is passed through as the same object.
    """
    out = dict(batch)
    if not config.enabled:
        return out
    ppg_mask = np.asarray(batch["ppg_mask"], dtype=bool)
    ecg_mask = np.asarray(batch["ecg_mask"], dtype=bool)
    ppg = np.array(batch["ppg"], dtype=np.float32, copy=True)
    ecg = np.array(batch["ecg"], dtype=np.float32, copy=True)
    rng = np.random.default_rng(seed)
    template = np.array(batch["template"], dtype=np.float32, copy=True) if "template" in batch else None
    _star(ppg, ecg, ecg_mask, config, rng, template)
    if template is not None:
        out["template"] = template.astype(batch["template"].dtype, copy=False)
    _amplitude_scale(ppg, ecg, config, rng)
    _baseline_wander(ecg, ecg_mask, config, rng)
    _ppg_motion(ppg, ppg_mask, config, rng)
    _ppg_shift(ppg, ppg_mask, config, seed)
    # The contract is that absent signals are zeros; enforce it so that no augmentation can leak into them.
    out["ppg"] = np.where(ppg_mask[:, None], ppg, np.float32(0.0)).astype(batch["ppg"].dtype, copy=False)
    out["ecg"] = np.where(ecg_mask[:, :, None], ecg, np.float32(0.0)).astype(batch["ecg"].dtype, copy=False)
    return out
