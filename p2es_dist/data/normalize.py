"""Model space (what every model reads and writes, `models/base.py`) and the per-lead min-max space used to
compare with published numbers.

Model space: PPG min-max scaled to [-1, 1] per window; the 12 ECG leads divided together by one factor
per window (max |x| over recorded leads), so that the relations between leads (III = II - I, ...) survive.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-8


def ppg_to_model_space(ppg: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """(n, L) -> (n, L) in [-1, 1] per window; absent or flat windows become zeros."""
    low = ppg.min(axis=-1, keepdims=True)
    span = ppg.max(axis=-1, keepdims=True) - low
    scaled = np.where(span > _EPS, 2.0 * (ppg - low) / np.maximum(span, _EPS) - 1.0, 0.0)
    if present is not None:
        scaled = scaled * present[:, None]
    return scaled.astype(np.float32)


def ecg_scale(ecg: np.ndarray, ecg_mask: np.ndarray) -> np.ndarray:
    """(n,) one factor per window: max |x| over the recorded leads (1 when nothing is recorded)."""
    # max and -min instead of abs: no temporary copy of the whole block. Reduce first, then mask (n, 12).
    peak_per_lead = np.maximum(ecg.max(axis=-1), -ecg.min(axis=-1))
    peak = np.where(ecg_mask, peak_per_lead, 0).max(axis=-1).astype(np.float32)
    return np.where(peak > _EPS, peak, np.float32(1.0))


def ecg_to_model_space(ecg: np.ndarray, ecg_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12, L) -> (model-space ECG with absent leads zeroed, the (n,) scale that undoes it)."""
    scale = ecg_scale(ecg, ecg_mask)
    factor = (ecg_mask / scale[:, None]).astype(np.float32)
    return np.multiply(ecg, factor[..., None], dtype=np.float32), scale


def minmax_per_lead(ecg: np.ndarray) -> np.ndarray:
    """Per-lead per-window min-max to [-1, 1] along the last axis (the space most papers report in)."""
    low = ecg.min(axis=-1, keepdims=True)
    span = ecg.max(axis=-1, keepdims=True) - low
    return np.where(span > _EPS, 2.0 * (ecg - low) / np.maximum(span, _EPS) - 1.0, 0.0).astype(np.float32)
