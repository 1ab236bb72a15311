"""Rendering of the synthetic source: beat trains -> heart vector -> 12 leads, and the PPG they drive.

Given per-window physiology (`Physiology`, drawn per subject in `synthetic.py`), everything here is
vectorised over a batch of windows; there is no Python loop over windows or beats.

- Beats: an integral-pulse-frequency model. The instantaneous rate is a base rate modulated by
  respiration (RSA), Mayer waves (0.1 Hz) and a slow drift; beat k falls where the integrated phase
  crosses k (Newton on the closed-form phase). Each beat is then jittered by a counter-based random
  fraction of the RR interval (large in AF, where RR is irregular). Beats are defined on the subject's
  absolute time axis, so consecutive windows of a subject continue the same rhythm.
- ECG: McSharry-style Gaussian waves (P, Q, R, S, a second/terminal R, ST, T) per beat. Each wave owns a
  3-D heart vector (Frank X left, Y feet, Z back); the vectorcardiogram is projected onto I, II and
  V1-V6 with Dower's matrix, and III, aVR, aVL, aVF are derived exactly (Einthoven/Goldberger).
  QT follows each beat's preceding RR (Bazett).
- PPG: per beat a systolic and a diastolic Gaussian after the pulse arrival time, scaled by the
  preceding RR (Frank-Starling), with respiratory baseline and amplitude modulation.

Each output sample only sees the beat whose "territory" it lies in and the beat before it: a beat's
territory starts a little before its P wave, so every wave is evaluated where it is not negligible
while the cost stays two Gaussians per wave per sample, whatever the heart rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from p2es_dist.constants import FS, N_LEADS, WINDOW

# --- counter-based randomness: a value is a pure function of (key, counter), so any window or beat can be
# drawn alone, in any chunk, on any worker, and come out the same.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def counter_key(seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """uint64 keys for (seed, stream, id); feed them to `counter_uniform`."""
    base = _splitmix(np.asarray([seed * 1_000_003 + stream], dtype=np.uint64) * _GOLDEN)
    return _splitmix(base ^ (np.asarray(ids).astype(np.uint64) * _GOLDEN))


def counter_uniform(keys: np.ndarray, counter: np.ndarray | int = 0) -> np.ndarray:
    """Uniform [0, 1) float64 from uint64 keys and an integer counter (broadcast together)."""
    mixed = _splitmix(keys ^ _splitmix(np.asarray(counter).astype(np.uint64) + _GOLDEN))
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def counter_normal(keys: np.ndarray, counter: np.ndarray | int = 0) -> np.ndarray:
    """Standard normal float64 (Box-Muller on two counter draws)."""
    u1 = counter_uniform(keys, 2 * np.asarray(counter) + 1)
    u2 = counter_uniform(keys, 2 * np.asarray(counter) + 2)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


# --- the heart vector and the leads
# Dower's transform from Frank X, Y, Z (mV) to I, II, V1-V6 (Dower et al. 1980; the form used by
# Edenbrandt & Pahlm 1988). Rows: I, II, V1, V2, V3, V4, V5, V6.
DOWER = np.array(
    [
        [0.632, -0.235, 0.059],
        [0.235, 1.066, -0.132],
        [-0.515, 0.157, -0.917],
        [0.044, 0.164, -1.387],
        [0.882, 0.098, -1.277],
        [1.213, 0.127, -0.601],
        [1.125, 0.127, -0.086],
        [0.831, 0.076, 0.230],
    ],
    dtype=np.float32,
)
INDEPENDENT_LEADS = np.array([0, 1, 6, 7, 8, 9, 10, 11])  # I, II, V1-V6 in `constants.LEADS` order

# Waves of one beat, each with its own heart vector; F (fibrillatory f-waves) and W (baseline wander)
# are not beat-locked but share the projection so every lead sees them consistently.
WAVES = ("P", "Q", "R", "S", "R2", "ST", "T", "F", "W")
N_WAVES = len(WAVES)
_QRS_WAVES = slice(1, 5)  # Q, R, S, R2: fixed offset and width per window


@dataclass
class Physiology:
    """Per-window parameters, (n,) arrays unless noted. Times in seconds, rates in Hz."""

    t0: np.ndarray  # window start on the subject's time axis
    beat_key: np.ndarray  # uint64 key for per-beat jitter
    rate: np.ndarray  # mean heart rate
    phase0: np.ndarray  # beat phase at t=0, in beats
    rsa: np.ndarray  # relative rate modulation by respiration
    resp_freq: np.ndarray
    resp_phase: np.ndarray
    mayer: np.ndarray  # relative rate modulation at 0.1 Hz
    mayer_phase: np.ndarray
    drift: np.ndarray  # relative slow rate drift
    drift_freq: np.ndarray
    drift_phase: np.ndarray
    jitter: np.ndarray  # per-beat timing jitter, fraction of the mean RR (peak to peak)
    vectors: np.ndarray  # (n, N_WAVES, 3) heart vectors in mV (Frank axes)
    qrs_offset: np.ndarray  # (n, 4) centres of Q, R, S, R2 relative to the R peak
    qrs_width: np.ndarray  # (n, 4) their Gaussian widths
    pr: np.ndarray  # P peak to R peak
    qtc: np.ndarray  # Bazett-corrected QT
    t_width: np.ndarray  # T width factor
    j_point: np.ndarray  # end of QRS after the R peak
    fwave_freq: np.ndarray
    fwave_phase: np.ndarray
    lead_gain: np.ndarray  # (n, 8) electrode placement / body habitus, on I, II, V1-V6
    pat: np.ndarray  # R peak -> PPG systolic peak (pulse arrival time)
    sys_width: np.ndarray
    dia_delay: np.ndarray  # systolic -> diastolic peak
    dia_ratio: np.ndarray
    dia_width: np.ndarray
    ppg_resp: np.ndarray  # respiratory baseline amplitude of the PPG
    ecg_noise: np.ndarray  # white noise SD, mV
    ppg_noise: np.ndarray
    noise_offset: np.ndarray  # int64 offset into the noise bank


# --- beat times
def _rate_terms(p: Physiology) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(relative amplitude, angular frequency, phase) of each rate modulation, as (n,) arrays."""
    return [
        (p.rsa, 2 * np.pi * p.resp_freq, p.resp_phase),
        (p.mayer, np.full_like(p.rate, 2 * np.pi * 0.1), p.mayer_phase),
        (p.drift, 2 * np.pi * p.drift_freq, p.drift_phase),
    ]


def _phase(p: Physiology, t: np.ndarray, rows: tuple = (slice(None),)) -> tuple[np.ndarray, np.ndarray]:
    """Beat phase and its derivative (the instantaneous rate) at absolute times `t`."""
    rate = p.rate[rows]
    phase = p.phase0[rows] + rate * t
    deriv = np.ones_like(t)
    for amp, omega, shift in _rate_terms(p):
        a, w, s = amp[rows], omega[rows], shift[rows]
        phase -= rate * a / w * (np.cos(w * t + s) - np.cos(s))
        deriv += a * np.sin(w * t + s)
    return phase, rate * deriv


def beat_times(p: Physiology, *, before_s: float = 3.0, after_s: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """R-peak times relative to each window start (n, B) float64, and the preceding RR of each beat.

    Covers [-before_s, window + after_s]; beats past the end are kept (they are simply never reached).
    """
    n = len(p.t0)
    span = WINDOW / FS + before_s + after_s
    top_rate = p.rate * (1 + p.rsa + p.mayer + p.drift)
    n_beats = int(np.ceil(top_rate.max(initial=1.0) * span / (1 - 0.5 * p.jitter.max(initial=0.0)))) + 3
    first, _ = _phase(p, p.t0 - before_s)
    k = np.floor(first)[:, None] + np.arange(-1, n_beats - 1)  # one extra beat before, for the first RR
    t = (k - p.phase0[:, None]) / p.rate[:, None]
    rows = (slice(None), None)
    for _ in range(8):  # Newton: the phase is smooth and monotonic; converges to ~1e-12 s
        phase, rate = _phase(p, t, rows)
        t -= (phase - k) / rate
    jitter = counter_uniform(p.beat_key[:, None], k.astype(np.int64)) - 0.5
    t += (p.jitter / p.rate)[:, None] * jitter
    rr = np.diff(t, axis=1)
    return t[:, 1:] - p.t0[:, None], rr.reshape(n, -1)


def _territory(onsets: np.ndarray) -> np.ndarray:
    """(n, L) index of the last beat whose onset (n, B, in seconds, increasing) is at or before each sample."""
    n, n_beats = onsets.shape
    first_sample = np.clip(np.ceil(onsets * FS), 0, WINDOW).astype(np.int64)
    flat = (np.arange(n)[:, None] * (WINDOW + 1) + first_sample).ravel()
    starts = np.bincount(flat, minlength=n * (WINDOW + 1)).reshape(n, WINDOW + 1)[:, :WINDOW]
    index = np.cumsum(starts, axis=1, dtype=np.int32) - 1
    return np.clip(index, 1, n_beats - 1)


class _Gather:
    """Per-sample lookups of per-beat values for the territory beat and the one before it."""

    def __init__(self, index: np.ndarray, n_beats: int):
        rows = np.arange(index.shape[0], dtype=np.int32)[:, None] * n_beats
        self.current = (index + rows).ravel()
        self.previous = self.current - 1
        self.shape = index.shape

    def __call__(self, values: np.ndarray, which: str) -> np.ndarray:
        flat = values.astype(np.float32, copy=False).ravel()
        return flat[getattr(self, which)].reshape(self.shape)


def _add_gaussian(out: np.ndarray, tau: np.ndarray, centre, inv_width, scratch: np.ndarray, scale=None) -> None:
    """out += scale * exp(-((tau - centre) * inv_width)**2), in place on float32 buffers."""
    np.subtract(tau, centre, out=scratch)
    np.multiply(scratch, inv_width, out=scratch)
    np.square(scratch, out=scratch)
    np.negative(scratch, out=scratch)
    np.exp(scratch, out=scratch)
    if scale is not None:
        np.multiply(scratch, scale, out=scratch)
    np.add(out, scratch, out=out)


_SQRT_HALF = np.float32(np.sqrt(0.5))  # exp(-x^2/2) == exp(-(x*sqrt(1/2))^2)


@lru_cache(maxsize=4)
def _noise_bank(seed: int, size: int = 1 << 20) -> np.ndarray:
    """Rows of unit white noise, (size, WINDOW) as a strided view; row r+WINDOW continues row r."""
    bank = np.random.default_rng([seed, 0x5EED]).standard_normal(size, dtype=np.float32)
    return sliding_window_view(np.concatenate([bank, bank[:WINDOW]]), WINDOW)[:size]


def _noise(seed: int, offsets: np.ndarray) -> np.ndarray:
    bank = _noise_bank(seed)
    return bank[np.mod(offsets, bank.shape[0])]


# --- rendering
def render(p: Physiology, *, seed: int) -> dict[str, np.ndarray]:
    """`ecg` (n, 12, L) mV, `ppg` (n, L) au, `r_peaks` (n, B) seconds (NaN outside the window), `hr` (n,) bpm."""
    n = len(p.t0)
    beats, rr = beat_times(p)
    n_beats = beats.shape[1]
    ts = (np.arange(WINDOW, dtype=np.float32) / FS)[None, :]
    resp = np.sin((2 * np.pi * p.resp_freq)[:, None].astype(np.float32) * ts
                  + np.mod(2 * np.pi * p.resp_freq * p.t0 + p.resp_phase, 2 * np.pi)[:, None].astype(np.float32))

    # Bazett: QT scales with sqrt(RR); T ends at the end of QT, ST spans J point -> T peak.
    qt = p.qtc[:, None] * np.sqrt(np.clip(rr, 0.3, 1.6))
    t_width = 0.045 * (qt / 0.4) * p.t_width[:, None]
    t_peak = qt - 0.04 - 2.0 * t_width
    st_centre = 0.5 * (p.j_point[:, None] + t_peak)
    st_width = np.maximum((t_peak - p.j_point[:, None]) / 2.5, 0.01)
    # A beat's territory starts before its P wave, but never before the middle of the preceding RR.
    onsets = beats - np.minimum(0.3, 0.5 * rr)
    gather = _Gather(_territory(onsets), n_beats)

    basis = np.zeros((n, N_WAVES, WINDOW), dtype=np.float32)
    scratch = np.empty((n, WINDOW), dtype=np.float32)
    tau = np.empty((n, WINDOW), dtype=np.float32)
    col = lambda x: np.asarray(x, dtype=np.float32)[:, None]  # noqa: E731
    p_centre, p_inv = col(-p.pr), col(_SQRT_HALF / 0.022)
    qrs_centre = p.qrs_offset.astype(np.float32)
    qrs_inv = (_SQRT_HALF / p.qrs_width).astype(np.float32)
    for which in ("current", "previous"):
        np.subtract(ts, gather(beats, which), out=tau)
        _add_gaussian(basis[:, 0], tau, p_centre, p_inv, scratch)
        for i in range(4):
            _add_gaussian(basis[:, 1 + i], tau, qrs_centre[:, i : i + 1], qrs_inv[:, i : i + 1], scratch)
        _add_gaussian(basis[:, 5], tau, gather(st_centre, which), _SQRT_HALF / gather(st_width, which), scratch)
        _add_gaussian(basis[:, 6], tau, gather(t_peak, which), _SQRT_HALF / gather(t_width, which), scratch)
    basis[:, 2] *= 1 + 0.05 * resp  # respiration moves the heart: QRS amplitude modulation
    basis[:, 7] = np.sin(col(2 * np.pi * p.fwave_freq) * ts + col(p.fwave_phase) + 0.8 * resp)
    basis[:, 8] = resp

    # Heart vectors -> Dower -> I, II, V1-V6 with electrode gains, then the four derived limb leads.
    weights = np.einsum("lx,ncx->nlc", DOWER, p.vectors.astype(np.float32)) * p.lead_gain[:, :, None]
    independent = np.matmul(weights.astype(np.float32), basis)
    offsets = p.noise_offset[:, None] + 7919 * np.arange(N_LEADS - 4)[None, :]
    independent += _noise(seed, offsets) * col(p.ecg_noise)[:, :, None]
    ecg = np.empty((n, N_LEADS, WINDOW), dtype=np.float32)
    ecg[:, INDEPENDENT_LEADS] = independent
    lead_i, lead_ii = ecg[:, 0], ecg[:, 1]
    ecg[:, 2] = lead_ii - lead_i  # III
    ecg[:, 3] = -(lead_i + lead_ii) / 2  # aVR
    ecg[:, 4] = lead_i - lead_ii / 2  # aVL
    ecg[:, 5] = lead_ii - lead_i / 2  # aVF

    ppg = _render_ppg(p, beats, rr, ts, resp, tau, scratch)
    ppg += _noise(seed, p.noise_offset + 104_729) * col(p.ppg_noise)

    in_window = (beats >= 0) & (beats < WINDOW / FS)
    r_peaks = np.where(in_window, beats, np.nan)
    hr = 60.0 / np.nanmean(np.where(in_window, rr, np.nan), axis=1)
    return {"ecg": ecg, "ppg": ppg, "r_peaks": r_peaks, "hr": hr.astype(np.float32)}


def _render_ppg(p: Physiology, beats: np.ndarray, rr: np.ndarray, ts: np.ndarray, resp: np.ndarray,
                tau: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Systolic + diastolic Gaussian pulses after the pulse arrival time, with respiratory modulation."""
    col = lambda x: np.asarray(x, dtype=np.float32)[:, None]  # noqa: E731
    arrivals = beats + p.pat[:, None]
    # A longer preceding RR fills the ventricle more: stroke volume (pulse amplitude) and ejection time grow
    # with it (strongly so in AF, where RR varies a lot from beat to beat).
    relative_rr = np.clip(rr * p.rate[:, None], 0.4, 1.8)
    amplitude = relative_rr**0.8
    stretch = np.sqrt(np.clip(rr, 0.3, 1.4) / 0.85)
    onsets = arrivals - np.minimum(0.3, 0.5 * rr)
    gather = _Gather(_territory(onsets), beats.shape[1])
    ppg = np.zeros_like(tau)
    sys_inv, dia_inv = col(_SQRT_HALF / p.sys_width), col(_SQRT_HALF / p.dia_width)
    for which in ("current", "previous"):
        np.subtract(ts, gather(arrivals, which), out=tau)
        stretch_b, amp_b = gather(stretch, which), gather(amplitude, which)
        np.divide(tau, stretch_b, out=tau)  # shorter beats: narrower pulse, earlier diastolic wave
        _add_gaussian(ppg, tau, 0.0, sys_inv, scratch, scale=amp_b)
        _add_gaussian(ppg, tau, col(p.dia_delay), dia_inv, scratch, scale=amp_b * col(p.dia_ratio))
    ppg *= 1 + 0.08 * resp
    ppg += col(p.ppg_resp) * resp
    return ppg
