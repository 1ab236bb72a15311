"""Windowing a long signal and stitching per-window outputs back by weighted overlap-add.

Windows start every `hop` samples; when the last one does not reach the end, one more window is
aligned to the end, so every sample is covered whatever the length (at least one window long).

Each window's output is weighted by a periodic Hann-like taper, sin^2(pi (t + 1/2) / W), positive at
every sample, and the weights at each sample are divided by their sum over the windows covering it.
The normalised weights therefore sum to exactly 1 everywhere, edges and the irregular last window
included: a constant signal comes back unchanged, and windows cut from a signal stitch back into it.
The taper makes the seam between two windows a smooth cross-fade, with each window trusted most in
its middle, where a model that sees 8 s of context does best.
"""

from __future__ import annotations

import numpy as np


def window_starts(n_samples: int, window: int, hop: int) -> np.ndarray:
    """Starts 0, hop, 2 hop, ... plus one window aligned to the end when the grid leaves a tail."""
    if not 1 <= hop <= window:
        raise ValueError(f"hop must be between 1 and the window ({window}), got {hop}")
    if n_samples < window:
        raise ValueError(f"{n_samples} samples are shorter than one window of {window}")
    starts = np.arange(0, n_samples - window + 1, hop, dtype=np.int64)
    if starts[-1] + window < n_samples:
        starts = np.append(starts, n_samples - window)
    return starts


def cut_windows(signal: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """(..., n) -> (k, ..., window): the windows of the last axis at `starts`."""
    return np.stack([signal[..., s:s + window] for s in starts])


def taper(window: int) -> np.ndarray:
    """sin^2(pi (t + 1/2) / W): Hann-shaped, never zero, and at hop W/2 its shifted copies sum to 1."""
    return np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2


def overlap_weights(starts: np.ndarray, window: int, n_samples: int) -> np.ndarray:
    """(k, window) weight of each window at each of its samples; at every sample they sum to 1."""
    shape = taper(window)
    total = np.zeros(n_samples, dtype=np.float64)
    for start in starts:
        total[start:start + window] += shape
    if np.any(total <= 0):
        raise ValueError("the windows do not cover every sample")
    return np.stack([shape / total[start:start + window] for start in starts])


def overlap_add(windows: np.ndarray, starts: np.ndarray, n_samples: int) -> np.ndarray:
    """(k, ..., window) per-window outputs -> (..., n_samples), blended with `overlap_weights`."""
    window = windows.shape[-1]
    weights = overlap_weights(starts, window, n_samples)
    out = np.zeros(windows.shape[1:-1] + (n_samples,), dtype=np.float64)
    for values, weight, start in zip(windows, weights, starts, strict=True):
        out[..., start:start + window] += values * weight
    return out
