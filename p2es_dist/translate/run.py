"""PPG of any length and rate -> 12-lead ECG, with any TranslationModel (bundle or checkpoint).

    signal = read_ppg("a103l.hea")                         # translate.io
    ecg_mv, info = translate_signal(loaded, signal, config=TranslateConfig())

Steps: repair short NaN gaps (longer ones are an error naming where they are), resample to 125 Hz
(scipy.signal.resample_poly) and band-pass as ingest does (`data.preprocess.resample`/`bandpass`, the
bundle's band when it states one), cut 1024-sample windows every `hop` samples (translate.stitch),
min-max each window to [-1, 1] (`ppg_to_model_space`), generate in batches, stitch the windows back by
normalised Hann overlap-add, and scale to mV.

Output length: exactly the length of the 125 Hz resampled input, ceil(n * 125 / fs) samples for a rate
that is a simple ratio of 125 Hz (100/250/360/500/1000 Hz...), so the record lasts as long as the input.

Amplitude convention: model space has no absolute scale (each training window was divided by its own
largest |amplitude| over the recorded leads), so the output is NOT calibrated. One model-space unit is
written as `ecg_scale_mv` millivolts: the bundle's `preprocessing.ecg_scale_mv` unless given, else 1.0,
which puts the largest lead's peak near 1 mV, a typical size for an adult 12-lead ECG. The record's
header comments say so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2es_dist.constants import FS, LABELS, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile
from p2es_dist.data.normalize import ppg_to_model_space
from p2es_dist.data.preprocess import PreprocessConfig, bandpass, resample
from p2es_dist.errors import UserError
from p2es_dist.models.base import GenerationOptions, TranslationModel
from p2es_dist.models.checkpoint import LoadedModel
from p2es_dist.translate.io import PPGSignal
from p2es_dist.translate.stitch import cut_windows, overlap_add, window_starts

DEFAULT_ECG_SCALE_MV = 1.0
PNG_SECONDS = 10.0  # the span of a standard 12-lead printout


@dataclass
class TranslateConfig:
    hop: int = WINDOW // 2  # samples between window starts at 125 Hz
    seed: int = 0
    steps: int | None = None  # stochastic models: sampling steps (None: the bundle's, else the model's)
    batch_size: int = 16
    ecg_scale_mv: float | None = None  # mV per model-space unit; None: the bundle's, else 1.0
    age: float | None = None  # None: from the input's header when it states one
    sex: int | None = None  # 0 female, 1 male, -1 unknown; None: from the input's header


def preprocess_config(metadata: dict[str, Any]) -> PreprocessConfig:
    """Ingest's defaults, with the PPG band, filter order and gap limit a bundle states."""
    stated = metadata.get("preprocessing", {})
    config = PreprocessConfig()
    if "ppg_band_hz" in stated:
        config.ppg_band_hz = tuple(float(f) for f in stated["ppg_band_hz"])
    for key in ("filter_order", "max_gap_s"):
        if key in stated:
            setattr(config, key, type(getattr(config, key))(stated[key]))
    return config


def repair_gaps(values: np.ndarray, fs: float, *, max_gap_s: float, source: str) -> np.ndarray:
    """Linear interpolation over NaN runs up to `max_gap_s`; a longer run is a UserError saying where."""
    nan = np.isnan(values)
    if not nan.any():
        return values
    if nan.all():
        raise UserError(f"--input {source}: the PPG has no finite sample")
    edges = np.diff(np.concatenate([[0], nan.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    too_long = (stops - starts) > max_gap_s * fs
    if too_long.any():
        where = ", ".join(f"{a / fs:.2f}-{b / fs:.2f} s" for a, b in zip(starts[too_long][:3], stops[too_long][:3],
                                                                        strict=True))
        more = f" and {int(too_long.sum()) - 3} more" if too_long.sum() > 3 else ""
        raise UserError(f"--input {source}: {int(too_long.sum())} NaN gap(s) in the PPG longer than the "
                        f"{max_gap_s} s interpolation limit, at {where}{more}; cut the record around them")
    index = np.arange(len(values))
    filled = values.copy()
    filled[nan] = np.interp(index[nan], index[~nan], values[~nan])
    return filled


def condition_ppg(signal: PPGSignal, config: PreprocessConfig) -> np.ndarray:
    """Raw PPG -> gap-repaired, 125 Hz, band-passed (n,) float64 signal."""
    filled = repair_gaps(signal.values, signal.fs, max_gap_s=config.max_gap_s, source=signal.source)
    at_rate = resample(filled, signal.fs, FS)
    if len(at_rate) < WINDOW:
        raise UserError(f"--input {signal.source}: {len(signal.values)} samples at {signal.fs:g} Hz "
                        f"({len(signal.values) / signal.fs:.2f} s) are shorter than one window: "
                        f"{WINDOW} samples at {FS} Hz ({WINDOW / FS:.3f} s) are needed")
    return bandpass(at_rate, config.ppg_band_hz, config.filter_order)


def make_batch(ppg_windows: np.ndarray, *, age: float | None, sex: int) -> dict[str, torch.Tensor]:
    """Model-space PPG windows (B, L) -> a Batch (models/base.py) with PPG only and no recorded lead."""
    size, length = ppg_windows.shape
    return {
        "ppg": torch.from_numpy(np.ascontiguousarray(ppg_windows, dtype=np.float32)),
        "ppg_mask": torch.ones(size, dtype=torch.bool),
        "ecg": torch.zeros(size, N_LEADS, length),
        "ecg_mask": torch.zeros(size, N_LEADS, dtype=torch.bool),
        "age": torch.full((size,), float("nan") if age is None else float(age)),
        "sex": torch.full((size,), int(sex), dtype=torch.int64),
        "labels": torch.zeros(size, len(LABELS)),
        "subject": torch.zeros(size, dtype=torch.int64),
    }


def stated_generation(model: TranslationModel, metadata: dict[str, Any]) -> dict[str, Any]:
    """The bundle's generation settings (sampler, steps, n_samples) a stochastic model uses; {} otherwise.

    The bundle's seed is not among them: `--seed` (TranslateConfig.seed) sets it.
    """
    stated = metadata.get("generation") or {}
    return {key: stated[key] for key in ("sampler", "steps", "n_samples") if key in stated} if model.stochastic else {}


def generate_windows(loaded: LoadedModel, ppg_windows: np.ndarray, *, config: TranslateConfig, age: float | None,
                     sex: int, templates: tuple[np.ndarray, np.ndarray] | None = None,
                     upstrokes: np.ndarray | None = None) -> np.ndarray:
    """(k, L) model-space PPG -> (k, 12, L) model-space ECG, `config.batch_size` windows at a time.

    `templates`: the calibration's (k, 12, L) model-space templates and (12,) lead mask, or None.
    `upstrokes`: (k, K) PPG upstrokes per window (`data.batches.upstroke_array`), for models that place
    their training population's beat there when there is no calibration.
    """
    options = GenerationOptions.from_settings(stated_generation(loaded.model, loaded.metadata))
    if config.steps is not None and loaded.model.stochastic:
        options = GenerationOptions(seed=options.seed, sampler=options.sampler, steps=config.steps,
                                    n_samples=options.n_samples)
    outputs = []
    for number, first in enumerate(range(0, len(ppg_windows), config.batch_size)):
        batch = make_batch(ppg_windows[first:first + config.batch_size], age=age, sex=sex)
        if upstrokes is not None:
            batch["upstrokes"] = torch.from_numpy(np.ascontiguousarray(upstrokes[first:first + config.batch_size]))
        if templates is not None:
            chunk = templates[0][first:first + config.batch_size]
            batch["template"] = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
            batch["template_mask"] = torch.from_numpy(np.repeat(templates[1][None], len(chunk), axis=0))
        # One seed per batch: the same input, seed and batch size give the same record.
        generated = loaded.model.generate(batch, options.with_seed(config.seed + number))
        outputs.append(generated.detach().float().cpu().numpy())
    return np.concatenate(outputs)


def ecg_scale(config: TranslateConfig, metadata: dict[str, Any]) -> float:
    if config.ecg_scale_mv is not None:
        return float(config.ecg_scale_mv)
    return float(metadata.get("preprocessing", {}).get("ecg_scale_mv", DEFAULT_ECG_SCALE_MV))


def window_upstrokes(upstrokes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(k, K) upstrokes of the whole conditioned PPG relative to each window, as ingest stores them."""
    import pyarrow as pa

    from p2es_dist.data.batches import upstroke_array

    rows = timing.upstrokes_per_window(upstrokes, starts, WINDOW)
    return upstroke_array(pa.array([row.tolist() for row in rows], pa.list_(pa.int32())))


def calibration_templates(profile: CalibrationProfile, upstrokes: np.ndarray, length: int,
                          starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The profile's template for the whole conditioned PPG (its `upstrokes`, `length` samples), cut into
    model-space windows, and its mask.

    Rendered once over the whole signal, as ingest does, so beats whose pulse lies past a window's end
    still reach into it.
    """
    full, mask = profile.template(upstrokes, length)
    windows = np.stack([full[:, start:start + WINDOW] for start in starts])
    return timing.normalise_template(windows, np.broadcast_to(mask, (len(starts), N_LEADS))), mask


def translate_signal(loaded: LoadedModel, signal: PPGSignal, *, config: TranslateConfig,
                     calibration: CalibrationProfile | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A PPG signal -> ((12, n) ECG in mV at 125 Hz, a summary of how it was made).

    With a `calibration` profile, models that take a template (`use_template`) get the patient's, and
    amplitudes follow the patient's beat (one model unit = the largest |mean beat| over its leads).
    """
    if not isinstance(loaded.model, TranslationModel):
        raise UserError(f"--model {loaded.uri}: model {loaded.name!r} does not translate PPG to ECG "
                        "(expected a teacher, student or baseline)")
    if not 1 <= config.hop <= WINDOW:
        raise UserError(f"--hop: expected 1 to {WINDOW} samples, got {config.hop}")
    ppg = condition_ppg(signal, preprocess_config(loaded.metadata))
    starts = window_starts(len(ppg), WINDOW, config.hop)
    windows = ppg_to_model_space(cut_windows(ppg, starts, WINDOW))
    age = config.age if config.age is not None else signal.age
    sex = config.sex if config.sex is not None else signal.sex
    upstrokes = timing.ppg_upstrokes(ppg)  # once, on the whole signal
    templates = None if calibration is None else calibration_templates(calibration, upstrokes, len(ppg), starts)
    with torch.inference_mode():
        generated = generate_windows(loaded, windows, config=config, age=age, sex=sex, templates=templates,
                                     upstrokes=window_upstrokes(upstrokes, starts))
    scale = ecg_scale(config, loaded.metadata)
    if calibration is not None and config.ecg_scale_mv is None and calibration.units == "mV":
        scale = max(float(np.abs(beat).max()) for beat in calibration.beat.values())
    ecg_mv = overlap_add(generated, starts, len(ppg)) * scale
    info = {**asdict(config), "n_samples": len(ppg), "duration_s": len(ppg) / FS, "n_windows": len(starts),
            "ecg_scale_mv": scale, "input_fs": signal.fs, "channel": signal.channel, "age": age, "sex": sex,
            "generation": stated_generation(loaded.model, loaded.metadata),
            "calibration": None if calibration is None else {
                "pat_s": calibration.pat_s, "leads": sorted(calibration.beat), "source": calibration.source,
                "template_used": bool(getattr(getattr(loaded.model, "config", None), "use_template", False))}}
    return ecg_mv, info


def header_comments(loaded: LoadedModel, signal: PPGSignal, info: dict[str, Any]) -> list[str]:
    from p2es_dist import __version__

    sex = {0: "F", 1: "M"}.get(info["sex"])
    return [
        f"Generated by p2es translate {__version__} from PPG: a model output, not a recording",
        f"Input: {Path(signal.source).name} channel {signal.channel} at {signal.fs:g} Hz, "
        f"{len(signal.values)} samples",
        f"Model: {loaded.name} ({loaded.kind}, weights sha256 {loaded.digest[:16]})",
        (f"Calibration: {info['calibration']['source']}, PAT {info['calibration']['pat_s'] * 1000:.0f} ms; 1 model "
         f"unit written as {info['ecg_scale_mv']:g} mV, the calibration beat's peak"
         if info.get("calibration") else
         f"Amplitude: NOT calibrated; model space has no absolute scale, 1 model unit written as "
         f"{info['ecg_scale_mv']:g} mV by convention"),
        f"Windows: {WINDOW} samples at {FS} Hz, hop {info['hop']}, Hann overlap-add; seed {info['seed']}",
        *([f"Age: {info['age']:g}"] if info["age"] is not None else []),
        *([f"Sex: {sex}"] if sex else []),
    ]


def plot_png(path: str | Path, ecg_mv: np.ndarray, *, title: str, start_s: float = 0.0,
             recorded: dict[str, np.ndarray] | None = None) -> Path:
    """10 s from `start_s` as a 12-lead printout (evaluate.figures.plot_twelve_lead); leads the input
    also recorded (`recorded`: lead -> 125 Hz signal) are drawn under the generated ones."""
    try:
        from p2es_dist.evaluate.figures import plot_twelve_lead
    except ImportError as exc:
        raise UserError(f"--png: plotting is not available in this installation ({exc})") from None
    first = min(int(round(start_s * FS)), max(0, ecg_mv.shape[1] - int(PNG_SECONDS * FS)))
    span = slice(first, first + int(PNG_SECONDS * FS))
    traces = {"generated": ecg_mv[:, span]}
    if recorded:
        from p2es_dist.constants import LEAD_INDEX

        reference = np.zeros_like(ecg_mv[:, span])
        mask = np.zeros(N_LEADS, dtype=bool)
        for lead, values in recorded.items():
            part = values[span]
            reference[LEAD_INDEX[lead], : len(part)] = part
            mask[LEAD_INDEX[lead]] = True
        traces = {"recorded": reference, "generated": ecg_mv[:, span]}
        return Path(plot_twelve_lead(path, traces=traces, fs=float(FS), lead_mask=mask,
                                     title=f"{title}, {first / FS:.0f}-{first / FS + PNG_SECONDS:.0f} s"))
    return Path(plot_twelve_lead(path, traces=traces, fs=float(FS),
                                 title=f"{title}, {first / FS:.0f}-{first / FS + PNG_SECONDS:.0f} s"))


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


def recorded_agreement(recorded: tuple[dict, dict] | None, ecg_mv: np.ndarray, *, from_s: float | None) -> dict | None:
    """When the input also records lead II: Pearson of the generated lead II with it, per 1024-sample window
    (hop 512), from `from_s` (the end of the calibration segment when it came from this file) on."""
    from p2es_dist.evaluate.metrics import as_number, nanmean, pointwise_errors

    if recorded is None or "II" not in recorded[0]:
        return None
    recorded_ii, ok = recorded[0]["II"], recorded[1]["II"]
    same_file = from_s is not None
    first = int(round(from_s * FS)) if same_file else 0
    n = min(len(recorded_ii), ecg_mv.shape[1])
    starts = [s for s in range(first, n - WINDOW + 1, WINDOW // 2) if ok[s:s + WINDOW].all()]
    if not starts:
        return None
    target = np.stack([recorded_ii[s:s + WINDOW] for s in starts])[:, None]
    generated = np.stack([ecg_mv[1, s:s + WINDOW] for s in starts])[:, None]
    errors = pointwise_errors(target, generated, np.ones((len(starts), 1), dtype=bool))
    return {"lead": "II", "n_windows": len(starts), "from_s": first / FS,
            "scored": "after the calibration segment" if same_file else "the whole record",
            # None where the generated lead is flat (Pearson undefined in every window).
            "pearson": as_number(nanmean(errors["pearson"].reshape(1, -1), axis=1)[0]),
            "pearson_lag": as_number(nanmean(errors["pearson_lag"].reshape(1, -1), axis=1)[0])}


def translate_file(*, model: str, input: str, out: str, column: str | None = None, fs: float | None = None,
                   png: str | None = None, config: TranslateConfig | None = None,
                   calibration: str | None = None, score_from_s: float | None = None) -> dict[str, Any]:
    """`p2es translate` as a function: reads `input`, writes `out`.hea/.dat (and `png`); returns a summary.

    `calibration`: a profile written by `p2es calibrate` (data/calibration.py). When the input also
    records lead II, the summary's `recorded` scores the generated lead II against it from `score_from_s`
    (default: the end of the calibration segment when the profile came from this file, else 0)."""
    from p2es_dist.models.checkpoint import load_model
    from p2es_dist.translate.io import read_ppg, write_ecg_record

    config = config or TranslateConfig()
    signal = read_ppg(input, column=column, fs=fs)
    loaded = load_model(model)
    profile = None if calibration is None else CalibrationProfile.load(calibration)
    ecg_mv, info = translate_signal(loaded, signal, config=config, calibration=profile)
    files = write_ecg_record(out, ecg_mv, fs=FS, comments=header_comments(loaded, signal, info))
    calibrated = info["calibration"] is not None
    recorded = recorded_leads(input)
    end_s = calibration_end_s(profile, input) if score_from_s is None else score_from_s
    summary = {"record": str(out), "files": [str(f) for f in files], "fs": FS, "leads": N_LEADS,
               "units": "mV (scaled to the calibration beat)" if calibrated else
               "mV (uncalibrated, see the header comments)", "model": loaded.name, **info,
               "recorded": recorded_agreement(recorded, ecg_mv, from_s=end_s)}
    if png:
        label = f"calibrated, PAT {profile.pat_s * 1000:.0f} ms" if calibrated else "uncalibrated"
        summary["png"] = str(plot_png(png, ecg_mv, title=f"{Path(input).name} -> {loaded.name} ({label})",
                                      start_s=end_s or 0.0, recorded=None if recorded is None else recorded[0]))
    return summary
