"""The input's own ECG beside the generated one: the 10 s printout (with recorded leads under the
generated ones) and lead II agreement, scored after the calibration segment when the profile came from
this same file (`translate.run.translate_file` uses them; `p2es quickstart` too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2es_dist.constants import FS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.data.calibration import CalibrationProfile
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.errors import UserError

PNG_SECONDS = 10.0  # the span of a standard 12-lead printout


def png_span(start_s: float, n_samples: int) -> slice:
    """The 10 s a printout shows: from `start_s`, moved back to fit a record of `n_samples`."""
    first = min(int(round(start_s * FS)), max(0, n_samples - int(PNG_SECONDS * FS)))
    return slice(first, first + int(PNG_SECONDS * FS))


def plot_png(path: str | Path, piece: np.ndarray, *, span: slice, title: str,
             recorded: dict[str, np.ndarray] | None = None) -> Path:
    """The generated (12, m) `piece` at `span` (`png_span`) as a 12-lead printout
    (evaluate.figures.plot_twelve_lead); leads the input also recorded (`recorded`: lead -> 125 Hz
    signal) are drawn under the generated ones."""
    try:
        from p2es_dist.evaluate.figures import plot_twelve_lead
    except ImportError as exc:
        raise UserError(f"--png: plotting is not available in this installation ({exc})") from None
    title = f"{title}, {span.start / FS:.0f}-{span.start / FS + PNG_SECONDS:.0f} s"
    if not recorded:
        return Path(plot_twelve_lead(path, traces={"generated": piece}, fs=float(FS), title=title))
    reference = np.zeros_like(piece)
    mask = np.zeros(N_LEADS, dtype=bool)
    for lead, values in recorded.items():
        part = values[span]
        reference[LEAD_INDEX[lead], : len(part)] = part
        mask[LEAD_INDEX[lead]] = True
    return Path(plot_twelve_lead(path, traces={"recorded": reference, "generated": piece}, fs=float(FS),
                                 lead_mask=mask, title=title))


def recorded_leads(input: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """The ECG leads the input records too, preprocessed as ingest does (125 Hz), with validity; or None."""
    from p2es_dist.translate.calibrate import conditioned, read_paired

    try:
        paired = read_paired(input)
    except UserError:
        return None
    leads, valid, _, _ = conditioned(paired, PreprocessConfig())
    return leads, valid


def calibration_end_s(calibration: CalibrationProfile | None, input: str) -> float | None:
    """Where the calibration segment ends when the profile was measured on this same input file."""
    if calibration is None or not calibration.source:
        return None
    if Path(calibration.source).resolve() != Path(input).resolve():
        return None
    return float(calibration.extra.get("end_s", calibration.seconds))


def recorded_agreement(recorded: tuple[dict, dict] | None, generated_ii: np.ndarray, *,
                       from_s: float | None) -> dict | None:
    """When the input also records lead II: Pearson of the generated lead II (`generated_ii`, 125 Hz) with
    it, per 1024-sample window (hop 512), from `from_s` (the end of the calibration segment when it came
    from this file) on."""
    from p2es_dist.evaluate.metrics import as_number, nanmean, pointwise_errors

    if recorded is None or "II" not in recorded[0]:
        return None
    recorded_ii, ok = recorded[0]["II"], recorded[1]["II"]
    same_file = from_s is not None
    first = int(round(from_s * FS)) if same_file else 0
    n = min(len(recorded_ii), len(generated_ii))
    starts = [s for s in range(first, n - WINDOW + 1, WINDOW // 2) if ok[s:s + WINDOW].all()]
    if not starts:
        return None
    target = np.stack([recorded_ii[s:s + WINDOW] for s in starts])[:, None]
    generated = np.stack([generated_ii[s:s + WINDOW] for s in starts])[:, None]
    errors = pointwise_errors(target, generated, np.ones((len(starts), 1), dtype=bool))
    return {"lead": "II", "n_windows": len(starts), "from_s": first / FS,
            "scored": "after the calibration segment" if same_file else "the whole record",
            # None where the generated lead is flat (Pearson undefined in every window).
            "pearson": as_number(nanmean(errors["pearson"].reshape(1, -1), axis=1)[0]),
            "pearson_lag": as_number(nanmean(errors["pearson_lag"].reshape(1, -1), axis=1)[0])}
