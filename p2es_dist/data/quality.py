"""A per-window signal quality index in [0, 1], vectorised over windows.

ECG: the share of 5-40 Hz power that lies in the QRS band (5-15 Hz), the pSQI of Li, Clifford et al.
(2008); broadband noise and flat lines score low. PPG: the share of 0.5-8 Hz power in the cardiac band
(0.5-3 Hz). Both are mapped linearly to [0, 1]; a window's index is the mean over recorded leads, times
the PPG index when PPG is present, so one bad signal in a pair marks the pair.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from p2es_dist.constants import FS


def _band_share(signals: np.ndarray, band: tuple[float, float], total: tuple[float, float]) -> np.ndarray:
    """Fraction of the power within `total` that lies in `band`, along the last axis; 0 for silent signals."""
    n = signals.shape[-1]
    spectrum = np.abs(scipy.fft.rfft(signals.astype(np.float32, copy=False), axis=-1, workers=1)) ** 2

    def bin_of(hz: float) -> int:  # bins are contiguous, so a slice beats a boolean mask copy
        return int(np.ceil(hz * n / FS))

    in_band = spectrum[..., bin_of(band[0]) : bin_of(band[1])].sum(axis=-1)
    in_total = spectrum[..., bin_of(total[0]) : bin_of(total[1])].sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(in_total > 0, in_band / in_total, 0.0)
    return share


def quality_index(ecg: np.ndarray, ecg_mask: np.ndarray, ppg: np.ndarray | None) -> np.ndarray:
    """(n,) float32 in [0, 1] from `ecg` (n, 12, L), `ecg_mask` (n, 12) and optional `ppg` (n, L)."""
    ecg_share = _band_share(ecg, (5.0, 15.0), (5.0, 40.0))  # (n, 12)
    # Clean ECG puts 0.5-0.8 of its 5-40 Hz power in 5-15 Hz; white noise puts 10/35 ~= 0.29.
    lead_quality = np.clip((ecg_share - 0.25) / 0.4, 0.0, 1.0)
    recorded = ecg_mask.sum(axis=1)
    ecg_quality = np.where(recorded > 0, (lead_quality * ecg_mask).sum(axis=1) / np.maximum(recorded, 1), 1.0)
    if ppg is None:
        return ecg_quality.astype(np.float32)
    ppg_share = _band_share(ppg, (0.5, 3.0), (0.5, 8.0))
    # A clean pulse wave keeps > 0.9 of that power at the heart rate and its first harmonics.
    ppg_quality = np.clip((ppg_share - 0.4) / 0.5, 0.0, 1.0)
    return (ecg_quality * ppg_quality).astype(np.float32)
