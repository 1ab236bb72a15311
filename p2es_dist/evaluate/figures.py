"""Figures for the evaluation report (matplotlib, Agg backend, PNG).

`plot_twelve_lead` is shared (contracts section 1): `p2es translate` uses it for its optional PNG.
All ECG traces are in mV (model space times the batch `scale`), drawn on ECG-paper style grids
(0.2 s / 0.5 mV major, 0.04 s / 0.1 mV minor) so they read like a printed 12-lead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from p2es_dist.constants import FS, LEAD_INDEX, LEADS  # noqa: E402

# Standard printed layout: 3 rows x 4 columns, each column 2.5 s of its own lead group.
_LAYOUT: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
_PANEL_S = 2.5
_TRACE_COLOURS = ("black", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan",
                  "tab:olive", "tab:pink")  # recorded first; a baseline per colour up to nine
_PAPER_MAJOR, _PAPER_MINOR = "#f4a6a6", "#fbe0e0"
_LABEL_BOX = {"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.0}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return out


def _paper(ax: plt.Axes, *, t_max: float, y_lo: float, y_hi: float) -> None:
    # Grid lines as two LineCollections, not tick grids: hundreds of tick artists make a 12-lead plot slow.
    for step_t, step_y, colour, width in ((0.04, 0.1, _PAPER_MINOR, 0.3), (0.2, 0.5, _PAPER_MAJOR, 0.6)):
        xs = np.arange(0.0, t_max + 1e-9, step_t)
        ys = np.arange(np.floor(y_lo / step_y) * step_y, y_hi + 1e-9, step_y)
        segments = [((x, y_lo), (x, y_hi)) for x in xs] + [((0.0, y), (t_max, y)) for y in ys]
        ax.add_collection(LineCollection(segments, colors=colour, linewidths=width, zorder=0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(0.0, t_max)
    ax.set_ylim(y_lo, y_hi)


def _y_range(traces: dict[str, np.ndarray], rows: Sequence[int], lo: int, hi: int) -> tuple[float, float]:
    values = np.concatenate([np.asarray(x)[list(rows), lo:hi].ravel() for x in traces.values()])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return -1.0, 1.0
    y_lo, y_hi = float(values.min()), float(values.max())
    pad = max(0.1, 0.1 * (y_hi - y_lo))
    return y_lo - pad, y_hi + pad


def plot_twelve_lead(
    path: str | Path,
    *,
    traces: dict[str, np.ndarray],
    fs: float = float(FS),
    title: str = "",
    lead_mask: Sequence[bool] | np.ndarray | None = None,
) -> Path:
    """Draw one or more 12-lead ECGs (label -> (12, N) in mV) overlaid in the standard 3x4 + rhythm-II layout.

    Each of the 12 panels shows 2.5 s of its lead (column c shows seconds [2.5c, 2.5c + 2.5)), the bottom
    strip shows lead II over the whole window. Leads where `lead_mask` is False are marked "not recorded"
    and drawn only for traces other than the first (e.g. a generated lead without a recorded reference).
    """
    if not traces:
        raise ValueError("plot_twelve_lead needs at least one trace")
    arrays = {label: np.asarray(x, dtype=np.float64) for label, x in traces.items()}
    n = next(iter(arrays.values())).shape[-1]
    for label, x in arrays.items():
        if x.shape != (len(LEADS), n):
            raise ValueError(f"trace {label!r} has shape {x.shape}, expected ({len(LEADS)}, {n})")
    mask = np.ones(len(LEADS), dtype=bool) if lead_mask is None else np.asarray(lead_mask, dtype=bool)
    panel = min(n, int(round(_PANEL_S * fs)))
    first_label = next(iter(arrays))

    fig = plt.figure(figsize=(16, 10), dpi=100)
    grid = fig.add_gridspec(4, 4, hspace=0.08, wspace=0.03)
    for r, row in enumerate(_LAYOUT):
        for c, lead in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            idx = LEAD_INDEX[lead]
            lo = min(c * panel, max(0, n - panel))
            hi = lo + panel
            y_lo, y_hi = _y_range(arrays, [idx], lo, hi)
            _paper(ax, t_max=panel / fs, y_lo=y_lo, y_hi=y_hi)
            t = np.arange(hi - lo) / fs
            for k, (label, x) in enumerate(arrays.items()):
                if label == first_label and not mask[idx]:
                    continue
                ax.plot(t, x[idx, lo:hi], color=_TRACE_COLOURS[k % len(_TRACE_COLOURS)], linewidth=0.9)
            name = lead if mask[idx] else f"{lead} (not recorded)"
            ax.text(0.02, 0.86, name, transform=ax.transAxes, fontsize=11, fontweight="bold", bbox=_LABEL_BOX)
    rhythm = fig.add_subplot(grid[3, :])
    ii = LEAD_INDEX["II"]
    y_lo, y_hi = _y_range(arrays, [ii], 0, n)
    _paper(rhythm, t_max=n / fs, y_lo=y_lo, y_hi=y_hi)
    t = np.arange(n) / fs
    for k, (label, x) in enumerate(arrays.items()):
        if label == first_label and not mask[ii]:
            continue
        rhythm.plot(t, x[ii], color=_TRACE_COLOURS[k % len(_TRACE_COLOURS)], linewidth=0.9, label=label)
    rhythm.text(0.005, 0.86, "II (rhythm)", transform=rhythm.transAxes, fontsize=11, fontweight="bold",
                bbox=_LABEL_BOX)
    rhythm.legend(loc="lower right", fontsize=10)
    fig.suptitle(f"{title}  (grid: 0.2 s x 0.5 mV, {fs:g} Hz)" if title else f"grid: 0.2 s x 0.5 mV, {fs:g} Hz")
    return _save(fig, path)


def _error_bar(point: float | None, interval: Sequence[float | None]) -> tuple[float, float, float]:
    """(value, lower error, upper error) for matplotlib; NaN where unknown."""
    value = np.nan if point is None else float(point)
    low, high = (np.nan if v is None else float(v) for v in interval)
    below = max(value - low, 0.0) if np.isfinite(low) and np.isfinite(value) else 0.0
    above = max(high - value, 0.0) if np.isfinite(high) and np.isfinite(value) else 0.0
    return value, below, above


def plot_per_lead(path: str | Path, *, sections: dict[str, dict], space: str = "window",
                  metrics: Sequence[str] = ("mse", "pearson")) -> Path:
    """Per-lead bars with 95 % subject-bootstrap intervals, one group per lead, one bar per model."""
    leads = [lead for lead in LEADS if any(lead in s["spaces"][space]["leads"] for s in sections.values())]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 1.2 * len(leads) + 3), 3.2 * len(metrics)),
                             squeeze=False)
    width = 0.8 / max(1, len(sections))
    x = np.arange(len(leads))
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        for k, (name, section) in enumerate(sections.items()):
            rows = [section["spaces"][space]["leads"].get(lead) for lead in leads]
            bars = [_error_bar(r[metric], r["ci95"][metric]) if r else (np.nan, 0.0, 0.0) for r in rows]
            values = [b[0] for b in bars]
            errors = np.array([[b[1] for b in bars], [b[2] for b in bars]])
            ax.bar(x + (k - (len(sections) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=name,
                   color=_TRACE_COLOURS[(k + 1) % len(_TRACE_COLOURS)])
        ax.set_xticks(x, leads)
        ax.set_ylabel(f"{metric} ({space} space)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=9)
    axes[0, 0].set_title("Per-lead error, mean over windows, 95 % CI (bootstrap over subjects)")
    return _save(fig, path)


def plot_models(path: str | Path, *, sections: dict[str, dict], space: str = "window",
                metrics: Sequence[str] = ("mse", "mae", "rrmse", "pearson", "dtw")) -> Path:
    """Overall metrics of the model and each baseline side by side, with 95 % intervals."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.6), squeeze=False)
    names = list(sections)
    for ax, metric in zip(axes[0], metrics, strict=True):
        bars = [_error_bar(s["spaces"][space]["overall"][metric], s["spaces"][space]["overall"]["ci95"][metric])
                for s in sections.values()]
        ax.bar(np.arange(len(names)), [b[0] for b in bars],
               yerr=np.array([[b[1] for b in bars], [b[2] for b in bars]]), capsize=4,
               color=[_TRACE_COLOURS[(k + 1) % len(_TRACE_COLOURS)] for k in range(len(names))])
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Model vs baselines, overall ({space} space), same windows, 95 % CI")
    fig.tight_layout()
    return _save(fig, path)


def plot_bland_altman(path: str | Path, *, recorded_bpm: np.ndarray, generated: dict[str, np.ndarray]) -> Path:
    """Bland-Altman of heart rate: mean of the two vs generated - recorded, bias and 95 % limits of agreement."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for k, (name, bpm) in enumerate(generated.items()):
        both = np.isfinite(recorded_bpm) & np.isfinite(bpm)
        colour = _TRACE_COLOURS[(k + 1) % len(_TRACE_COLOURS)]
        if not both.any():
            ax.plot([], [], "o", color=colour, label=f"{name}: no window with enough peaks in both")
            continue
        mean, diff = (recorded_bpm[both] + bpm[both]) / 2, bpm[both] - recorded_bpm[both]
        bias, spread = float(diff.mean()), 1.96 * float(diff.std(ddof=1)) if both.sum() > 1 else 0.0
        ax.scatter(mean, diff, s=12, alpha=0.6, color=colour,
                   label=f"{name}: bias {bias:+.1f}, LoA ±{spread:.1f} bpm (n={int(both.sum())})")
        ax.axhline(bias, color=colour, linewidth=1)
        for limit in (bias - spread, bias + spread):
            ax.axhline(limit, color=colour, linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("mean of recorded and generated heart rate (bpm)")
    ax.set_ylabel("generated - recorded (bpm)")
    ax.set_title("Heart rate from lead II R-peaks: Bland-Altman")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rhythm_strips(path: str | Path, *, traces: dict[str, np.ndarray], fs: float = float(FS),
                       title: str = "", lead: str = "II") -> Path:
    """One lead of several ECGs (label -> (n,) in mV), one strip each on ECG paper, sharing the time axis.

    `p2es quickstart` uses it to put the recorded, zero-shot and calibrated lead II of one record side
    by side: each strip has its own amplitude range, so a flat output is seen as flat, not as a line.
    """
    if not traces:
        raise ValueError("plot_rhythm_strips needs at least one trace")
    fig, axes = plt.subplots(len(traces), 1, figsize=(16, 2.2 * len(traces)), dpi=100, squeeze=False)
    for ax, (colour, (label, values)) in zip(axes[:, 0], zip(_TRACE_COLOURS, traces.items(), strict=False),
                                              strict=False):
        values = np.asarray(values, dtype=np.float64)
        t = np.arange(len(values)) / fs
        finite = values[np.isfinite(values)]
        y_lo, y_hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
        pad = max(0.1, 0.1 * (y_hi - y_lo))
        _paper(ax, t_max=len(values) / fs, y_lo=y_lo - pad, y_hi=y_hi + pad)
        ax.plot(t, values, color=colour, linewidth=0.9)
        ax.text(0.005, 0.95, f"{lead}: {label}", transform=ax.transAxes, va="top", fontsize=10, bbox=_LABEL_BOX)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)
