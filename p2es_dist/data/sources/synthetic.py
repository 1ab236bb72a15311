"""The `synthetic` source: a cohort of virtual subjects with paired PPG + 12-lead ECG windows.

It is the scale source ("millions of windows") and the demo's default data, so generation is vectorised
over a chunk of windows (see `synthetic_beats.py` for the signal model) and any chunk can be generated
alone: window w of the cohort belongs to subject w // windows_per_subject, and every random draw is a
pure function of (seed, subject) or (seed, subject, beat), never of the chunking.

Subjects: record `syn{subject:08d}`, subject_id `syn-{subject:08d}`, `windows_per_subject` consecutive
non-overlapping windows (start = 0, L, 2L, ... on one continuous recording); split by a stable hash of
the subject id. Conditions (one per subject): NORM, MI (anterior / inferior / lateral), AF, LBBB and
RBBB (both also CD), with configurable prevalences. Age and sex shape heart rate, QT, amplitudes,
pulse arrival time and the PPG waveform; MI, AF and LBBB subjects are older on average.

    table = generate(SyntheticConfig(n_windows=10_000), chunk_index=0, chunk_size=2048)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from p2es_dist.constants import FS, LABEL_INDEX, N_LEADS, WINDOW
from p2es_dist.data.quality import quality_index
from p2es_dist.data.schema import build_table
from p2es_dist.data.sources.synthetic_beats import (
    N_WAVES,
    WAVES,
    Physiology,
    counter_key,
    counter_normal,
    counter_uniform,
    render,
)
from p2es_dist.data.splits import hash_split

SOURCE = "synthetic"
UNITS = {"ecg": "mV", "ppg": "au"}

CONDITIONS = ("NORM", "MI", "AF", "LBBB", "RBBB")
CONDITION_LABELS: dict[str, tuple[str, ...]] = {
    "NORM": ("NORM",), "MI": ("MI",), "AF": ("AF",), "LBBB": ("LBBB", "CD"), "RBBB": ("RBBB", "CD"),
}
TERRITORIES = ("anterior", "inferior", "lateral")
RENDER_BATCH = 256
assert all(label in LABEL_INDEX for labels in CONDITION_LABELS.values() for label in labels)


@dataclass
class SyntheticConfig:
    """Cohort size, seed and the knobs of the signal model. Prevalences are per subject; NORM is the rest."""

    n_windows: int = 20_000
    seed: int = 0
    windows_per_subject: int = 8
    p_mi: float = 0.15
    p_af: float = 0.10
    p_lbbb: float = 0.05
    p_rbbb: float = 0.05
    ecg_noise_mv: float = 0.015  # white noise SD on each recorded lead
    baseline_wander_mv: float = 0.05  # respiratory baseline wander of the heart vector
    ppg_noise: float = 0.01  # relative to a typical pulse amplitude of 1
    ppg_baseline: float = 0.1  # respiratory baseline modulation of the PPG
    pat_min_s: float = 0.15  # R peak -> PPG systolic peak, oldest subjects
    pat_max_s: float = 0.30  # ... youngest subjects
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        prevalences = (self.p_mi, self.p_af, self.p_lbbb, self.p_rbbb)
        if self.n_windows < 0 or self.seed < 0 or self.windows_per_subject < 1:
            raise ValueError("n_windows and seed must be >= 0 and windows_per_subject >= 1")
        if min(prevalences) < 0 or sum(prevalences) > 1:
            raise ValueError("p_mi, p_af, p_lbbb, p_rbbb must be >= 0 and sum to <= 1")
        if not 0 < self.pat_min_s <= self.pat_max_s < 0.6:
            raise ValueError("need 0 < pat_min_s <= pat_max_s < 0.6 (seconds)")


# Independent random streams per subject; the position of a name is its stream id, so append only.
_STREAMS = (
    "condition", "territory", "sex", "age", "rate", "phase", "resp_freq", "resp_phase", "mayer_phase",
    "drift_freq", "drift_phase", "axis", "twist", "qrs_amp", "t_amp", "qtc", "pr", "t_width", "fwave",
    "lead_gain", "pat", "ppg_shape", "noise", "beats", "wander",
)
_STREAM = {name: i for i, name in enumerate(_STREAMS)}

# Heart vectors (Frank X left, Y feet, Z back; mV) of a normal beat, in WAVES order.
_NORMAL_VECTORS = np.array(
    [
        [0.10, 0.12, -0.02],  # P: left, inferior
        [-0.12, 0.02, -0.22],  # Q: septal activation, rightward and anterior (q in I/V6, r in V1)
        [1.10, 0.55, 0.15],  # R: main left-ventricular vector, left-inferior, slightly posterior
        [-0.25, 0.0, 0.65],  # S: terminal basal activation, posterior and rightward (deep S in V1-V3)
        [0.0, 0.0, 0.0],  # R2: absent in normal conduction
        [0.0, 0.0, 0.0],  # ST: isoelectric
        [0.35, 0.22, -0.12],  # T: concordant with R
        [0.0, 0.0, 0.0],  # F: no fibrillatory waves
        [0.0, 0.0, 0.0],  # W: baseline wander, direction drawn per subject
    ]
)
_NORMAL_QRS = (np.array([-0.028, 0.0, 0.028, 0.05]), np.array([0.010, 0.011, 0.011, 0.014]))  # Q R S R2


def _wave(name: str) -> int:
    return WAVES.index(name)


def _subject_physiology(config: SyntheticConfig, subject: np.ndarray, start: np.ndarray) -> tuple[
        Physiology, dict[str, np.ndarray]]:
    """Per-window physiology and demographics; every draw depends on (seed, subject) only."""
    seed, n = config.seed, len(subject)

    def uniform(name: str, counter: np.ndarray | int = 0) -> np.ndarray:
        return counter_uniform(counter_key(seed, _STREAM[name], subject), counter)

    def normal(name: str, counter: np.ndarray | int = 0) -> np.ndarray:
        return counter_normal(counter_key(seed, _STREAM[name], subject), counter)

    thresholds = np.cumsum([config.p_mi, config.p_af, config.p_lbbb, config.p_rbbb])
    condition = np.searchsorted(thresholds, uniform("condition"), side="right") + 1
    condition[condition == len(CONDITIONS)] = 0  # past the last prevalence: NORM
    is_ = {name: condition == i for i, name in enumerate(CONDITIONS)}
    territory = np.where(is_["MI"], np.floor(uniform("territory") * 3).astype(np.int8), -1)
    sex = (uniform("sex") < 0.5).astype(np.int8)  # 1 male
    female = 1 - sex
    older = 12.0 * (is_["MI"] | is_["AF"] | is_["LBBB"]) + 5.0 * is_["RBBB"]
    age = np.floor(np.clip(52.0 + older + 16.0 * normal("age"), 18, 95))
    aging = (age - 50.0) / 30.0

    # Rhythm: women and the young have slightly faster rates; AF is faster and irregular, without RSA.
    sinus_rate = np.clip(72 + 3 * female - 2.5 * aging + 8 * normal("rate"), 50, 100)
    af_rate = np.clip(95 + 15 * normal("rate"), 65, 125)
    rate = np.where(is_["AF"], af_rate, sinus_rate) / 60.0
    rsa = np.where(is_["AF"], 0.0, np.clip(0.05 - 0.015 * aging, 0.01, 0.08))
    # RR_k = RR (1 + jitter (u_k - u_k-1)): a coefficient of variation of jitter / sqrt(6), 0.18-0.24 in AF.
    jitter = np.where(is_["AF"], 0.45 + 0.15 * uniform("beats"), 0.03)

    # Heart vectors: a frontal-plane axis and a horizontal twist per subject, amplitudes by age and sex.
    vectors = np.broadcast_to(_NORMAL_VECTORS, (n, N_WAVES, 3)).copy()
    qrs_offset = np.broadcast_to(_NORMAL_QRS[0], (n, 4)).copy()
    qrs_width = np.broadcast_to(_NORMAL_QRS[1], (n, 4)).copy()
    _apply_conditions(vectors, qrs_offset, qrs_width, is_, territory)
    qrs_scale = np.exp(0.15 * normal("qrs_amp")) * (1.0 + 0.12 * sex) * np.clip(1 - 0.1 * aging, 0.7, 1.2)
    vectors[:, 1:5] *= qrs_scale[:, None, None]
    vectors[:, 5:7] *= (np.exp(0.15 * normal("t_amp")) * (1.0 + 0.1 * sex))[:, None, None]
    vectors[:, _wave("F")] = np.where(is_["AF"][:, None], [-0.02, 0.04, -0.09], 0.0) * (
        0.6 + 0.8 * uniform("fwave"))[:, None]
    wander_dir = np.stack([normal("wander", i) for i in range(3)], axis=1)
    vectors[:, _wave("W")] = config.baseline_wander_mv * wander_dir
    vectors = np.einsum("nij,ncj->nci", _rotations(normal("axis"), normal("twist")), vectors)

    bbb = is_["LBBB"] | is_["RBBB"]
    age_span = np.clip((age - 18) / 77, 0, 1)  # arteries stiffen with age: faster pulse wave, earlier arrival
    pat = config.pat_max_s - (config.pat_max_s - config.pat_min_s) * np.clip(
        0.8 * age_span + 0.2 * uniform("pat"), 0, 1)
    physiology = Physiology(
        t0=start / FS,
        beat_key=counter_key(seed, _STREAM["beats"], subject),
        rate=rate,
        phase0=uniform("phase"),
        rsa=rsa,
        resp_freq=0.2 + 0.13 * uniform("resp_freq"),
        resp_phase=2 * np.pi * uniform("resp_phase"),
        mayer=np.full(n, 0.02),
        mayer_phase=2 * np.pi * uniform("mayer_phase"),
        drift=np.full(n, 0.04),
        drift_freq=1 / (60 + 90 * uniform("drift_freq")),
        drift_phase=2 * np.pi * uniform("drift_phase"),
        jitter=jitter,
        vectors=vectors,
        qrs_offset=qrs_offset,
        qrs_width=qrs_width,
        pr=np.clip(0.13 + 0.01 * aging + 0.012 * normal("pr"), 0.10, 0.19),
        qtc=np.clip(0.405 + 0.015 * female + 0.006 * aging + 0.012 * normal("qtc"), 0.36, 0.47) + 0.04 * bbb,
        t_width=np.exp(0.1 * normal("t_width")),
        j_point=np.where(bbb, 0.085, 0.045),
        fwave_freq=5.0 + 3.0 * uniform("fwave", 1),
        fwave_phase=2 * np.pi * uniform("fwave", 2),
        lead_gain=np.exp(0.08 * np.stack([normal("lead_gain", i) for i in range(8)], axis=1)),
        pat=pat,
        sys_width=0.055 + 0.012 * age_span,
        dia_delay=0.30 - 0.06 * age_span + 0.01 * normal("ppg_shape"),
        dia_ratio=np.clip(0.55 - 0.3 * age_span + 0.05 * normal("ppg_shape", 1), 0.15, 0.7),
        dia_width=0.09 + 0.02 * uniform("ppg_shape", 2),
        ppg_resp=config.ppg_baseline * (0.5 + uniform("ppg_shape", 3)),
        ecg_noise=config.ecg_noise_mv * np.exp(0.3 * normal("noise")),
        ppg_noise=config.ppg_noise * np.exp(0.3 * normal("noise", 1)),
        noise_offset=(counter_key(seed, _STREAM["noise"], subject) >> np.uint64(24)).astype(np.int64)
        + start.astype(np.int64),
    )
    demographics = {"age": age.astype(np.float32), "sex": sex, "condition": condition.astype(np.int8),
                    "mi_territory": territory.astype(np.int8)}
    return physiology, demographics


def _apply_conditions(vectors: np.ndarray, qrs_offset: np.ndarray, qrs_width: np.ndarray,
                      is_: dict[str, np.ndarray], territory: np.ndarray) -> None:
    """Condition-specific waves, in place. Vectors are in normal-beat units, before subject scaling."""
    q, r, s, r2, st, t, p = (_wave(name) for name in ("Q", "R", "S", "R2", "ST", "T", "P"))
    # MI: the initial QRS vector points away from the necrosis (wide, deep Q in the facing leads) and an
    # injury current points towards it (ST elevation there, reciprocal depression opposite).
    mi_q = {0: [0.0, 0.0, 0.45], 1: [0.0, -0.38, 0.0], 2: [-0.38, 0.12, 0.04]}  # anterior/inferior/lateral
    mi_st = {0: [0.0, 0.05, -0.22], 1: [0.0, 0.2, 0.0], 2: [0.18, -0.06, 0.0]}
    for code, q_vector in mi_q.items():
        rows = is_["MI"] & (territory == code)
        vectors[rows, q] += q_vector
        vectors[rows, st] = mi_st[code]
    qrs_offset[is_["MI"], 0], qrs_width[is_["MI"], 0] = -0.035, 0.015  # pathological Q: >= 40 ms
    vectors[is_["AF"], p] = 0.0  # no organised atrial activity
    # RBBB: normal initial activation, then a slow terminal vector to the right and front: rsR' in V1,
    # wide slurred S in I and V6; secondary T inversion in V1-V3.
    rb = is_["RBBB"]
    vectors[rb, r2] = [-0.45, -0.05, -0.55]
    qrs_offset[rb, 2:] = [0.035, 0.075]
    qrs_width[rb, 2:] = [0.014, 0.022]
    vectors[rb, t] += [0.1, 0.0, 0.25]
    # LBBB: the septum activates from the left (no septal q in I/V6), slow left-ventricular activation in
    # two humps (broad notched R in I/V6, deep QS in V1), discordant ST-T.
    lb = is_["LBBB"]
    vectors[lb, q] = [0.25, 0.05, 0.15]
    vectors[lb, r] = [0.90, 0.30, 0.60]
    vectors[lb, s] = 0.0
    vectors[lb, r2] = [0.95, 0.25, 0.75]
    qrs_offset[lb] = [-0.050, -0.012, 0.028, 0.042]
    qrs_width[lb] = [0.016, 0.017, 0.011, 0.017]
    vectors[lb, t] = [-0.30, -0.05, -0.35]
    vectors[lb, st] = [-0.10, 0.0, -0.20]


def _rotations(axis: np.ndarray, twist: np.ndarray) -> np.ndarray:
    """(n, 3, 3): the frontal-plane QRS axis (about Z, SD ~15 deg) then the horizontal twist (about Y, ~10)."""
    a, b = np.deg2rad(15.0) * axis, np.deg2rad(10.0) * twist
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    zeros, ones = np.zeros_like(a), np.ones_like(a)
    about_z = np.stack([np.stack([ca, -sa, zeros], -1), np.stack([sa, ca, zeros], -1),
                        np.stack([zeros, zeros, ones], -1)], -2)
    about_y = np.stack([np.stack([cb, zeros, sb], -1), np.stack([zeros, ones, zeros], -1),
                        np.stack([-sb, zeros, cb], -1)], -2)
    return about_y @ about_z


def _chunk_windows(config: SyntheticConfig, chunk_index: int, chunk_size: int) -> np.ndarray:
    if chunk_index < 0 or chunk_size < 1:
        raise ValueError(f"chunk_index must be >= 0 and chunk_size >= 1, got {chunk_index}, {chunk_size}")
    first = chunk_index * chunk_size
    return np.arange(first, min(first + chunk_size, config.n_windows), dtype=np.int64)


def n_chunks(config: SyntheticConfig, chunk_size: int) -> int:
    """How many chunks of `chunk_size` windows cover the cohort."""
    return -(-config.n_windows // chunk_size)


def generate_arrays(config: SyntheticConfig, *, chunk_index: int, chunk_size: int) -> dict[str, np.ndarray]:
    """Windows [chunk_index * chunk_size, ...) of the cohort as numpy arrays (the last chunk may be short).

    Keys: `window` (n,) int64 cohort index, `subject` (n,) int64, `start` (n,) int64, `ecg` (n, 12, L)
    float32 mV, `ecg_mask` (n, 12) bool, `ppg` (n, L) float32, `age` (n,) float32, `sex` (n,) int8,
    `condition` (n,) int8 index into CONDITIONS, `mi_territory` (n,) int8 index into TERRITORIES or -1,
    and ground truth the signals were made from: `r_peaks` (n, B) seconds from the window start (NaN
    padded), `hr` (n,) bpm, `pat` (n,) seconds.
    """
    window = _chunk_windows(config, chunk_index, chunk_size)
    subject = window // config.windows_per_subject
    start = (window % config.windows_per_subject) * WINDOW
    physiology, demographics = _subject_physiology(config, subject, start)
    n = len(window)
    ecg = np.empty((n, N_LEADS, WINDOW), dtype=np.float32)
    ppg = np.empty((n, WINDOW), dtype=np.float32)
    r_peaks, hr = [], []
    # Render in batches small enough for the (batch, L) temporaries to stay in cache and be reused.
    for first in range(0, n, RENDER_BATCH):
        rows = slice(first, first + RENDER_BATCH)
        signals = render(physiology.rows(rows), seed=config.seed, ecg_out=ecg[rows], ppg_out=ppg[rows])
        r_peaks.append(signals["r_peaks"])
        hr.append(signals["hr"])
    n_beats = max([part.shape[1] for part in r_peaks], default=0)
    r_peaks = [np.pad(part, ((0, 0), (0, n_beats - part.shape[1])), constant_values=np.nan) for part in r_peaks]
    return {
        "window": window, "subject": subject, "start": start, "ecg": ecg,
        "ecg_mask": np.ones((n, N_LEADS), dtype=bool), "ppg": ppg, **demographics,
        "r_peaks": np.concatenate(r_peaks) if r_peaks else np.empty((0, 0)),
        "hr": np.concatenate(hr) if hr else np.empty(0, dtype=np.float32),
        "pat": physiology.pat.astype(np.float32),
    }


def generate(config: SyntheticConfig, *, chunk_index: int, chunk_size: int) -> pa.Table:
    """Windows [chunk_index * chunk_size, ...) of the cohort as a shard table (`p2es_dist/data/schema.py`)."""
    return table_from_arrays(config, generate_arrays(config, chunk_index=chunk_index, chunk_size=chunk_size))


def table_from_arrays(config: SyntheticConfig, arrays: dict[str, np.ndarray],
                      quality: np.ndarray | None = None) -> pa.Table:
    """The shard table of `generate_arrays` output; `quality` is computed unless given."""
    subjects, row_subject = np.unique(arrays["subject"], return_inverse=True)
    names = [f"{s:08d}" for s in subjects.tolist()]
    splits = [hash_split(f"syn-{name}", val_fraction=config.val_fraction, test_fraction=config.test_fraction)
              for name in names]
    per_row = row_subject.tolist()
    labels = [CONDITION_LABELS[name] for name in CONDITIONS]
    if quality is None:
        quality = quality_index(arrays["ecg"], arrays["ecg_mask"], arrays["ppg"])
    return build_table(
        source=SOURCE,
        record=[f"syn{names[i]}" for i in per_row],
        subject_id=[f"syn-{names[i]}" for i in per_row],
        split=[splits[i] for i in per_row],
        start=arrays["start"],
        ecg=arrays["ecg"],
        ecg_mask=arrays["ecg_mask"],
        ppg=arrays["ppg"],
        age=arrays["age"],
        sex=arrays["sex"],
        labels=[labels[c] for c in arrays["condition"].tolist()],
        quality=quality,
        fs=FS,
    )
