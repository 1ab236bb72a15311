"""`p2es translate --condition LEADS`: some recorded ECG leads of a WFDB record -> the 12-lead ECG, with a
lead-conditioned model (one trained with `data.condition_leads` or `data.condition_subsets`).

    p2es translate --model runs/p2es_anysubset --input ../shared/data/ptbxl/records500/00000/00001_hr \
        --condition I,II --out out/00001_12lead

Steps: the record is read whole (`data.sources.wfdb_common`; leads found by name as ingest finds them),
each requested lead preprocessed as ingest does (`data.preprocess.condition_signal`: 125 Hz, band-pass,
artefact mask), and a PPG channel of the record too, when it has one (models trained on paired data read
both). Windows every `hop` samples; per window the requested leads go to model space together
(`data.normalize.ecg_to_model_space`: one factor per window, so relations between leads survive), the
model generates with them as `cond_leads`, and the output is scaled back by the same factor and stitched
by normalised Hann overlap-add (`translate.stream.stitched`). The input carries its own scale, so unlike
PPG translation the output is in the input's units (mV for a record in volts).

Lead physics: last, at every sample, the given leads are the preprocessed input exactly and, where two
limb leads are given, all six limb leads are derived from them (`models.leads.impose_given_leads`, the
rule each model's `generate` already follows, applied again after stitching). A requested lead is not
given to the model in windows where ingest would mask it (a gap, flat line or clipping); those samples
are generated.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2es_dist.constants import FS, LEAD_INDEX, LEADS, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.normalize import ecg_to_model_space
from p2es_dist.data.preprocess import PreprocessConfig, condition_signal
from p2es_dist.errors import UserError
from p2es_dist.models.base import TranslationModel
from p2es_dist.models.checkpoint import LoadedModel
from p2es_dist.models.leads import LIMB_LEADS, impose_given_leads
from p2es_dist.translate.recorded import plot_png, png_span
from p2es_dist.translate.run import (
    TranslateConfig,
    check_population,
    generate_windows,
    preprocess_config,
    stated_generation,
    window_upstrokes,
)
from p2es_dist.translate.stitch import cut_windows, window_starts
from p2es_dist.translate.stream import stitched


@dataclass
class LeadsInput:
    """The requested leads (and any PPG) of one record at 125 Hz, preprocessed as ingest does."""

    leads: dict[str, np.ndarray]  # requested lead -> (n,) float32, in `units`
    valid: dict[str, np.ndarray]  # requested lead -> (n,) bool: ingest would keep the sample
    ppg: np.ndarray | None  # (n,) or None when the record has no PPG
    ppg_valid: np.ndarray | None
    ppg_channel: str | None
    input_fs: float
    units: str  # "mV", or "au" when no lead of the record is in volts
    age: float | None
    sex: int
    source: str

    @property
    def n(self) -> int:
        return len(next(iter(self.leads.values())))


def read_leads(path: str | Path, condition: list[str], *, config: PreprocessConfig,
               column: str | None = None) -> LeadsInput:
    """The `condition` leads of a WFDB record; UserError naming what is missing or unusable."""
    from p2es_dist.data.record import RecordError
    from p2es_dist.data.sources import wfdb_common
    from p2es_dist.translate.io import _match_column, _record_path, is_csv

    if is_csv(path):
        raise UserError(f"--input {path}: --condition reads the ECG leads of a WFDB record (.hea), not a CSV")
    record_path = _record_path(Path(path))
    if not Path(f"{record_path}.hea").exists():
        raise UserError(f"--input {path}: no WFDB header {record_path}.hea")
    try:
        record = wfdb_common.read_wfdb(record_path)
        chans = wfdb_common.channels(record)
        signals = wfdb_common.pick_signals(chans, context=str(path))
    except RecordError as exc:
        raise UserError(f"--input {path}: {exc}") from None
    missing = [lead for lead in condition if lead not in signals.ecg]
    if missing:
        have = ", ".join(signals.ecg) or "none"
        raise UserError(f"--condition {','.join(condition)}: the record {path} has no usable lead "
                        f"{', '.join(missing)} (its leads: {have})")
    leads, valid = {}, {}
    for lead in condition:
        leads[lead], valid[lead] = condition_signal(signals.ecg[lead], signals.fs, config.ecg_band_hz, config)
        if not valid[lead].any():
            raise UserError(f"--input {path}: lead {lead} holds no usable sample (gaps, flat line or clipping "
                            "throughout)")
    ppg, ppg_valid, ppg_channel = None, None, None
    chosen = None
    if column is not None:
        name = _match_column([chan.name for chan in chans], column)
        if name is None:
            raise UserError(f"--column {column!r}: no such channel in {record_path}.hea "
                            f"(channels: {', '.join(chan.name for chan in chans)})")
        chosen = next(chan for chan in chans if chan.name == name)
    elif signals.ppg is not None:
        chosen = next(chan for chan in chans if wfdb_common.is_ppg(chan.name) and np.isfinite(chan.values).any())
    if chosen is not None:
        ppg, ppg_valid = condition_signal(chosen.values, chosen.fs, config.ppg_band_hz, config)
        ppg_channel = chosen.name
    n = min([len(x) for x in leads.values()] + ([len(ppg)] if ppg is not None else []))
    if n < WINDOW:
        raise UserError(f"--input {path}: {n / FS:.2f} s at {FS} Hz is shorter than one window "
                        f"({WINDOW} samples, {WINDOW / FS:.3f} s)")
    age, sex = wfdb_common.demographics(getattr(record, "comments", None) or [])
    return LeadsInput(leads={k: v[:n] for k, v in leads.items()}, valid={k: v[:n] for k, v in valid.items()},
                      ppg=None if ppg is None else ppg[:n], ppg_valid=None if ppg_valid is None else ppg_valid[:n],
                      ppg_channel=ppg_channel, input_fs=signals.fs, units=signals.ecg_units, age=age, sex=sex,
                      source=str(path))


class _InMemoryPPG:
    """What `stream.stitched` reads windows from: the record's 125 Hz PPG (zeros without one)."""

    def __init__(self, ppg: np.ndarray | None, n: int) -> None:
        self.n, self.ppg = n, ppg

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self.n)
        return np.zeros(stop - start) if self.ppg is None else self.ppg[start:stop].astype(np.float64)


def check_takes_leads(loaded: LoadedModel, condition: list[str]) -> None:
    if not isinstance(loaded.model, TranslationModel) or not loaded.model.takes_leads:
        raise UserError(f"--condition {','.join(condition)}: model {loaded.name!r} ({loaded.uri}) does not take "
                        "ECG leads as input (train a lead-conditioned model: data.condition_subsets, or "
                        "data.condition_leads)")


def translate_leads(loaded: LoadedModel, signal: LeadsInput, *, config: TranslateConfig) -> tuple[np.ndarray,
                                                                                                    dict[str, Any]]:
    """The record's requested leads -> ((12, n) ECG at 125 Hz in the input's units, a summary)."""
    check_takes_leads(loaded, list(signal.leads))
    check_population(loaded.model, config.population)
    if not 1 <= config.hop <= WINDOW:
        raise UserError(f"--hop: expected 1 to {WINDOW} samples, got {config.hop}")
    n = signal.n
    recorded = np.zeros((N_LEADS, n), dtype=np.float32)
    valid = np.zeros((N_LEADS, n), dtype=bool)
    for lead, values in signal.leads.items():
        recorded[LEAD_INDEX[lead]], valid[LEAD_INDEX[lead]] = values, signal.valid[lead]
    # A window without a usable given lead gets the record's scale, so its output is not off by orders.
    fallback_scale = float(np.abs(recorded[valid]).max()) if valid.any() else 1.0
    ppg_ok = np.zeros(n, dtype=bool) if signal.ppg is None else signal.ppg_valid
    upstrokes = np.zeros(0, dtype=np.int64)
    if signal.ppg is not None:
        with contextlib.suppress(IndexError):  # neurokit2 finds no pulse wave at all: no upstrokes
            upstrokes = timing.ppg_upstrokes(signal.ppg.astype(np.float64))
    starts = window_starts(n, WINDOW, config.hop)
    age = config.age if config.age is not None else signal.age
    sex = config.sex if config.sex is not None else signal.sex
    counts = {"without_leads": 0}

    def generate(ppg_windows: np.ndarray, these: np.ndarray, first: int) -> np.ndarray:
        ecg = cut_windows(recorded, these, WINDOW)
        given = cut_windows(valid, these, WINDOW).all(axis=-1)
        counts["without_leads"] += int((~given.any(axis=1)).sum())
        model_ecg, scale = ecg_to_model_space(ecg, given)
        scale = np.where(given.any(axis=1), scale, np.float32(fallback_scale))
        present = cut_windows(ppg_ok, these, WINDOW).all(axis=-1)
        out = generate_windows(loaded, ppg_windows, config=config, age=age, sex=sex,
                               upstrokes=window_upstrokes(upstrokes, these), first_batch=first // config.batch_size,
                               leads=(model_ecg, given), ppg_present=present)
        return out * scale[:, None, None]

    with torch.inference_mode():
        blocks = list(stitched(_InMemoryPPG(signal.ppg, n), starts, generate, group=4 * config.batch_size))
        stitched_ecg = torch.from_numpy(np.concatenate(blocks, axis=1).T[:, :, None])  # (n, 12, 1): a sample a row
        out = impose_given_leads(stitched_ecg, torch.from_numpy(recorded.T[:, :, None]).double(),
                                 torch.from_numpy(valid.T))
    ecg = out[:, :, 0].numpy().T
    given_limb = [lead for lead in LIMB_LEADS if lead in signal.leads]
    info = {**asdict(config), "condition": list(signal.leads), "n_samples": n, "duration_s": n / FS,
            "n_windows": len(starts), "windows_without_given_leads": counts["without_leads"],
            "masked_samples": {lead: int((~signal.valid[lead]).sum()) for lead in signal.leads if
                               not signal.valid[lead].all()},
            "limb_leads_derived_from": given_limb[:2] if len(given_limb) >= 2 else None,
            "input_fs": signal.input_fs, "units": signal.units, "ppg_channel": signal.ppg_channel,
            "age": age, "sex": sex, "generation": stated_generation(loaded.model, loaded.metadata)}
    return ecg, info


def leads_comments(loaded: LoadedModel, signal: LeadsInput, info: dict[str, Any]) -> list[str]:
    from p2es_dist import __version__

    given = ", ".join(info["condition"])
    sex = {0: "F", 1: "M"}.get(info["sex"])
    derived = info["limb_leads_derived_from"]
    return [
        f"Generated by p2es translate {__version__} from ECG lead(s) {given}: those are the input (125 Hz, "
        "band-passed as ingest does), every other lead a model output, not a recording",
        f"Input: {Path(signal.source).name} at {signal.input_fs:g} Hz"
        + (f", PPG channel {signal.ppg_channel} also given" if signal.ppg_channel else ", no PPG"),
        f"Model: {loaded.name} ({loaded.kind}, weights sha256 {loaded.digest[:16]})",
        *([f"Lead physics: the six limb leads derived from {' and '.join(derived)} (Einthoven/Goldberger)"]
          if derived else []),
        f"Amplitude: in the input's units ({signal.units}): each window scaled by its given leads' peak and back",
        f"Windows: {WINDOW} samples at {FS} Hz, hop {info['hop']}, Hann overlap-add; seed {info['seed']}",
        *([f"Age: {info['age']:g}"] if info["age"] is not None else []),
        *([f"Sex: {sex}"] if sex else []),
    ]


def translate_leads_file(*, model: str, input: str, out: str, condition: list[str], column: str | None = None,
                         png: str | None = None, config: TranslateConfig | None = None) -> dict[str, Any]:
    """`p2es translate --condition` as a function: writes `out`.hea/.dat (and `png`); returns a summary."""
    from p2es_dist.models.checkpoint import load_model
    from p2es_dist.translate.io import write_ecg_record

    if not condition:
        raise UserError("--condition: name at least one lead, e.g. II or I,II")
    unknown = [lead for lead in condition if lead not in LEAD_INDEX]
    if unknown:
        raise UserError(f"--condition: unknown lead {unknown[0]!r} (expected some of {', '.join(LEADS)})")
    config = config or TranslateConfig()
    loaded = load_model(model)
    check_takes_leads(loaded, condition)
    signal = read_leads(input, list(dict.fromkeys(condition)), config=preprocess_config(loaded.metadata),
                        column=column)
    ecg, info = translate_leads(loaded, signal, config=config)
    files = write_ecg_record(out, ecg, fs=FS, comments=leads_comments(loaded, signal, info))
    summary = {"record": str(out), "files": [str(f) for f in files], "fs": FS, "leads": N_LEADS,
               "model": loaded.name, **info}
    if png:
        span = png_span(0.0, ecg.shape[1])
        summary["png"] = str(plot_png(png, ecg[:, span], span=span,
                                      title=f"{Path(input).name} {','.join(info['condition'])} -> {loaded.name}",
                                      recorded=signal.leads))
    return summary


__all__ = ["LeadsInput", "read_leads", "translate_leads", "translate_leads_file"]
