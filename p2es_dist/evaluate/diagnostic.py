"""Diagnostic value: one fixed 12-lead classifier applied to recorded and to generated ECGs of the same windows.

Per label of `constants.LABELS`, on the labelled windows only (a window with an empty label set is
"unknown", e.g. BIDMC, and skipped), and only for labels with at least one positive among them:
sensitivity, specificity, precision and F1 at a fixed probability threshold (0.5), and AUROC
(scikit-learn's `roc_auc_score`: a tie between a positive and a negative counts one half).

The recorded ECG is scored with its recorded-lead mask; the generated ECG is scored as the 12-lead
ECG the model outputs (all leads present), which is what a reader of the generated ECG would see.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from p2es_dist.constants import LABELS

THRESHOLD = 0.5


def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve; None without both classes (scikit-learn would raise)."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    if targets.all() or not targets.any():
        return None
    return float(roc_auc_score(targets, scores))


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def binary_metrics(probabilities: np.ndarray, targets: np.ndarray, *, threshold: float = THRESHOLD) -> dict:
    """Sensitivity, specificity, precision, F1 (at `threshold`), AUROC, and the counts behind them."""
    targets = np.asarray(targets, bool)
    predicted = np.asarray(probabilities, np.float64) >= threshold
    tp = int((predicted & targets).sum())
    fp = int((predicted & ~targets).sum())
    fn = int((~predicted & targets).sum())
    tn = int((~predicted & ~targets).sum())
    sensitivity, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": auroc(probabilities, targets),
        "n_pos": tp + fn,
        "n": len(targets),
    }


def label_metrics(probabilities: np.ndarray, labels: np.ndarray, *, threshold: float = THRESHOLD) -> dict:
    """{label: binary_metrics} over labelled windows, for labels with >= 1 positive among them."""
    labels = np.asarray(labels) > 0.5
    labelled = labels.any(axis=1)
    probabilities, labels = np.asarray(probabilities)[labelled], labels[labelled]
    return {name: binary_metrics(probabilities[:, k], labels[:, k], threshold=threshold)
            for k, name in enumerate(LABELS) if labels[:, k].any()}


def classify(classifier, ecg: np.ndarray, ecg_mask: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """(n, 13) probabilities of an ECGClassifier on model-space (n, 12, L) ECGs."""
    import torch

    out = []
    for lo in range(0, len(ecg), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(ecg[lo : lo + batch_size], dtype=np.float32))
        m = torch.from_numpy(np.ascontiguousarray(ecg_mask[lo : lo + batch_size], dtype=bool))
        out.append(classifier.predict_proba(x, m).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)


def diagnostic_summary(labels: np.ndarray) -> dict:
    """How many windows carry labels; the rest are unknown and skipped."""
    labelled = (np.asarray(labels) > 0.5).any(axis=1)
    return {"threshold": THRESHOLD, "n_labelled": int(labelled.sum()), "n_unlabelled": int((~labelled).sum())}
