"""Linear probes on frozen foundation-encoder features: how much diagnosis the embedding carries.

    run_probe(encoder_uri="out/pretrain", train_data=["s3://p2es/ptbxl"], data=["s3://p2es/ptbxl"],
              labels=["MI", "NORM"], out="out/probe")

For each label: encoder features of the `train_split` windows of `train_data` -> an L2-regularised
logistic regression on standardised features (scikit-learn, L-BFGS in float64) -> AUROC on the `split`
windows of `data`. Features are `Encoder.channel_embed` by default (each channel's tokens averaged over
time, so a probe can weigh the leads where an MI shows) or `Encoder.embed` (`features="mean"`). The
L2 strength is picked from `L2_GRID` by subject-grouped cross-validation on the training windows only.
The same is done with a randomly initialised encoder of the same config (seeded), the floor that
pretraining must beat. Held-out AUROCs carry 95 % intervals from a subject-level bootstrap, also for the
paired gain over the floor: a few dozen positives leave AUROC uncertain by about +-0.1.
The pass over the evaluation windows also measures masked-lead reconstruction from lead II
(`reconstruction.py`).

Windows are read straight from the shards with pyarrow (no Ray); `max_windows` takes the first
windows of each split in shard order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, PredefinedSplit, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from p2es_dist.constants import LABEL_INDEX, LABELS
from p2es_dist.errors import UserError
from p2es_dist.evaluate.diagnostic import auroc
from p2es_dist.models.base import Batch, count_parameters
from p2es_dist.storage import uri as uri_lib

WINDOW_COLUMNS = ["subject_id", "ppg", "ecg", "ecg_mask", "age", "sex", "labels"]


# --- windows -----------------------------------------------------------------------------------------
def window_batches(uris: Sequence[str], split: str, *, max_windows: int | None = None,
                   batch_size: int = 64) -> Iterator[Batch]:
    """Model-space torch batches of one split (`all` for every window), read with pyarrow, in shard order."""
    from p2es_dist.data.batches import table_to_batch
    from p2es_dist.data.read import iter_tables

    for table in iter_tables(list(uris), WINDOW_COLUMNS, split=split, limit=max_windows, batch_size=batch_size):
        yield {key: torch.from_numpy(np.array(value)) for key, value in table_to_batch(table).items()}


# --- logistic regression ---------------------------------------------------------------------------
class LogisticProbe(ClassifierMixin, BaseEstimator):
    """Standardised features -> L2-regularised logistic regression (scikit-learn, L-BFGS in float64).

    Minimises mean binary cross-entropy + l2 / 2 * ||w||^2 on features scaled to zero mean and unit
    (population) variance; the bias is not penalised. scikit-learn's lbfgs solver minimises
    mean loss + 1 / (2 * C * n) * ||w||^2 over n training windows, so C = 1 / (l2 * n): `l2` keeps its
    meaning whatever the number of windows (a fold's training part or the whole training split).
    """

    def __init__(self, *, l2: float = 1e-2, max_iter: int = 200) -> None:
        self.l2 = l2
        self.max_iter = max_iter

    def fit(self, features: np.ndarray, targets: np.ndarray) -> LogisticProbe:
        x = np.asarray(features, np.float64)
        regression = LogisticRegression(C=1.0 / (self.l2 * len(x)), tol=1e-9, max_iter=self.max_iter)
        self.model_ = make_pipeline(StandardScaler(), regression).fit(x, targets)
        self.classes_ = self.model_.classes_
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        return self.model_.decision_function(np.asarray(features, np.float64))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.asarray(features, np.float64))

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(positive) per window (a 1-D array, unlike scikit-learn's two columns)."""
        return self.model_.predict_proba(np.asarray(features, np.float64))[:, 1]


L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_L2 = 1e-2  # when the training windows have too few subjects of each class to cross-validate
CV_FOLDS = 5
FEATURES = {"channels": "channel_embed", "mean": "embed"}


def subject_folds(subjects: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per window; every window of a subject lands in the same fold (shuffled GroupKFold)."""
    fold = np.empty(len(subjects), dtype=np.int64)
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(subjects, groups=subjects)):
        fold[held] = k
    return fold


def select_l2(x: np.ndarray, y: np.ndarray, subjects: np.ndarray, *, seed: int = 0) -> tuple[float, float | None]:
    """(l2, its out-of-fold AUROC) from L2_GRID by subject-grouped CV; (DEFAULT_L2, None) when a fold's
    training part lacks a class or there are fewer subjects than folds.

    The out-of-fold scores of all folds are pooled into one AUROC rather than averaging per-fold AUROCs
    as GridSearchCV would: a fold's held-out windows may hold a single class, which has no AUROC.
    """
    if len(np.unique(subjects)) < CV_FOLDS:
        return DEFAULT_L2, None
    fold = subject_folds(subjects, CV_FOLDS, seed)
    if any(np.ptp(y[fold != k]) == 0 for k in range(CV_FOLDS)):
        return DEFAULT_L2, None

    def out_of_fold_auroc(l2: float) -> float:
        scores = cross_val_predict(LogisticProbe(l2=l2), x, y, cv=PredefinedSplit(fold), method="decision_function")
        return auroc(scores, y)  # both classes are present: every fold's training part has them

    cv = {l2: out_of_fold_auroc(l2) for l2 in L2_GRID}
    best = max(L2_GRID, key=cv.__getitem__)  # the first of equals
    return best, cv[best]


def bootstrap_intervals(pretrained: np.ndarray, random_init: np.ndarray, y: np.ndarray, subjects: np.ndarray, *,
                        resamples: int = 1000, seed: int = 0) -> dict[str, list[float] | None]:
    """95 % percentile intervals of both AUROCs and of their paired difference; subjects are resampled
    with replacement (all of a drawn subject's windows come along). None where a class comes from fewer
    than two subjects: resampling one subject says nothing about others."""
    y, subjects = np.asarray(y).astype(bool), np.asarray(subjects)
    none = {"auroc_ci95": None, "auroc_random_init_ci95": None, "auroc_gain_ci95": None}
    unique, inverse = np.unique(subjects, return_inverse=True)
    if min(len(np.unique(subjects[y])), len(np.unique(subjects[~y]))) < 2:
        return none
    rng = np.random.default_rng(seed)
    draws: list[tuple[float, float]] = []
    for _ in range(resamples):
        counts = np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
        index = np.repeat(np.arange(len(y)), counts[inverse])
        a, b = auroc(pretrained[index], y[index]), auroc(random_init[index], y[index])
        if a is not None and b is not None:  # resamples that miss a class are skipped
            draws.append((a, b))
    if not draws:
        return none
    values = np.array(draws)

    def interval(column: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(column, [2.5, 97.5])]

    return {"auroc_ci95": interval(values[:, 0]), "auroc_random_init_ci95": interval(values[:, 1]),
            "auroc_gain_ci95": interval(values[:, 0] - values[:, 1])}


def probe_label(train: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray],
                held_out: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray], *, seed: int = 0,
                bootstrap: int = 1000) -> dict[str, Any]:
    """One label: (features per encoder, 0/1 targets, subjects) of each side -> the label's probe block."""
    (train_x, train_y, train_subjects), (eval_x, eval_y, eval_subjects) = train, held_out
    block: dict[str, Any] = {"n": int(len(eval_y)), "n_pos": int(eval_y.sum()),
                             "n_train": int(len(train_y)), "n_train_pos": int(train_y.sum())}
    if np.ptp(train_y) == 0 or np.ptp(eval_y) == 0:
        return {"auroc": None, "auroc_random_init": None, **block}
    scores = {}
    for name, suffix in (("pretrained", ""), ("random_init", "_random_init")):
        l2, block[f"cv_auroc{suffix}"] = select_l2(train_x[name], train_y, train_subjects, seed=seed)
        scores[name] = LogisticProbe(l2=l2).fit(train_x[name], train_y).decision_function(eval_x[name])
        block[f"l2{suffix}"], block[f"auroc{suffix}"] = l2, auroc(scores[name], eval_y)
    return {**block, **bootstrap_intervals(scores["pretrained"], scores["random_init"], eval_y, eval_subjects,
                                           resamples=bootstrap, seed=seed)}


# --- the probe job -----------------------------------------------------------------------------------
def _features(encoders: dict[str, Any], method: str, uris: Sequence[str], split: str, max_windows: int | None,
              on_batch=None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    features: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    labels: list[np.ndarray] = []
    subjects: list[np.ndarray] = []
    for batch in window_batches(uris, split, max_windows=max_windows):
        for name, encoder in encoders.items():
            features[name].append(getattr(encoder, method)(batch).numpy())
        labels.append(batch["labels"].numpy())
        subjects.append(batch["subject"].numpy())
        if on_batch is not None:
            on_batch(batch)
    if not labels:
        raise UserError(f"{', '.join(uris)}: no windows in split {split!r} (check --split / the shards' manifest)")
    return ({name: np.concatenate(parts) for name, parts in features.items()}, np.concatenate(labels),
            np.concatenate(subjects))


def update_metrics(out: str, block: dict[str, Any]) -> dict[str, Any]:
    """Merge top-level keys into out/metrics.json (other jobs' keys stay) and return the whole file."""
    path = uri_lib.join(out, "metrics.json")
    metrics = json.loads(uri_lib.read_text(path)) if uri_lib.exists(path) else {}
    metrics.update(block)
    uri_lib.write_text_atomic(path, json.dumps(metrics, indent=2))
    return metrics


def run_probe(*, encoder_uri: str, train_data: list[str], data: list[str], labels: list[str], out: str,
              split: str = "test", train_split: str = "train", features: str = "channels", seed: int = 0,
              bootstrap: int = 1000, max_windows: int | None = None) -> dict[str, Any]:
    """Linear-probe AUROC per label (pretrained vs. random-init encoder); writes out/metrics.json."""
    from p2es_dist.evaluate.reconstruction import LeadMeans, ReconstructionErrors
    from p2es_dist.models import build_model
    from p2es_dist.models.checkpoint import load_model

    unknown = [label for label in labels if label not in LABEL_INDEX]
    if unknown or not labels:
        raise UserError(f"--labels: expected some of {', '.join(LABELS)}, got {','.join(labels) or 'nothing'}")
    if features not in FEATURES:
        raise UserError(f"--probe-features: expected one of {', '.join(FEATURES)}, got {features!r}")
    loaded = load_model(encoder_uri)
    if loaded.name != "encoder":
        raise UserError(f"--encoder {encoder_uri}: holds a {loaded.name!r} model, expected a pretrained encoder "
                        "(the --out folder of `p2es pretrain`)")
    torch.manual_seed(seed)
    random_init = build_model(loaded.model_config).eval()
    encoders = {"pretrained": loaded.model, "random_init": random_init}
    method = FEATURES[features]

    lead_means = LeadMeans()
    train_x, train_y, train_subjects = _features(encoders, method, train_data, train_split, max_windows,
                                                 on_batch=lead_means.update)
    errors = ReconstructionErrors(given=("II",), baseline=lead_means.means())
    eval_x, eval_y, eval_subjects = _features(encoders, method, data, split, max_windows,
                                              on_batch=lambda batch: errors.update(batch, loaded.model))

    probe = {label: probe_label((train_x, train_y[:, LABEL_INDEX[label]], train_subjects),
                                (eval_x, eval_y[:, LABEL_INDEX[label]], eval_subjects), seed=seed,
                                bootstrap=bootstrap)
             for label in labels}
    grid = ", ".join(f"{l2:g}" for l2 in L2_GRID)
    result = {
        "probe": probe,
        "encoder": {"uri": loaded.uri, "params": count_parameters(loaded.model), "width": loaded.model.width,
                    "digest": loaded.digest},
        "probe_data": {"train": {"uri": list(train_data), "split": train_split, "n_windows": int(len(train_y))},
                       "eval": {"uri": list(data), "split": split, "n_windows": int(len(eval_y))},
                       "seed": seed, "features": f"{features} (Encoder.{method})",
                       "classifier": f"L2 logistic regression on standardised Encoder.{method} features; l2 from "
                                     f"{{{grid}}} by {CV_FOLDS}-fold subject-grouped CV on the training windows, "
                                     "per label and encoder",
                       "intervals": f"95 % subject-level bootstrap ({bootstrap} resamples) of the held-out windows"},
        "reconstruction": errors.result(split=split),
    }
    update_metrics(out, result)
    return result
