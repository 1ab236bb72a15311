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

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2es_dist.constants import FS, LABELS, N_LEADS, WINDOW
from p2es_dist.data.normalize import ppg_to_model_space
from p2es_dist.data.preprocess import PreprocessConfig, bandpass, resample
from p2es_dist.errors import UserError
from p2es_dist.export.loading import LoadedModel
from p2es_dist.translate.io import PPGSignal
from p2es_dist.translate.stitch import cut_windows, overlap_add, window_starts

DEFAULT_ECG_SCALE_MV = 1.0
PNG_SECONDS = 10.0  # the span of a standard 12-lead printout


@dataclass
class TranslateConfig:
    hop: int = WINDOW // 2  # samples between window starts at 125 Hz
    seed: int = 0
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


def generation_kwargs(model: torch.nn.Module, metadata: dict[str, Any]) -> dict[str, Any]:
    """The bundle's generation settings (sampler, steps, n_samples) that this model's generate takes."""
    accepted = inspect.signature(model.generate).parameters
    stated = metadata.get("generation") or {}
    return {key: stated[key] for key in ("sampler", "steps", "n_samples") if key in stated and key in accepted}


def generate_windows(loaded: LoadedModel, ppg_windows: np.ndarray, *, config: TranslateConfig, age: float | None,
                     sex: int) -> np.ndarray:
    """(k, L) model-space PPG -> (k, 12, L) model-space ECG, `config.batch_size` windows at a time."""
    extra = generation_kwargs(loaded.model, loaded.metadata)
    outputs = []
    for number, first in enumerate(range(0, len(ppg_windows), config.batch_size)):
        batch = make_batch(ppg_windows[first:first + config.batch_size], age=age, sex=sex)
        # One seed per batch: the same input, seed and batch size give the same record.
        generated = loaded.model.generate(batch, seed=config.seed + number, **extra)
        outputs.append(generated.detach().float().cpu().numpy())
    return np.concatenate(outputs)


def ecg_scale(config: TranslateConfig, metadata: dict[str, Any]) -> float:
    if config.ecg_scale_mv is not None:
        return float(config.ecg_scale_mv)
    return float(metadata.get("preprocessing", {}).get("ecg_scale_mv", DEFAULT_ECG_SCALE_MV))


def translate_signal(loaded: LoadedModel, signal: PPGSignal, *,
                     config: TranslateConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """A PPG signal -> ((12, n) ECG in mV at 125 Hz, a summary of how it was made)."""
    from p2es_dist.models.base import TranslationModel

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
    with torch.inference_mode():
        generated = generate_windows(loaded, windows, config=config, age=age, sex=sex)
    scale = ecg_scale(config, loaded.metadata)
    ecg_mv = overlap_add(generated, starts, len(ppg)) * scale
    info = {**asdict(config), "n_samples": len(ppg), "duration_s": len(ppg) / FS, "n_windows": len(starts),
            "ecg_scale_mv": scale, "input_fs": signal.fs, "channel": signal.channel, "age": age, "sex": sex,
            "generation": generation_kwargs(loaded.model, loaded.metadata)}
    return ecg_mv, info


def header_comments(loaded: LoadedModel, signal: PPGSignal, info: dict[str, Any]) -> list[str]:
    from p2es_dist import __version__

    sex = {0: "F", 1: "M"}.get(info["sex"])
    return [
        f"Generated by p2es translate {__version__} from PPG: a model output, not a recording",
        f"Input: {Path(signal.source).name} channel {signal.channel} at {signal.fs:g} Hz, "
        f"{len(signal.values)} samples",
        f"Model: {loaded.name} ({loaded.kind}, weights sha256 {loaded.digest[:16]})",
        f"Amplitude: NOT calibrated; model space has no absolute scale, 1 model unit written as "
        f"{info['ecg_scale_mv']:g} mV by convention",
        f"Windows: {WINDOW} samples at {FS} Hz, hop {info['hop']}, Hann overlap-add; seed {info['seed']}",
        *([f"Age: {info['age']:g}"] if info["age"] is not None else []),
        *([f"Sex: {sex}"] if sex else []),
    ]


def plot_png(path: str | Path, ecg_mv: np.ndarray, *, title: str) -> Path:
    """The first 10 s as a 12-lead printout (evaluate.figures.plot_twelve_lead)."""
    try:
        from p2es_dist.evaluate.figures import plot_twelve_lead
    except ImportError as exc:
        raise UserError(f"--png: plotting is not available in this installation ({exc})") from None
    span = ecg_mv[:, : int(PNG_SECONDS * FS)]
    return Path(plot_twelve_lead(path, traces={"generated": span}, fs=float(FS), title=title))


def translate_file(*, model: str, input: str, out: str, column: str | None = None, fs: float | None = None,
                   png: str | None = None, config: TranslateConfig | None = None) -> dict[str, Any]:
    """`p2es translate` as a function: reads `input`, writes `out`.hea/.dat (and `png`); returns a summary."""
    from p2es_dist.export.loading import load_model
    from p2es_dist.translate.io import read_ppg, write_ecg_record

    config = config or TranslateConfig()
    signal = read_ppg(input, column=column, fs=fs)
    loaded = load_model(model)
    ecg_mv, info = translate_signal(loaded, signal, config=config)
    files = write_ecg_record(out, ecg_mv, fs=FS, comments=header_comments(loaded, signal, info))
    summary = {"record": str(out), "files": [str(f) for f in files], "fs": FS, "leads": N_LEADS,
               "units": "mV (uncalibrated, see the header comments)", "model": loaded.name, **info}
    if png:
        summary["png"] = str(plot_png(png, ecg_mv, title=f"{Path(input).name} -> {loaded.name} (uncalibrated)"))
    return summary
