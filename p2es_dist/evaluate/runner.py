"""Evaluate one model over a table of windows, and turn its per-window results into the metrics.json dict.

    reference = compute_reference(table, config, classifier=clf, encoder=enc)    # recorded side, once
    run = run_model("p2es", loaded, table, reference, config, classifier=clf, encoder=enc)
    section = summarise(run, reference, config)                                   # JSON-ready

Everything is kept per window (metrics per lead, heart rate, classifier probabilities, encoder features),
so the model and every baseline are scored on the same windows and aggregated the same way.
Stochastic models draw their noise with seed `generation.seed + first row of the batch`, so a batch
(and therefore a window) regenerates identically for the figures.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from p2es_dist.constants import LEAD_INDEX, LEADS, SEX_FEMALE, SEX_MALE
from p2es_dist.data.batches import labels_multi_hot
from p2es_dist.data.normalize import minmax_per_lead
from p2es_dist.evaluate import diagnostic, metrics
from p2es_dist.evaluate.windows import iter_batches, target_mask, to_torch
from p2es_dist.models.base import GenerationOptions, TranslationModel

SPACES = ("window", "minmax")
AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<40", 0.0, 40.0), ("40-59", 40.0, 60.0), ("60-79", 60.0, 80.0), ("80+", 80.0, float("inf")),
)


@dataclass
class EvalConfig:
    data: list[str] = field(default_factory=list)
    split: str = "test"
    max_windows: int | None = None
    batch_size: int = 32
    condition: list[str] = field(default_factory=list)  # leads given as input instead of PPG
    generation: GenerationOptions = field(default_factory=GenerationOptions)  # sampler fields: stochastic models
    n_boot: int = 1000
    with_dtw: bool = True
    worst_k: int = 5
    progress: bool = True
    protocol: str = "zero-shot"  # or "calibrated" (evaluate/templates.py)
    calibration_s: float = 60.0
    population: Any = None  # the training population's CalibrationProfile, set by the pipeline
    thresholds: dict[str, float] | None = None  # the classifier's stored validation thresholds, set by the pipeline


@dataclass
class Reference:
    """The recorded side of every window, computed once for all models."""

    window_ids: list[str]
    subjects: np.ndarray  # (n,) subject_id strings
    age: np.ndarray  # (n,) NaN unknown
    sex: np.ndarray  # (n,) 0/1/-1
    labels: np.ndarray  # (n, 13) multi-hot
    recorded_mask: np.ndarray  # (n, 12)
    mask: np.ndarray  # (n, 12) the leads scored: recorded and not a model input
    hr: np.ndarray  # (n,) bpm of recorded lead II, NaN when not recorded or too few peaks
    probabilities: np.ndarray | None = None  # (n, 13) classifier on the recorded ECG
    input_probabilities: np.ndarray | None = None  # (n, 13) classifier on the model's input leads alone
    features: np.ndarray | None = None  # (n, D) encoder (or classifier) features of the recorded ECG
    fd_features: str | None = None  # "encoder" or "classifier": where `features` come from


@dataclass
class ModelRun:
    name: str
    loaded: Any  # models.checkpoint.LoadedModel
    per_window: dict[str, dict[str, np.ndarray]]  # space -> metric -> (n, 12)
    hr: np.ndarray
    generation: dict[str, Any]
    seconds: float
    probabilities: np.ndarray | None = None
    features: np.ndarray | None = None


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    # Not a terminal (`ray job submit`, a log file): still report, but every 30 s instead of redrawing a bar.
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=interactive,
                mininterval=0.1 if interactive else 30.0)


def _n_batches(table: pa.Table, config: EvalConfig) -> int:
    return -(-len(table) // config.batch_size)


def _lead_ii_mv(ecg: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    return ecg[:, LEAD_INDEX["II"]] * batch["scale"][:, None]


def _embed(encoder, batch: dict[str, np.ndarray], ecg: np.ndarray) -> np.ndarray:
    # Contracts section 2: ECG only (PPG masked out), the recorded lead mask for both sides.
    view = {key: value for key, value in batch.items() if key != "cond_leads"}
    view.update(ecg=ecg.astype(np.float32), ppg=np.zeros_like(batch["ppg"]),
                ppg_mask=np.zeros_like(batch["ppg_mask"]))
    with torch.no_grad():
        return encoder.embed(to_torch(view)).float().numpy()


def _input_leads(batch: dict[str, np.ndarray], config: EvalConfig) -> np.ndarray | None:
    """(B, 12) leads handed to the model as input; None for a PPG-conditioned model (no input ECG)."""
    if "cond_leads" in batch:
        return batch["cond_leads"].astype(bool)
    return np.isin(np.array(LEADS), config.condition) if config.condition else None


def _features(batch: dict[str, np.ndarray], ecg: np.ndarray, *, encoder, classifier) -> np.ndarray | None:
    """Learned features of `ecg` for fd, both sides with the recorded lead mask: the foundation encoder's
    when given, else the classifier's pooled features, else None."""
    if encoder is not None:
        return _embed(encoder, batch, ecg)
    if classifier is not None:
        return diagnostic.classifier_features(classifier, ecg, batch["ecg_mask"])
    return None


def compute_reference(table: pa.Table, config: EvalConfig, *, classifier=None, encoder=None) -> Reference:
    """Recorded-side quantities of every window: scored-lead mask, lead II heart rate, classifier on the
    recorded ECG and on its input leads alone, features."""
    masks, recorded, hr, probabilities, inputs, features = [], [], [], [], [], []
    batches = iter_batches(table, batch_size=config.batch_size, condition=config.condition,
                           protocol=config.protocol, population=config.population)
    for _, batch in _progress(batches, total=_n_batches(table, config), desc="recorded", enabled=config.progress):
        masks.append(target_mask(batch))
        recorded.append(batch["ecg_mask"])
        rates = metrics.heart_rates(_lead_ii_mv(batch["ecg"], batch))
        hr.append(np.where(batch["ecg_mask"][:, LEAD_INDEX["II"]], rates, np.nan))
        if classifier is not None:
            probabilities.append(diagnostic.classify(classifier, batch["ecg"], batch["ecg_mask"]))
            inputs.append(diagnostic.input_only_probabilities(classifier, batch["ecg"], batch["ecg_mask"],
                                                              _input_leads(batch, config)))
        features.append(_features(batch, batch["ecg"], encoder=encoder, classifier=classifier))
    return Reference(
        window_ids=table.column("window_id").to_pylist(),
        subjects=np.array(table.column("subject_id").to_pylist(), dtype=object),
        age=np.asarray(table.column("age").to_numpy(zero_copy_only=False), dtype=np.float64),
        sex=table.column("sex").to_numpy().astype(np.int64),
        labels=labels_multi_hot(table.column("labels")),
        recorded_mask=np.concatenate(recorded), mask=np.concatenate(masks), hr=np.concatenate(hr),
        probabilities=np.concatenate(probabilities) if probabilities else None,
        input_probabilities=np.concatenate(inputs) if inputs else None,
        features=np.concatenate(features) if features and features[0] is not None else None,
        fd_features="encoder" if encoder is not None else "classifier" if classifier is not None else None,
    )


def generation_settings(model: TranslationModel, generation: GenerationOptions) -> tuple[GenerationOptions,
                                                                                         dict[str, Any]]:
    """(the options with the model's defaults filled in, the settings recorded in metrics.json).

    A deterministic model records `stochastic: false` and sampler/steps None, whatever was asked.
    """
    resolved = model.generation_options(generation)
    return resolved, {"stochastic": model.stochastic, **resolved.as_dict()}


def generate(model: TranslationModel, batch: dict[str, np.ndarray], *, first_row: int,
             options: GenerationOptions) -> np.ndarray:
    """(B, 12, L) model-space float32 ECG; the seed is `options.seed` + the batch's first row."""
    with torch.no_grad():
        out = model.generate(to_torch(batch), options.with_seed(options.seed + first_row))
    return out.float().numpy()


def run_model(name: str, loaded, table: pa.Table, reference: Reference, config: EvalConfig, *,
              classifier=None, encoder=None) -> ModelRun:
    model = loaded.model.eval()
    options, settings = generation_settings(model, config.generation)
    per_window: dict[str, dict[str, list]] = {space: {m: [] for m in metrics.METRICS} for space in SPACES}
    hr, probabilities, features, seconds = [], [], [], 0.0
    batches = iter_batches(table, batch_size=config.batch_size, condition=config.condition,
                           protocol=config.protocol, population=config.population)
    for lo, batch in _progress(batches, total=_n_batches(table, config), desc=name, enabled=config.progress):
        started = time.perf_counter()
        generated = generate(model, batch, first_row=lo, options=options)
        seconds += time.perf_counter() - started
        mask = reference.mask[lo : lo + len(generated)]
        spaces = {"window": (batch["ecg"], generated),
                  "minmax": (minmax_per_lead(batch["ecg"]), minmax_per_lead(generated))}
        for space, (target, prediction) in spaces.items():
            values = metrics.window_metrics(target, prediction, mask, with_dtw=config.with_dtw)
            if space == "minmax":  # 1 by construction there (`metrics.METRICS`)
                values["amp_ratio"] = np.full_like(values["amp_ratio"], np.nan)
            for metric, array in values.items():
                per_window[space][metric].append(array)
        hr.append(metrics.heart_rates(_lead_ii_mv(generated, batch)))
        if classifier is not None:
            # The generated ECG is a full 12-lead ECG: scored with every lead present.
            probabilities.append(diagnostic.classify(classifier, generated, np.ones_like(batch["ecg_mask"])))
        features.append(_features(batch, generated, encoder=encoder, classifier=classifier))
    return ModelRun(
        name=name, loaded=loaded, generation=settings, seconds=seconds, hr=np.concatenate(hr),
        per_window={s: {m: np.concatenate(v) for m, v in values.items()} for s, values in per_window.items()},
        probabilities=np.concatenate(probabilities) if probabilities else None,
        features=np.concatenate(features) if features and features[0] is not None else None,
    )


def window_overall(run: ModelRun, metric: str = "mse", space: str = "window") -> np.ndarray:
    """(n,) per-window mean over scored leads (NaN for windows with no scored lead)."""
    return metrics.nanmean(run.per_window[space][metric], axis=1)


def _group_overall(run: ModelRun, rows: np.ndarray, reference: Reference) -> dict:
    section: dict[str, Any] = {"n_windows": int(rows.sum()), "n_subjects": len(set(reference.subjects[rows]))}
    for metric in metrics.METRICS:
        lead_means = metrics.nanmean(run.per_window["window"][metric][rows], axis=0)
        section[metric] = metrics.as_number(metrics.nanmean(lead_means[None, :], axis=1)[0]) if rows.any() else None
    return section


def breakdown(run: ModelRun, reference: Reference) -> dict:
    """Overall window-space metrics per age band and per sex (point estimates, no intervals)."""
    age, sex = reference.age, reference.sex
    age_groups = {name: (age >= lo) & (age < hi) for name, lo, hi in AGE_BANDS}
    age_groups["unknown"] = ~np.isfinite(age)
    sex_groups = {"female": sex == SEX_FEMALE, "male": sex == SEX_MALE,
                  "unknown": (sex != SEX_FEMALE) & (sex != SEX_MALE)}
    return {"age": {k: _group_overall(run, v, reference) for k, v in age_groups.items() if v.any()},
            "sex": {k: _group_overall(run, v, reference) for k, v in sex_groups.items() if v.any()}}


def worst_subjects(run: ModelRun, reference: Reference, k: int) -> list[dict]:
    """The k subjects with the highest mean per-window window-space MSE."""
    mse, pearson = window_overall(run, "mse"), window_overall(run, "pearson")
    rows = []
    for subject in sorted(set(reference.subjects)):
        mine = (reference.subjects == subject) & np.isfinite(mse)
        if mine.any():
            rows.append({"subject_id": str(subject), "n_windows": int(mine.sum()),
                         "mse": float(np.mean(mse[mine])),
                         "pearson": metrics.as_number(metrics.nanmean(pearson[mine][None, :], axis=1)[0])})
    return sorted(rows, key=lambda row: -row["mse"])[:k]


def model_info(loaded) -> dict:
    state = loaded.model.state_dict()
    return {"name": loaded.name, "params": int(sum(p.numel() for p in loaded.model.parameters())),
            "bytes": int(sum(t.numel() * t.element_size() for t in state.values())),
            "uri": str(loaded.uri), "kind": loaded.kind, "digest": loaded.digest}


def fid_section(run: ModelRun, reference: Reference) -> tuple[float | None, str | None]:
    if run.features is None or reference.features is None:
        return None, ("neither --encoder nor --classifier given: fd needs learned features (the foundation "
                      "encoder's, else the classifier's pooled ones), never raw samples")
    if len(run.features) < 2:
        return None, "fewer than 2 windows: no covariance to fit"
    return metrics.frechet_distance(reference.features, run.features), None


def summarise(run: ModelRun, reference: Reference, config: EvalConfig) -> dict:
    """One model's section of metrics.json (the top level for the model, `baselines.<name>` for the others)."""
    n = len(reference.window_ids)
    spaces = {space: metrics.aggregate(run.per_window[space], reference.mask, reference.subjects,
                                       n_boot=config.n_boot, seed=config.generation.seed) for space in SPACES}
    hr = metrics.hr_agreement(reference.hr, run.hr, reference.subjects, n_boot=config.n_boot,
                              seed=config.generation.seed)
    fd, fd_note = fid_section(run, reference)
    section: dict[str, Any] = {
        "model": model_info(run.loaded), "generation": run.generation, "spaces": spaces,
        "hr_mae_bpm": hr["mae_bpm"], "hr_windows": hr["n_windows"], "hr": hr, "fd": fd,
        "fd_features": reference.fd_features if fd is not None else None,
        "fd_info": {"note": fd_note, "n": n if fd is not None else 0, "features": reference.fd_features,
                    "dim": int(run.features.shape[1]) if run.features is not None else None},
        "diagnostic": None, "breakdown": breakdown(run, reference),
        "worst_subjects": worst_subjects(run, reference, config.worst_k),
        "timing": {"windows_per_s": n / run.seconds if run.seconds > 0 else None, "generate_s": run.seconds,
                   "n_windows": n, "batch_size": config.batch_size},
    }
    if run.probabilities is not None and reference.probabilities is not None:
        variants = {"recorded": reference.probabilities, "generated": run.probabilities,
                    "input_only": reference.input_probabilities}
        section["diagnostic"] = diagnostic.compare(
            {name: values for name, values in variants.items() if values is not None}, reference.labels,
            reference.subjects, thresholds=config.thresholds, n_boot=config.n_boot, seed=config.generation.seed)
    return section
