"""A patient's calibration profile: what ~60 s of paired ECG + PPG tell about that patient.

Wearables that record PPG often also take a short single-lead ECG (a 30-60 s spot check). From such a
paired segment `estimate_profile` measures the patient's pulse arrival time (PAT) and mean beat per
recorded lead; with them, every later PPG upstroke says where that patient's QRS was
(`timing.template_from_upstrokes`). The same function serves ingest (the first `calibration_s` of each
paired record, stored with its windows), `p2es calibrate` (a user's paired record) and evaluation.

The profile file is small, human-readable, versioned JSON (no pickle):

    {"format": "p2es-calibration", "version": 1, "fs": 125, "seconds": 60.0, "pat_s": 0.561,
     "pat_iqr_s": 0.016, "n_beats": 71, "beat_start_s": -0.304, "units": "mV", "source": "a103l",
     "beat": {"II": [100 samples], "V1": [...]}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2es_dist.constants import FS, LEAD_INDEX, LEADS, N_LEADS
from p2es_dist.data import timing
from p2es_dist.errors import UserError

FORMAT = "p2es-calibration"
VERSION = 1
MIN_BEATS = 10  # fewer matched beats than this give no profile: PAT and beat would be guesses
IQR_PER_SIGMA = 1.349  # a normal distribution's interquartile range, in standard deviations
POPULATION_KEYS = ("fs", "pat_s", "pat_iqr_s", "n_beats", "beat", "source")  # what a model's population keeps


@dataclass
class CalibrationProfile:
    pat_s: float
    pat_iqr_s: float
    n_beats: int
    beat: dict[str, np.ndarray]  # lead name -> (BEAT_SAMPLES,) mean beat, R-peak at BEAT_PRE
    seconds: float
    units: str = "mV"
    source: str = ""
    fs: int = FS
    extra: dict[str, Any] = field(default_factory=dict)

    def beat_array(self) -> tuple[np.ndarray, np.ndarray]:
        """(12, BEAT_SAMPLES) float32 in lead order and the (12,) mask of leads the profile has."""
        beat = np.zeros((N_LEADS, timing.BEAT_SAMPLES), dtype=np.float32)
        mask = np.zeros(N_LEADS, dtype=bool)
        for name, values in self.beat.items():
            beat[LEAD_INDEX[name]] = values
            mask[LEAD_INDEX[name]] = True
        return beat, mask

    def template(self, upstrokes: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(12, length) template in the profile's units for a PPG with these upstrokes, and its mask."""
        beat, mask = self.beat_array()
        return timing.template_from_upstrokes(beat, upstrokes, self.pat_s, length, self.fs), mask

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "fs": self.fs, "seconds": self.seconds,
            "pat_s": round(self.pat_s, 6), "pat_iqr_s": round(self.pat_iqr_s, 6), "n_beats": self.n_beats,
            "beat_start_s": round(-timing.BEAT_PRE / self.fs, 6), "units": self.units, "source": self.source,
            "beat": {name: [round(float(v), 6) for v in values] for name, values in self.beat.items()},
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str = "calibration profile") -> CalibrationProfile:
        if data.get("format") != FORMAT:
            raise UserError(f"{where}: not a calibration profile (format {data.get('format')!r}, "
                            f"expected {FORMAT!r}); write one with `p2es calibrate`")
        if data.get("version") != VERSION:
            raise UserError(f"{where}: profile version {data.get('version')!r}, this package reads {VERSION}")
        if data.get("fs") != FS:
            raise UserError(f"{where}: fs {data.get('fs')!r}, expected {FS}")
        pat = data.get("pat_s")
        if not isinstance(pat, int | float) or not timing.PAT_RANGE_S[0] <= pat <= timing.PAT_RANGE_S[1]:
            raise UserError(f"{where}: pat_s must be a number in {list(timing.PAT_RANGE_S)} s, got {pat!r}")
        beats = data.get("beat")
        if not isinstance(beats, dict) or not beats:
            raise UserError(f"{where}: 'beat' must map lead names to {timing.BEAT_SAMPLES} samples each")
        beat = {}
        for name, values in beats.items():
            if name not in LEAD_INDEX:
                raise UserError(f"{where}: beat lead {name!r} is not one of {', '.join(LEADS)}")
            array = np.asarray(values, dtype=np.float32)
            if array.shape != (timing.BEAT_SAMPLES,) or not np.isfinite(array).all():
                raise UserError(f"{where}: beat {name!r} must hold {timing.BEAT_SAMPLES} finite samples")
            beat[name] = array
        return cls(pat_s=float(pat), pat_iqr_s=float(data.get("pat_iqr_s", math.nan)),
                   n_beats=int(data.get("n_beats", 0)), beat=beat, seconds=float(data.get("seconds", math.nan)),
                   units=str(data.get("units", "")), source=str(data.get("source", "")),
                   extra=dict(data.get("extra", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CalibrationProfile:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"--calibration: {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"--calibration: {path} is not JSON ({exc})") from None
        return cls.from_json(data, where=str(path))


def estimate_profile(ecg: dict[str, np.ndarray], ppg: np.ndarray, *, valid: dict[str, np.ndarray] | None = None,
                     ppg_valid: np.ndarray | None = None, seconds: float, units: str = "mV",
                     source: str = "") -> CalibrationProfile | None:
    """Profile from the first `seconds` of preprocessed 125 Hz signals; None when they cannot give one.

    `ecg` maps lead names to signals, `valid` to per-sample validity (default: all valid). R-peaks come
    from `timing.peak_lead`; each lead's beat is the median over the R-peaks
    whose whole beat lies in valid samples of the segment. PPG upstrokes are searched up to 1 s past the
    segment so the segment's last beats still find their pulse; no ECG sample past it is read.
    """
    end = int(round(seconds * FS))
    peak_lead = timing.peak_lead(ecg)
    if peak_lead is None or len(ppg) < end:
        return None
    lead_valid = (valid or {}).get(peak_lead)
    peaks = timing.r_peaks(np.where(lead_valid[:end], ecg[peak_lead][:end], 0.0) if lead_valid is not None
                           else ecg[peak_lead][:end])
    pulse_end = min(len(ppg), end + int(round(timing.PAT_RANGE_S[1] * FS)))
    upstrokes = timing.ppg_upstrokes(ppg[:pulse_end])
    if ppg_valid is not None:
        upstrokes = upstrokes[ppg_valid[upstrokes]]
    if lead_valid is not None:
        peaks = peaks[lead_valid[peaks]]
    arrival = timing.pulse_arrival(peaks, upstrokes)
    if arrival is None or arrival.n_beats < MIN_BEATS:
        return None
    beats = {}
    for name, signal in ecg.items():
        mask = (valid or {}).get(name)
        beat, n = timing.beat_template(signal[None, :end], peaks, None if mask is None else mask[:end])
        if n >= MIN_BEATS:
            beats[name] = beat[0].astype(np.float32)
    if not beats:
        return None
    return CalibrationProfile(pat_s=arrival.pat_s, pat_iqr_s=arrival.iqr_s, n_beats=arrival.n_beats, beat=beats,
                              seconds=float(seconds), units=units, source=source)


def population_profile(profiles: list[CalibrationProfile], *, min_records: int = 5) -> CalibrationProfile | None:
    """The population template of the zero-shot baseline: median PAT and median normalised beat per lead.

    Each profile's beat is scaled to unit peak per lead first, so a patient with a large QRS does not
    dominate (and sources that rescaled each lead on their own, as BIDMC did, still average sensibly).
    A lead is kept when at least `min_records` records (or all, if fewer) have it.
    """
    if not profiles:
        return None
    beat = {}
    for name in LEADS:
        rows = [p.beat[name] / max(float(np.abs(p.beat[name]).max()), 1e-9) for p in profiles if name in p.beat]
        if rows and len(rows) >= min(min_records, len(profiles)):
            beat[name] = np.median(np.stack(rows), axis=0).astype(np.float32)
    pats = np.array([p.pat_s for p in profiles])
    q1, median, q3 = np.percentile(pats, [25, 50, 75])
    return CalibrationProfile(pat_s=float(median), pat_iqr_s=float(q3 - q1), n_beats=len(profiles), beat=beat,
                              seconds=math.nan, units="normalised", source=f"population of {len(profiles)} records")


def hedged_beat(beat: np.ndarray, pat_iqr_s: float, fs: int = FS) -> np.ndarray:
    """(12, BEAT_SAMPLES) a population beat hedged against its PAT spread: unit peak, then blurred.

    Without calibration a patient's QRS is known only to within the population's PAT spread, so the
    expected ECG at each upstroke is the beat convolved with that spread (a Gaussian of standard deviation
    IQR / 1.349). That is the MSE-optimal guess, and for Pearson a matched filter: on BIDMC's val split the
    population template scores 0.155 sharp and 0.311 blurred by its 48 ms spread. A wide spread (CinC 2015's
    monitors: IQR 0.59 s) flattens the beat towards zero, which is the honest answer there.
    """
    from scipy.ndimage import gaussian_filter1d

    beat = np.asarray(beat, dtype=np.float32)
    peak = float(np.abs(beat).max()) if beat.size else 0.0
    unit = beat / peak if peak > 0 else beat
    sigma = float(pat_iqr_s) / IQR_PER_SIGMA * fs if math.isfinite(pat_iqr_s) else 0.0
    if sigma <= 0:
        return unit.astype(np.float32)
    return gaussian_filter1d(unit, sigma, axis=-1, mode="constant").astype(np.float32)


def population_json(profile: CalibrationProfile, by_source: dict[str, CalibrationProfile] | None = None) -> dict:
    """A model's `population` config entry: the pooled profile's `POPULATION_KEYS`, plus one entry per
    source (`by_source`) so that each window's zero-shot template comes from its own source's population."""
    pooled = profile.to_json()
    out = {key: pooled[key] for key in POPULATION_KEYS}
    if by_source:
        out["by_source"] = {name: {key: one.to_json()[key] for key in POPULATION_KEYS}
                            for name, one in sorted(by_source.items())}
    return out


def population_from_shards(uris: list[str]) -> CalibrationProfile | None:
    """The population profile of the `train` split of shard folders (all sources pooled)."""
    profiles = _train_profiles(uris)
    return population_profile([p for group in profiles.values() for p in group]) if profiles else None


def populations_by_source(uris: list[str]) -> dict[str, CalibrationProfile]:
    """One population profile per `source` of the `train` split of shard folders.

    PAT depends on the device as much as on the patient (CinC 2015's monitors add ~0.5 s of PPG latency
    that BIDMC's do not), so a pooled PAT fits neither.
    """
    out = {}
    for name, group in _train_profiles(uris).items():
        if (population := population_profile(group)) is not None:
            population.source = f"{name or 'unnamed source'}: {population.source}"
            out[name] = population
    return out


def _train_profiles(uris: list[str]) -> dict[str, list[CalibrationProfile]]:
    """source -> the calibration profiles of the `train` split: one per record (per subject in shards
    without a `record` column, such as distillation's teacher outputs)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from p2es_dist.data.read import calibration_available, read_table

    if not calibration_available(uris):
        return {}
    table = read_table(uris, ["subject_id", "calib_pat_s", "calib_beat", "calib_beat_mask"], split="train",
                       where=ds.field("calib_pat_s").is_valid(), optional=["record", "source"])
    if len(table) == 0:
        return {}
    key = "record" if "record" in table.column_names else "subject_id"
    source = ["source"] if "source" in table.column_names else []
    _, first = np.unique(np.asarray(table.column(key).to_pylist(), dtype=object), return_index=True)
    table = table.take(pa.array(np.sort(first)))
    beats = table.column("calib_beat").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    beats = beats.astype(np.float32).reshape(len(table), N_LEADS, timing.BEAT_SAMPLES)
    masks = np.asarray(table.column("calib_beat_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                       dtype=bool).reshape(len(table), N_LEADS)
    sources = table.column("source").to_pylist() if source else [""] * len(table)
    grouped: dict[str, list[CalibrationProfile]] = {}
    for row, pat in enumerate(table.column("calib_pat_s").to_pylist()):
        grouped.setdefault(sources[row], []).append(CalibrationProfile(
            pat_s=pat, pat_iqr_s=math.nan, n_beats=0, seconds=math.nan, source=sources[row],
            beat={LEADS[i]: beats[row, i] for i in np.flatnonzero(masks[row])}))
    return grouped
