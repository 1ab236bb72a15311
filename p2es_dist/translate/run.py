"""PPG of any length and rate -> 12-lead ECG, with any TranslationModel (bundle or checkpoint).

    signal = read_ppg("a103l.hea")                         # translate.io
    ecg_mv, info = translate_signal(loaded, signal, config=TranslateConfig())

Steps (translate.stream runs them chunk by chunk, in memory bounded whatever the input's length): repair
short non-finite gaps (longer ones, and a flat PPG, are an error naming where they are), resample to
125 Hz (scipy.signal.resample_poly) and band-pass as ingest does (`data.preprocess.resample`/`bandpass`,
the bundle's band when it states one), cut 1024-sample windows every `hop` samples (translate.stitch),
min-max each window to [-1, 1] (`ppg_to_model_space`), generate in batches, stitch the windows back by
normalised Hann overlap-add, and scale to mV. `translate_file` writes the record as it goes
(`io.EcgRecordWriter`); `translate_signal` returns it in memory.

Output length: exactly the length of the 125 Hz resampled input, ceil(n * 125 / fs) samples for a rate
that is a simple ratio of 125 Hz (100/250/360/500/1000 Hz...), so the record lasts as long as the input.

Amplitude convention: model space has no absolute scale (each training window was divided by its own
largest |amplitude| over the recorded leads), so the output is NOT calibrated. One model-space unit is
written as `ecg_scale_mv` millivolts: the bundle's `preprocessing.ecg_scale_mv` unless given, else 1.0,
which puts the largest lead's peak near 1 mV, a typical size for an adult 12-lead ECG. The record's
header comments say so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2es_dist.constants import FS, LABELS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.data.splits import subject_hash
from p2es_dist.errors import UserError
from p2es_dist.models.base import GenerationOptions, TranslationModel
from p2es_dist.models.checkpoint import LoadedModel
from p2es_dist.translate.io import PPGSignal, PPGStream, check_fs
from p2es_dist.translate.recorded import calibration_end_s, plot_png, png_span, recorded_agreement, recorded_leads
from p2es_dist.translate.stitch import window_starts
from p2es_dist.translate.stream import StreamConfig, condition, find_upstrokes, repair_gaps, stitched

__all__ = ["TranslateConfig", "repair_gaps", "translate_file", "translate_signal"]

DEFAULT_ECG_SCALE_MV = 1.0


@dataclass
class TranslateConfig:
    hop: int = WINDOW // 2  # samples between window starts at 125 Hz
    seed: int = 0
    steps: int | None = None  # stochastic models: sampling steps (None: the bundle's, else the model's)
    batch_size: int = 16
    ecg_scale_mv: float | None = None  # mV per model-space unit; None: the bundle's, else 1.0
    age: float | None = None  # None: from the input's header when it states one
    sex: int | None = None  # 0 female, 1 male, -1 unknown; None: from the input's header
    # Without a calibration: the training source whose population template (PAT, beat) to use, e.g.
    # "bidmc" for a fingertip PPG like BIDMC's; None: all training records pooled (`population_sources`).
    population: str | None = None


def population_sources(model: TranslationModel) -> list[str]:
    """The training sources a template model has its own zero-shot population for (`--population`)."""
    config = getattr(model, "config", None)
    population = getattr(config, "population", None) or {}
    return sorted(population.get("by_source") or {})


def check_population(model: TranslationModel, name: str | None) -> None:
    if name is None:
        return
    sources = population_sources(model)
    if name not in sources:
        raise UserError(f"--population {name}: the model has a zero-shot population for "
                        f"{', '.join(sources) if sources else 'no source (it takes no template, or predates them)'}")


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
                     upstrokes: np.ndarray | None = None, first_batch: int = 0,
                     leads: tuple[np.ndarray, np.ndarray] | None = None,
                     ppg_present: np.ndarray | None = None) -> np.ndarray:
    """(k, L) model-space PPG -> (k, 12, L) model-space ECG, `config.batch_size` windows at a time.

    `templates`: the calibration's (k, 12, L) model-space templates and (12,) lead mask, or None.
    `upstrokes`: (k, K) PPG upstrokes per window (`data.batches.upstroke_array`), for models that place
    their training population's beat there when there is no calibration.
    `first_batch`: the number of the first batch in the whole signal (its seed), when these windows are
    one group of a longer signal's.
    `leads`: (k, 12, L) model-space ECG and (k, 12) bool leads given as input (`cond_leads`), or None.
    `ppg_present`: (k,) bool windows that have PPG (default: all).
    """
    options = GenerationOptions.from_settings(stated_generation(loaded.model, loaded.metadata))
    if config.steps is not None and loaded.model.stochastic:
        options = GenerationOptions(seed=options.seed, sampler=options.sampler, steps=config.steps,
                                    n_samples=options.n_samples)
    outputs = []
    for number, first in enumerate(range(0, len(ppg_windows), config.batch_size)):
        batch = make_batch(ppg_windows[first:first + config.batch_size], age=age, sex=sex)
        if ppg_present is not None:
            batch["ppg_mask"] = torch.from_numpy(np.array(ppg_present[first:first + config.batch_size], dtype=bool))
        if leads is not None:
            given = np.array(leads[1][first:first + config.batch_size], dtype=bool)
            batch["ecg"] = torch.from_numpy(np.array(leads[0][first:first + config.batch_size], dtype=np.float32))
            batch["ecg_mask"] = torch.from_numpy(given)
            batch["cond_leads"] = torch.from_numpy(given.copy())
        if upstrokes is not None:
            batch["upstrokes"] = torch.from_numpy(np.ascontiguousarray(upstrokes[first:first + config.batch_size]))
        if config.population is not None:
            batch["source"] = torch.full((len(batch["ppg"]),), subject_hash(config.population), dtype=torch.int64)
        if templates is not None:
            chunk = templates[0][first:first + config.batch_size]
            batch["template"] = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
            batch["template_mask"] = torch.from_numpy(np.repeat(templates[1][None], len(chunk), axis=0))
        # One seed per batch: the same input, seed and batch size give the same record.
        generated = loaded.model.generate(batch, options.with_seed(config.seed + first_batch + number))
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


def calibration_templates(profile: CalibrationProfile, upstrokes: np.ndarray,
                          starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The profile's template for windows at `starts` of a signal with these `upstrokes`, as model-space
    windows, and its mask.

    Rendered over the windows' whole span with every upstroke that can place a beat in it
    (`timing.upstroke_margin`), as ingest renders it over the whole signal: beats whose pulse lies past a
    window's end still reach into it, and the span's samples equal the whole signal's.
    """
    first, stop = int(starts[0]), int(starts[-1]) + WINDOW
    before, after = timing.upstroke_margin()
    near = upstrokes[(upstrokes >= first - before) & (upstrokes < stop + after)] - first
    span, mask = profile.template(near, stop - first)
    windows = np.stack([span[:, start - first:start - first + WINDOW] for start in starts])
    return timing.normalise_template(windows, np.broadcast_to(mask, (len(starts), N_LEADS))), mask


def amplitude_scale(config: TranslateConfig, metadata: dict[str, Any], calibration: CalibrationProfile | None) -> float:
    """mV per model unit: the calibration beat's peak when calibrated in mV, else `ecg_scale`."""
    if calibration is not None and config.ecg_scale_mv is None and calibration.units == "mV":
        return max(float(np.abs(beat).max()) for beat in calibration.beat.values())
    return ecg_scale(config, metadata)


def translate_stream(loaded: LoadedModel, signal: PPGSignal | PPGStream, *, config: TranslateConfig,
                     write: Callable[[np.ndarray], None], scratch: str | Path,
                     calibration: CalibrationProfile | None = None,
                     stream: StreamConfig | None = None) -> dict[str, Any]:
    """A PPG input -> (12, m) blocks of ECG in mV at 125 Hz handed to `write` in order; a summary.

    `scratch`: a folder for the conditioned PPG (8 bytes per 125 Hz sample). With a `calibration`
    profile, models that take a template (`use_template`) get the patient's, and amplitudes follow the
    patient's beat (one model unit = the largest |mean beat| over its leads).
    """
    if not isinstance(loaded.model, TranslationModel):
        raise UserError(f"--model {loaded.uri}: model {loaded.name!r} does not translate PPG to ECG "
                        "(expected a teacher, student or baseline)")
    if not 1 <= config.hop <= WINDOW:
        raise UserError(f"--hop: expected 1 to {WINDOW} samples, got {config.hop}")
    check_fs(signal.fs, what=f"--input {signal.source}: its rate")
    stream = stream or StreamConfig()
    preprocess = preprocess_config(loaded.metadata)
    conditioned = condition(signal, preprocess, Path(scratch) / "ppg.f64", stream)
    upstrokes = find_upstrokes(conditioned, stream)
    starts = window_starts(conditioned.n, WINDOW, config.hop)
    age = config.age if config.age is not None else signal.age
    sex = config.sex if config.sex is not None else signal.sex
    scale = amplitude_scale(config, loaded.metadata, calibration)

    def generate(windows: np.ndarray, these: np.ndarray, first: int) -> np.ndarray:
        templates = None if calibration is None else calibration_templates(calibration, upstrokes, these)
        return generate_windows(loaded, windows, config=config, age=age, sex=sex, templates=templates,
                                upstrokes=window_upstrokes(upstrokes, these), first_batch=first // config.batch_size)

    # Whole batches per group, so each batch (and its seed) is the one the whole signal would have.
    group = config.batch_size * max(1, stream.group_windows // config.batch_size)
    with torch.inference_mode():
        for block in stitched(conditioned, starts, generate, group=group):
            write(block * scale)
    scan = conditioned.artefacts
    return {**asdict(config), "n_samples": conditioned.n, "duration_s": conditioned.n / FS, "n_windows": len(starts),
            "ecg_scale_mv": scale, "input_fs": signal.fs, "input_samples": scan.n, "channel": signal.channel,
            "age": age, "sex": sex, "repaired_samples": scan.repaired, "repaired_gaps": scan.repaired_gaps,
            "max_gap_s": preprocess.max_gap_s, "flat_line_s": preprocess.flat_s,
            "flat_runs_s": [[round(a, 3), round(b, 3)] for a, b in scan.flat_seconds()],
            "generation": stated_generation(loaded.model, loaded.metadata),
            "calibration": None if calibration is None else {
                "pat_s": calibration.pat_s, "leads": sorted(calibration.beat), "source": calibration.source,
                "template_used": bool(getattr(getattr(loaded.model, "config", None), "use_template", False))}}


def translate_signal(loaded: LoadedModel, signal: PPGSignal | PPGStream, *, config: TranslateConfig,
                     calibration: CalibrationProfile | None = None,
                     stream: StreamConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A PPG signal -> ((12, n) ECG in mV at 125 Hz, a summary of how it was made), in memory
    (`translate_stream`; `translate_file` writes long inputs without holding them)."""
    blocks: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="p2es-translate-") as scratch:
        info = translate_stream(loaded, signal, config=config, write=blocks.append, scratch=scratch,
                                calibration=calibration, stream=stream)
    return np.concatenate(blocks, axis=1), info


def notices(info: dict[str, Any]) -> list[str]:
    """One line per repair or warning about the input, for the user and the record's header."""
    lines = []
    if info.get("repaired_samples"):
        lines.append(f"PPG repaired: {info['repaired_samples']} non-finite sample(s) (NaN/inf) in "
                     f"{info['repaired_gaps']} gap(s) of at most {info['max_gap_s']:g} s, linearly interpolated")
    if info.get("flat_runs_s"):
        runs = info["flat_runs_s"]
        where = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in runs[:3])
        more = f" and {len(runs) - 3} more" if len(runs) > 3 else ""
        lines.append(f"PPG flat (one value for {info['flat_line_s']:g} s or longer) at {where}{more}: the ECG "
                     "there does not come from a pulse")
    return lines


def header_comments(loaded: LoadedModel, signal: PPGSignal | PPGStream, info: dict[str, Any]) -> list[str]:
    from p2es_dist import __version__

    sex = {0: "F", 1: "M"}.get(info["sex"])
    return [
        f"Generated by p2es translate {__version__} from PPG: a model output, not a recording",
        f"Input: {Path(signal.source).name} channel {signal.channel} at {signal.fs:g} Hz, "
        f"{info['input_samples']} samples",
        f"Model: {loaded.name} ({loaded.kind}, weights sha256 {loaded.digest[:16]})",
        (f"Calibration: {info['calibration']['source']}, PAT {info['calibration']['pat_s'] * 1000:.0f} ms; 1 model "
         f"unit written as {info['ecg_scale_mv']:g} mV, the calibration beat's peak"
         if info.get("calibration") else
         f"Amplitude: NOT calibrated; model space has no absolute scale, 1 model unit written as "
         f"{info['ecg_scale_mv']:g} mV by convention"),
        f"Windows: {WINDOW} samples at {FS} Hz, hop {info['hop']}, Hann overlap-add; seed {info['seed']}",
        *([f"Age: {info['age']:g}"] if info["age"] is not None else []),
        *([f"Sex: {sex}"] if sex else []),
        *notices(info),
    ]


def records_ecg(signal: PPGStream) -> bool:
    """Whether the input has a channel named like an ECG lead (only then is it worth reading whole)."""
    from p2es_dist.data.sources.wfdb_common import canonical_lead

    return any(canonical_lead(name) for name in signal.columns)


def translate_file(*, model: str, input: str, out: str, column: str | None = None, fs: float | None = None,
                   png: str | None = None, config: TranslateConfig | None = None,
                   calibration: str | None = None, score_from_s: float | None = None,
                   stream: StreamConfig | None = None) -> dict[str, Any]:
    """`p2es translate` as a function: reads `input`, writes `out`.hea/.dat (and `png`); returns a summary.

    The input is read, translated and written chunk by chunk (translate.stream states the memory bound).
    `calibration`: a profile written by `p2es calibrate` (data/calibration.py). When the input also
    records lead II, the summary's `recorded` scores the generated lead II against it from `score_from_s`
    (default: the end of the calibration segment when the profile came from this file, else 0); those
    recorded leads are read whole."""
    from p2es_dist.models.checkpoint import load_model
    from p2es_dist.translate.io import EcgRecordWriter, open_ppg

    config = config or TranslateConfig()
    signal = open_ppg(input, column=column, fs=fs)
    loaded = load_model(model)
    check_population(loaded.model, config.population)
    profile = None if calibration is None else CalibrationProfile.load(calibration)
    with EcgRecordWriter(out, fs=FS) as writer:
        info = translate_stream(loaded, signal, config=config, write=writer.append, scratch=writer.scratch,
                                calibration=profile, stream=stream)
        files = writer.finish(header_comments(loaded, signal, info))
        calibrated = info["calibration"] is not None
        recorded = recorded_leads(input) if records_ecg(signal) else None
        end_s = calibration_end_s(profile, input) if score_from_s is None else score_from_s
        agreement = None if recorded is None else recorded_agreement(recorded, writer.lead(LEAD_INDEX["II"]),
                                                                   from_s=end_s)
        summary = {"record": str(out), "files": [str(f) for f in files], "fs": FS, "leads": N_LEADS,
                   "units": "mV (scaled to the calibration beat)" if calibrated else
                   "mV (uncalibrated, see the header comments)", "model": loaded.name, **info,
                   "recorded": agreement}
        if png:
            label = f"calibrated, PAT {profile.pat_s * 1000:.0f} ms" if calibrated else "uncalibrated"
            span = png_span(end_s or 0.0, writer.n)
            summary["png"] = str(plot_png(png, writer.read(span.start, span.stop), span=span,
                                          title=f"{Path(input).name} -> {loaded.name} ({label})",
                                          recorded=None if recorded is None else recorded[0]))
    return summary
