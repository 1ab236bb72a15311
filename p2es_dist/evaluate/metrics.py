"""Signal-fidelity metrics of `metrics.json` (`p2es_dist/schemas/metrics.schema.json`): pure numpy functions,
per-window per-lead arrays in, dicts out.

Shapes: `target`, `prediction` are (n, 12, L) in one space (model space or per-lead min-max), `mask` (n, 12)
says which leads enter the metrics (recorded, and not given to the model as input). Per-window per-lead
values are NaN where the mask is False or the metric is undefined (Pearson / rRMSE of a flat target), and
every mean is a NaN-aware mean, so a lead's value is the mean over the windows where it is defined.

DTW (`dtaidistance`, its C library): local cost |a - b| (Euclidean distance between 1-D samples, dtaidistance
`inner_dist="euclidean"`), summed along the optimal warping path, divided by L. Because the diagonal is one
admissible path, per window DTW <= MAE. Sakoe-Chiba band: |i - j| <= round(0.1 L) = 102 samples for
L = 1024; dtaidistance's `window` excludes its bound (`window=w` allows shifts up to w - 1), so we pass
`window = 103`. See `sakoe_chiba_window`.

Aggregation: per lead, mean over windows; `overall`, mean over leads. 95 % intervals: percentile bootstrap
over subjects (all windows of a drawn subject enter together, so windows of one patient are not
treated as independent).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from p2es_dist.constants import FS, LEADS

METRICS: tuple[str, ...] = ("mse", "mae", "rmse", "rrmse", "pearson", "pearson_lag", "lag_ms", "amp_ratio", "dtw")
# `amp_ratio`: peak-to-peak of the generated lead over that of the recorded one (1: same height). An output
# that averages over where a QRS might fall scores well on MSE and Pearson with QRS complexes half as tall;
# this says so. Window space only: per-lead min-max scaling makes every lead's peak-to-peak 2.
# Lag-tolerant Pearson: the best Pearson over shifts of the generated lead within +-80 ms (10 samples),
# a QRS placed one PAT-spread early or late. `lag_ms` is that shift (positive: generated lags recorded).
MAX_LAG_MS = 80.0
DTW_BAND_FRACTION = 0.1
HR_MIN_PEAKS = 4  # >= 3 RR intervals in an 8 s window; fewer (or a failed detection) excludes the window
_EPS = 1e-12


def _masked(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, values, np.nan)


def pointwise_errors(target: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 12) per-window per-lead mse, mae, rmse, rrmse (||e - ê|| / ||e||), Pearson r (plain and
    lag-tolerant, with its lag) and amp_ratio (peak-to-peak of prediction / of target)."""
    target = np.asarray(target, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    error = prediction - target
    mse = np.mean(error**2, axis=-1)
    target_norm = np.sqrt(np.sum(target**2, axis=-1))
    t_centred = target - target.mean(axis=-1, keepdims=True)
    p_centred = prediction - prediction.mean(axis=-1, keepdims=True)
    denominator = np.sqrt(np.sum(t_centred**2, axis=-1) * np.sum(p_centred**2, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rrmse = np.where(target_norm > _EPS, np.sqrt(np.sum(error**2, axis=-1)) / target_norm, np.nan)
        pearson = np.where(denominator > _EPS, np.sum(t_centred * p_centred, axis=-1) / denominator, np.nan)
        target_span = np.ptp(target, axis=-1)
        amp_ratio = np.where(target_span > _EPS, np.ptp(prediction, axis=-1) / target_span, np.nan)
    return {
        "mse": _masked(mse, mask),
        "mae": _masked(np.mean(np.abs(error), axis=-1), mask),
        "rmse": _masked(np.sqrt(mse), mask),
        "rrmse": _masked(rrmse, mask),
        "pearson": _masked(pearson, mask),
        **lagged_pearson(target, prediction, mask),
        "amp_ratio": _masked(amp_ratio, mask),
    }


def lagged_pearson(target: np.ndarray, prediction: np.ndarray, mask: np.ndarray,
                   *, max_lag_ms: float = MAX_LAG_MS, fs: float = FS) -> dict[str, np.ndarray]:
    """(n, 12) best Pearson r over shifts within +-`max_lag_ms` and the shift (ms) that gives it.

    Every shift is scored on the same central span (the window minus `max_lag` samples at each end), so
    no shift is favoured by a shorter overlap; shift 0 therefore differs slightly from `pearson`.
    """
    max_lag = int(round(max_lag_ms * fs / 1000.0))
    length = target.shape[-1]
    if length <= 4 * max_lag:  # too short to shift: no lag-tolerant figure
        nothing = np.full(target.shape[:-1], np.nan)
        return {"pearson_lag": nothing, "lag_ms": nothing.copy()}
    core = slice(max_lag, length - max_lag)
    t = target[..., core]
    t = t - t.mean(axis=-1, keepdims=True)
    t_norm = np.sqrt(np.sum(t**2, axis=-1))
    best = np.full(target.shape[:-1], -np.inf)
    best_lag = np.zeros(target.shape[:-1])
    for lag in range(-max_lag, max_lag + 1):
        p = prediction[..., max_lag + lag: length - max_lag + lag]
        p = p - p.mean(axis=-1, keepdims=True)
        denominator = t_norm * np.sqrt(np.sum(p**2, axis=-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denominator > _EPS, np.sum(t * p, axis=-1) / denominator, np.nan)
        better = np.nan_to_num(r, nan=-np.inf) > best
        best = np.where(better, r, best)
        best_lag = np.where(better, lag, best_lag)
    best = np.where(np.isfinite(best), best, np.nan)
    lag_ms = np.where(np.isfinite(best), best_lag * 1000.0 / fs, np.nan)
    return {"pearson_lag": _masked(best, mask), "lag_ms": _masked(lag_ms, mask)}


def sakoe_chiba_window(length: int, fraction: float = DTW_BAND_FRACTION) -> int:
    """dtaidistance's `window=` for a band |i - j| <= round(fraction * length) (its bound is exclusive)."""
    return max(1, int(round(fraction * length))) + 1


def dtw_distance(a: np.ndarray, b: np.ndarray, *, window: int) -> float:
    """DTW of two 1-D series with |a - b| local cost (dtaidistance C library), not yet divided by L."""
    from dtaidistance import dtw

    # distance_fast raises when the C extension is missing instead of silently using pure Python.
    return float(dtw.distance_fast(np.ascontiguousarray(a, dtype=np.float64),
                                   np.ascontiguousarray(b, dtype=np.float64),
                                   window=window, inner_dist="euclidean", use_pruning=True))


def dtw_per_lead(target: np.ndarray, prediction: np.ndarray, mask: np.ndarray,
                 *, fraction: float = DTW_BAND_FRACTION) -> np.ndarray:
    """(n, 12) DTW / L on the masked leads, NaN elsewhere."""
    n, n_leads, length = target.shape
    window = sakoe_chiba_window(length, fraction)
    out = np.full((n, n_leads), np.nan)
    for i, j in zip(*np.nonzero(mask), strict=True):
        out[i, j] = dtw_distance(target[i, j], prediction[i, j], window=window) / length
    return out


def window_metrics(target: np.ndarray, prediction: np.ndarray, mask: np.ndarray,
                   *, with_dtw: bool = True) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` as (n, 12) per-window per-lead arrays (DTW all NaN when `with_dtw` is off)."""
    values = pointwise_errors(target, prediction, mask)
    values["dtw"] = (dtw_per_lead(target, prediction, mask) if with_dtw
                     else np.full(np.shape(mask), np.nan))
    return values


def nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the all-NaN warning (absent leads are expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are expected (absent leads)
        return np.nanmean(values, axis=axis)


def subject_bootstrap(values: np.ndarray, subjects: Sequence, *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column means of (n, K) `values` (NaN = missing) and their mean over columns, with bootstrap CIs.

    Returns (point (K + 1,), low (K + 1,), high (K + 1,)); the last entry is the mean over columns. Each
    replicate draws subjects with replacement; a column's replicate mean pools the windows of the drawn
    subjects (a subject drawn twice counts twice).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    _, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    n_subjects = int(inverse.max()) + 1 if inverse.size else 0
    finite = np.isfinite(values)
    sums = np.zeros((n_subjects, values.shape[1]))
    counts = np.zeros((n_subjects, values.shape[1]))
    np.add.at(sums, inverse, np.where(finite, values, 0.0))
    np.add.at(counts, inverse, finite.astype(np.float64))

    def summarise(weights: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ sums) / (weights @ counts)
        return np.concatenate([means, nanmean(means, axis=1)[:, None]], axis=1)

    point = summarise(np.ones((1, n_subjects)))[0]
    if n_subjects == 0 or n_boot <= 0:
        return point, np.full_like(point, np.nan), np.full_like(point, np.nan)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_subjects, np.full(n_subjects, 1.0 / n_subjects), size=n_boot).astype(np.float64)
    replicates = summarise(weights)
    tail = 100.0 * (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(replicates, [tail, 100.0 - tail], axis=0)
    return point, low, high


def as_number(value: float) -> float | None:
    """A finite float for JSON, or None."""
    return float(value) if np.isfinite(value) else None


def aggregate(per_window: dict[str, np.ndarray], mask: np.ndarray, subjects: Sequence, *,
              n_boot: int = 1000, seed: int = 0) -> dict:
    """{"leads": {lead: {metric, ..., "n", "ci95": {metric: [lo, hi]}}}, "overall": {...}} (JSON-ready).

    Only leads with at least one masked window appear; `n` is that number of windows.
    """
    mask = np.asarray(mask, dtype=bool)
    present = np.nonzero(mask.any(axis=0))[0]
    leads: dict[str, dict] = {LEADS[j]: {"n": int(mask[:, j].sum()), "ci95": {}} for j in present}
    overall: dict = {"n": int(mask.any(axis=1).sum()), "n_leads": len(present), "ci95": {}}
    for name, values in per_window.items():
        point, low, high = subject_bootstrap(values[:, present], subjects, n_boot=n_boot, seed=seed)
        for k, j in enumerate(present):
            leads[LEADS[j]][name] = as_number(point[k])
            leads[LEADS[j]]["ci95"][name] = [as_number(low[k]), as_number(high[k])]
        overall[name] = as_number(point[-1])
        overall["ci95"][name] = [as_number(low[-1]), as_number(high[-1])]
    return {"leads": leads, "overall": overall}


def heart_rate(lead: np.ndarray, *, fs: float = FS, min_peaks: int = HR_MIN_PEAKS) -> float:
    """Heart rate (bpm) of one lead from neurokit2 R-peaks: 60 / median RR; NaN with fewer than `min_peaks`."""
    import neurokit2 as nk

    lead = np.asarray(lead, dtype=np.float64)
    if not np.all(np.isfinite(lead)) or np.ptp(lead) < _EPS:
        return float("nan")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # neurokit warns on short or odd signals; we count the exclusion
            cleaned = nk.ecg_clean(lead, sampling_rate=int(fs), method="neurokit")
            _, info = nk.ecg_peaks(cleaned, sampling_rate=int(fs), method="neurokit")
    except Exception:  # a detector failure on a garbage window is an excluded window, not a crash
        return float("nan")
    peaks = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
    if peaks.size < min_peaks:
        return float("nan")
    return float(60.0 * fs / np.median(np.diff(peaks)))


def heart_rates(leads: np.ndarray, *, fs: float = FS, min_peaks: int = HR_MIN_PEAKS) -> np.ndarray:
    """(n,) bpm for (n, L) single-lead windows (NaN = excluded)."""
    return np.array([heart_rate(x, fs=fs, min_peaks=min_peaks) for x in np.asarray(leads)], dtype=np.float64)


def hr_agreement(recorded_bpm: np.ndarray, generated_bpm: np.ndarray, subjects: Sequence, *,
                 n_boot: int = 1000, seed: int = 0) -> dict:
    """MAE (bpm) between two heart-rate series on the windows where both are defined, with a subject CI."""
    recorded_bpm, generated_bpm = np.asarray(recorded_bpm, float), np.asarray(generated_bpm, float)
    both = np.isfinite(recorded_bpm) & np.isfinite(generated_bpm)
    error = np.where(both, np.abs(generated_bpm - recorded_bpm), np.nan)
    point, low, high = subject_bootstrap(error, subjects, n_boot=n_boot, seed=seed)
    return {"mae_bpm": as_number(point[0]), "ci95": [as_number(low[0]), as_number(high[0])],
            "n_windows": int(both.sum()), "n_excluded": int((~both).sum()),
            "n_excluded_recorded": int((~np.isfinite(recorded_bpm)).sum()),
            "n_excluded_generated": int((~np.isfinite(generated_bpm)).sum())}


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance of Gaussian fits: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (n >= 2, D) feature sets of equal D, got {a.shape} and {b.shape}")
    mean_diff = a.mean(axis=0) - b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(root)):
        # Singular products (fewer windows than features): regularise as the FID reference code does.
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)  # imaginary parts are numerical noise of a PSD product
    value = mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root)
    return float(max(value, 0.0))
