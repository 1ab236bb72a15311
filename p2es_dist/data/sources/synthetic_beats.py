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

from dataclasses import dataclass, fields
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
    """The SplitMix64 finaliser (Steele et al. 2014): a bijection on uint64 with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _combine(state: np.ndarray, values: np.ndarray | int, level: int) -> np.ndarray:
    """Hash `values` into `state`: a SplitMix64 step keyed by the level, so no two levels can cancel."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        return _splitmix(state + (np.asarray(values).astype(np.uint64) + np.uint64(level)) * _GOLDEN)


def counter_key(seed: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """uint64 keys for (seed, stream, id); feed them to `counter_uniform`."""
    state = _combine(np.uint64(0x2545F4914F6CDD1D), seed, 1)
    return _combine(_combine(state, stream, 2), ids, 3)


def counter_uniform(keys: np.ndarray, counter: np.ndarray | int = 0) -> np.ndarray:
    """Uniform [0, 1) float64 from uint64 keys and an integer counter (broadcast together)."""
    mixed = _combine(keys, counter, 4)
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def counter_normal(keys: np.ndarray, counter: np.ndarray | int = 0) -> np.ndarray:
    """Standard normal float64 (Box-Muller on two counter draws)."""
    u1 = counter_uniform(keys, 2 * np.asarray(counter) + 1)
    u2 = counter_uniform(keys, 2 * np.asarray(counter) + 2)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


# --- the heart vector and the leads
# Dower's transform from Frank X, Y, Z (mV) to I, II, V1-V6 (Dower, Machado & Osborne 1980).
# Rows: I, II, V1, V2, V3, V4, V5, V6.
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

    def rows(self, index: slice | np.ndarray) -> Physiology:
        """The same parameters for a subset of the windows."""
        return Physiology(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


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
    span = WINDOW / FS + before_s + after_s
    top_rate = p.rate * (1 + p.rsa + p.mayer + p.drift)
    n_beats = int(np.ceil(top_rate.max(initial=1.0) * span / (1 - 0.5 * p.jitter.max(initial=0.0)))) + 3
    first, _ = _phase(p, p.t0 - before_s)
    k = np.floor(first)[:, None] + np.arange(-1, n_beats - 1)  # one extra beat before, for the first RR
    # Newton from the tangent at the window centre: the slow drift is then already accounted for and the
    # phase is smooth and monotonic, so three steps leave < 1e-6 beats (well under a microsecond).
    t_ref = p.t0 + 0.5 * WINDOW / FS
    phase_ref, rate_ref = _phase(p, t_ref)
    t = t_ref[:, None] + (k - phase_ref[:, None]) / rate_ref[:, None]
    rows = (slice(None), None)
    for _ in range(3):
        phase, rate = _phase(p, t, rows)
        t -= (phase - k) / rate
    jitter = counter_uniform(p.beat_key[:, None], k.astype(np.int64)) - 0.5
    t += (p.jitter / p.rate)[:, None] * jitter
    rr = np.diff(t, axis=1)
    return t[:, 1:] - p.t0[:, None], rr


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
        """(n, L) float32 from per-beat `values` (n, B); `which` is "current" or "previous"."""
        return values.astype(np.float32, copy=False).ravel()[getattr(self, which)].reshape(self.shape)


def _add_gaussian(out: np.ndarray, tau: np.ndarray, centre, width, scratch: np.ndarray, scale=None) -> None:
    """out += scale * exp(-(tau - centre)**2 / (2 width**2)), in place on float32 (n, L) buffers."""
    np.subtract(tau, centre, out=scratch)
    np.square(scratch, out=scratch)
    np.multiply(scratch, np.float32(-0.5) / np.square(width, dtype=np.float32), out=scratch)
    np.exp(scratch, out=scratch)
    if scale is not None:
        np.multiply(scratch, scale, out=scratch)
    np.add(out, scratch, out=out)


@lru_cache(maxsize=4)
def _noise_bank(seed: int, size: int = 1 << 20) -> np.ndarray:
    """Rows of unit white noise, (size, WINDOW) as a strided view; row r+WINDOW continues row r."""
    bank = np.random.default_rng([seed, 0x5EED]).standard_normal(size, dtype=np.float32)
    return sliding_window_view(np.concatenate([bank, bank[:WINDOW]]), WINDOW)[:size]


def _noise(seed: int, offsets: np.ndarray) -> np.ndarray:
    """White noise windows; consecutive windows of a subject (offset + WINDOW) continue each other."""
    bank = _noise_bank(seed)
    return bank[np.mod(offsets, bank.shape[0])]


def _column(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)[:, None]


# --- rendering
def render(p: Physiology, *, seed: int, ecg_out: np.ndarray | None = None,
           ppg_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`ecg` (n, 12, L) mV, `ppg` (n, L) au, `r_peaks` (n, B) seconds (NaN outside the window), `hr` (n,) bpm.

    `ecg_out` / `ppg_out` are float32 buffers to render into (e.g. slices of a whole chunk's arrays).
    """
    n = len(p.t0)
    beats, rr = beat_times(p)
    ts = (np.arange(WINDOW, dtype=np.float32) / FS)[None, :]
    resp_phase = np.mod(2 * np.pi * p.resp_freq * p.t0 + p.resp_phase, 2 * np.pi)
    resp = np.sin(_column(2 * np.pi * p.resp_freq) * ts + _column(resp_phase))

    basis = _render_waves(p, beats, rr, ts)
    basis[:, WAVES.index("R")] *= 1 + 0.05 * resp  # respiration moves the heart: QRS amplitude modulation
    fibrillating = np.flatnonzero(np.any(p.vectors[:, WAVES.index("F")] != 0, axis=1))
    f_omega = 2 * np.pi * p.fwave_freq[fibrillating]
    f_phase = np.mod(f_omega * p.t0[fibrillating] + p.fwave_phase[fibrillating], 2 * np.pi)
    basis[fibrillating, WAVES.index("F")] = np.sin(_column(f_omega) * ts + _column(f_phase) + 0.8 * resp[fibrillating])
    basis[:, WAVES.index("W")] = resp

    # Heart vectors -> Dower -> I, II, V1-V6 with electrode gains, then the four derived limb leads.
    ecg = np.empty((n, N_LEADS, WINDOW), dtype=np.float32) if ecg_out is None else ecg_out
    weights = (np.einsum("lx,ncx->nlc", DOWER, p.vectors) * p.lead_gain[:, :, None]).astype(np.float32)
    noise = _noise(seed, p.noise_offset[:, None] + 7919 * np.arange(len(INDEPENDENT_LEADS))[None, :])
    noise *= _column(p.ecg_noise)[:, :, None]
    for leads, rows in ((slice(0, 2), slice(0, 2)), (slice(6, 12), slice(2, 8))):  # I, II and V1-V6
        np.matmul(weights[:, rows], basis, out=ecg[:, leads])
        ecg[:, leads] += noise[:, rows]
    lead_i, lead_ii = ecg[:, 0], ecg[:, 1]
    np.subtract(lead_ii, lead_i, out=ecg[:, 2])  # III = II - I
    np.multiply(lead_i + lead_ii, np.float32(-0.5), out=ecg[:, 3])  # aVR = -(I + II) / 2
    np.subtract(lead_i, lead_ii * np.float32(0.5), out=ecg[:, 4])  # aVL = I - II / 2
    np.subtract(lead_ii, lead_i * np.float32(0.5), out=ecg[:, 5])  # aVF = II - I / 2

    ppg = _render_ppg(p, beats, rr, ts, resp, out=ppg_out)
    ppg += _noise(seed, p.noise_offset + 104_729) * _column(p.ppg_noise)

    in_window = (beats >= 0) & (beats < WINDOW / FS)
    r_peaks = np.where(in_window, beats, np.nan)
    with np.errstate(invalid="ignore"):
        hr = 60.0 / np.nanmean(np.where(in_window, rr, np.nan), axis=1)
    return {"ecg": ecg, "ppg": ppg, "r_peaks": r_peaks, "hr": hr.astype(np.float32)}


def _render_waves(p: Physiology, beats: np.ndarray, rr: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(n, N_WAVES, L) unit-amplitude wave trains; F and W are left for the caller."""
    n = len(p.t0)
    # A beat's territory starts before its P wave, but never before the middle of the preceding RR, so
    # only its ST and T can reach into the next territory.
    gather = _Gather(_territory(beats - np.minimum(0.3, 0.5 * rr)), beats.shape[1])
    # Bazett: QT scales with sqrt(RR); T ends where QT does (QRS onset ~40 ms before R), ST spans J -> T peak.
    qt = p.qtc[:, None] * np.sqrt(np.clip(rr, 0.3, 1.6))
    t_width_per_qt = _column(0.045 / 0.4 * p.t_width)
    j_point = _column(p.j_point)
    injured = np.flatnonzero(np.any(p.vectors[:, WAVES.index("ST")] != 0, axis=1))
    two_humped = np.flatnonzero(np.any(p.vectors[:, WAVES.index("R2")] != 0, axis=1))

    basis = np.zeros((n, N_WAVES, WINDOW), dtype=np.float32)
    tau = np.empty((n, WINDOW), dtype=np.float32)
    scratch = np.empty((n, WINDOW), dtype=np.float32)
    for which in ("current", "previous"):
        np.subtract(ts, gather(beats, which), out=tau)
        if which == "current":
            _add_gaussian(basis[:, 0], tau, _column(-p.pr), np.float32(0.022), scratch)
            for i in range(3):  # Q, R, S
                _add_gaussian(basis[:, 1 + i], tau, _column(p.qrs_offset[:, i]), _column(p.qrs_width[:, i]), scratch)
            r2_offset, r2_width = _column(p.qrs_offset[two_humped, 3]), _column(p.qrs_width[two_humped, 3])
            _add_subset(basis, 4, two_humped, tau, r2_offset, r2_width)
        qt_here = gather(qt, which)
        t_width = qt_here * t_width_per_qt
        t_peak = qt_here - 0.04 - 2.0 * t_width
        _add_gaussian(basis[:, 6], tau, t_peak, t_width, scratch)
        st_start, st_end = j_point[injured], t_peak[injured]
        st_width = np.maximum((st_end - st_start) / 2.5, np.float32(0.01))
        _add_subset(basis, 5, injured, tau, 0.5 * (st_start + st_end), st_width)
    return basis


def _add_subset(basis: np.ndarray, wave: int, rows: np.ndarray, tau: np.ndarray, centre, width) -> None:
    """A wave only some windows have (R2, ST), computed on those `rows` alone; centre/width are theirs."""
    if not len(rows):
        return
    part = basis[rows, wave]
    _add_gaussian(part, tau[rows], centre, width, np.empty_like(part))
    basis[rows, wave] = part


def _render_ppg(p: Physiology, beats: np.ndarray, rr: np.ndarray, ts: np.ndarray, resp: np.ndarray,
                out: np.ndarray | None = None) -> np.ndarray:
    """Systolic + diastolic Gaussian pulses after the pulse arrival time, with respiratory modulation."""
    arrivals = beats + p.pat[:, None]
    # A longer preceding RR fills the ventricle more: stroke volume (pulse amplitude) grows with it, a lot
    # in AF where RR varies from beat to beat. Short beats also eject faster: a narrower pulse.
    amplitude = np.clip(rr * p.rate[:, None], 0.4, 1.8) ** 0.8
    inverse_stretch = np.sqrt(0.85 / np.clip(rr, 0.3, 1.4))
    gather = _Gather(_territory(arrivals - np.minimum(0.3, 0.5 * rr)), beats.shape[1])
    ppg = np.zeros((len(p.t0), WINDOW), dtype=np.float32) if out is None else out
    ppg[...] = 0.0
    tau = np.empty_like(ppg)
    scratch = np.empty_like(ppg)
    for which in ("current", "previous"):
        np.subtract(ts, gather(arrivals, which), out=tau)
        np.multiply(tau, gather(inverse_stretch, which), out=tau)
        amp = gather(amplitude, which)
        _add_gaussian(ppg, tau, np.float32(0.0), _column(p.sys_width), scratch, scale=amp)
        _add_gaussian(ppg, tau, _column(p.dia_delay), _column(p.dia_width), scratch,
                      scale=amp * _column(p.dia_ratio))
    ppg *= 1 + 0.08 * resp
    ppg += _column(p.ppg_resp) * resp
    return ppg
