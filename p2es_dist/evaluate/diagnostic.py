"""Diagnostic value: one fixed 12-lead classifier applied to three ECGs of the same windows.

- **recorded**: the recorded ECG with its recorded-lead mask: what the full recording tells the classifier;
- **generated**: the model's 12-lead output, every lead present: what a reader of the generated ECG sees;
- **input_only**: the recorded ECG with only the model's input leads unmasked (`--condition` leads that
  were recorded; the others zeroed): what the classifier gets without the model at all. A PPG-conditioned
  model has no input ECG: nothing is unmasked, so the classifier outputs one constant, its label prior,
  and input-only is the chance floor (AUROC 0.5 by construction).

Generated ECG is worth something diagnostically only where it beats input-only; it is faithful where it
is indistinguishable from recorded. Per label of `constants.LABELS`, on the labelled windows only (a
window with an empty label set is "unknown", e.g. BIDMC, and skipped), for labels with at least one
positive among them: AUROC (scikit-learn's `roc_auc_score`: a tie between a positive and a negative
counts one half) and AUPRC (`average_precision_score`), threshold-free; and sensitivity, specificity,
precision and F1 at the classifier's stored per-label threshold (chosen on its validation windows,
`evaluate/thresholds.py`), None when it has none. AUROCs and the paired differences generated -
input-only and generated - recorded carry 95 % percentile intervals from a subject-level bootstrap.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from p2es_dist.constants import LABELS

VARIANTS = ("recorded", "generated", "input_only")
DIFFERENCES = {"generated_minus_input_only": ("generated", "input_only"),
               "generated_minus_recorded": ("generated", "recorded")}
_CHUNK = 128  # bootstrap replicates scored at once: (chunk, n windows) float64 weights


def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve; None without both classes (scikit-learn would raise)."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    if targets.all() or not targets.any():
        return None
    return float(roc_auc_score(targets, scores))


def auprc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Average precision (scikit-learn's step-wise area under precision-recall); None without both classes."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    if targets.all() or not targets.any():
        return None
    return float(average_precision_score(targets, scores))


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def binary_metrics(probabilities: np.ndarray, targets: np.ndarray, *, threshold: float | None = 0.5) -> dict:
    """Sensitivity, specificity, precision, F1 at `threshold` (all None for None), AUROC, AUPRC, counts.

    The evaluation always passes the classifier's stored validation threshold (or None), never the default."""
    targets = np.asarray(targets, bool)
    probabilities = np.asarray(probabilities, np.float64)
    out = {"sensitivity": None, "specificity": None, "precision": None, "f1": None,
           "auroc": auroc(probabilities, targets), "auprc": auprc(probabilities, targets),
           "threshold": None if threshold is None else float(threshold),
           "n_pos": int(targets.sum()), "n": len(targets)}
    if threshold is not None:
        predicted = probabilities >= threshold
        tp = int((predicted & targets).sum())
        fp = int((predicted & ~targets).sum())
        fn = int((~predicted & targets).sum())
        tn = int((~predicted & ~targets).sum())
        out.update(sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp), precision=_ratio(tp, tp + fp),
                   f1=_ratio(2 * tp, 2 * tp + fp + fn))
    return out


def labelled_rows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bool rows with at least one label, (n_labelled, 13) bool labels of those rows)."""
    labels = np.asarray(labels) > 0.5
    labelled = labels.any(axis=1)
    return labelled, labels[labelled]


def label_metrics(probabilities: np.ndarray, labels: np.ndarray, *,
                  thresholds: dict[str, float] | None = None) -> dict:
    """{label: binary_metrics} over labelled windows, for labels with >= 1 positive among them; a label's
    threshold comes from `thresholds` (None: threshold-dependent figures are None)."""
    labelled, targets = labelled_rows(labels)
    probabilities = np.asarray(probabilities)[labelled]
    thresholds = thresholds or {}
    return {name: binary_metrics(probabilities[:, k], targets[:, k], threshold=thresholds.get(name))
            for k, name in enumerate(LABELS) if targets[:, k].any()}


def subject_counts(subjects: np.ndarray, *, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """((n_boot, n_subjects) draw counts, (n,) subject index of each window): each replicate draws the
    subjects with replacement, exactly as `probe.bootstrap_intervals` does (same generator calls)."""
    unique, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
                       for _ in range(n_boot)]) if n_boot > 0 else np.zeros((0, len(unique)), np.int64)
    return counts.astype(np.float64), inverse.reshape(-1)


def weighted_auroc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) AUROC of one score vector under B rows of window weights (B, n): the Mann-Whitney statistic
    with each window counted `weight` times, ties one half; equal to `roc_auc_score` on the windows
    repeated that often. NaN where a replicate lacks a class."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.concatenate([[0], np.nonzero(np.diff(sorted_scores))[0] + 1])  # groups of tied scores
    w = weights[:, order]
    positive = np.add.reduceat(np.where(targets[order], w, 0.0), starts, axis=1)
    negative = np.add.reduceat(np.where(targets[order], 0.0, w), starts, axis=1)
    below = np.cumsum(negative, axis=1) - negative
    numerator = np.sum(positive * (below + 0.5 * negative), axis=1)
    denominator = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = 100.0 * (1.0 - level) / 2.0
    return [float(v) for v in np.percentile(values, [tail, 100.0 - tail])]


def paired_auroc_intervals(scores: dict[str, np.ndarray], targets: np.ndarray, subjects: np.ndarray, *,
                           n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile intervals of each variant's AUROC and of every difference of `DIFFERENCES` whose two
    variants are in `scores`, from one set of subject resamples (so the differences are paired).

    Replicates that miss a class are skipped; every interval is None where a class comes from fewer than
    two subjects (resampling one subject says nothing about others), as in `probe.bootstrap_intervals`.
    """
    targets, subjects = np.asarray(targets, bool), np.asarray(subjects)
    names = [*scores, *[d for d, (a, b) in DIFFERENCES.items() if a in scores and b in scores]]
    none = dict.fromkeys(names)
    if n_boot <= 0 or min(len(np.unique(subjects[targets])), len(np.unique(subjects[~targets]))) < 2:
        return none
    counts, inverse = subject_counts(subjects, n_boot=n_boot, seed=seed)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in scores}
    for lo in range(0, n_boot, _CHUNK):
        weights = counts[lo : lo + _CHUNK][:, inverse]
        for name, values in scores.items():
            draws[name].append(weighted_auroc(values, targets, weights))
    replicates = {name: np.concatenate(parts) for name, parts in draws.items()}
    kept = np.isfinite(next(iter(replicates.values())))  # the same replicates miss a class for every variant
    if not kept.any():
        return none
    out: dict[str, list[float] | None] = {name: _interval(values[kept], level) for name, values in replicates.items()}
    for name, (a, b) in DIFFERENCES.items():
        if a in scores and b in scores:
            out[name] = _interval((replicates[a] - replicates[b])[kept], level)
    return out


def compare(probabilities: dict[str, np.ndarray], labels: np.ndarray, subjects: np.ndarray, *,
            thresholds: dict[str, float] | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """The `diagnostic` section of one model: {variant: label table} for each of `probabilities` (keys
    among VARIANTS), each label's `auroc_ci95`, and `differences` {label: {difference: {auroc, ci95}}}."""
    labelled, targets = labelled_rows(labels)
    subjects = np.asarray(subjects)[labelled]
    section: dict = {name: label_metrics(values, labels, thresholds=thresholds)
                     for name, values in probabilities.items()}
    section["differences"] = {}
    for k, label in enumerate(LABELS):
        if not targets[:, k].any():
            continue
        scores = {name: np.asarray(values, np.float64)[labelled, k] for name, values in probabilities.items()}
        intervals = paired_auroc_intervals(scores, targets[:, k], subjects, n_boot=n_boot, seed=seed)
        for name in probabilities:
            section[name][label]["auroc_ci95"] = intervals[name]
        differences = {}
        for difference, (a, b) in DIFFERENCES.items():
            if a in probabilities and b in probabilities:
                first, second = section[a][label]["auroc"], section[b][label]["auroc"]
                differences[difference] = {"auroc": None if first is None or second is None else first - second,
                                           "ci95": intervals[difference]}
        section["differences"][label] = differences
    return section


def verdict(difference: dict | None) -> str | None:
    """"higher" / "lower" when the interval excludes 0, "indistinguishable" when it contains it, None
    without an interval."""
    if not difference or difference.get("ci95") is None or difference.get("auroc") is None:
        return None
    low, high = difference["ci95"]
    return "higher" if low > 0 else "lower" if high < 0 else "indistinguishable"


def input_only_view(ecg: np.ndarray, recorded_mask: np.ndarray,
                    input_leads: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ECG with every lead but the recorded input leads zeroed, that (n, 12) mask). `input_leads` (n, 12)
    or (12,) bool; None (a PPG-conditioned model): nothing is unmasked."""
    recorded_mask = np.asarray(recorded_mask, bool)
    if input_leads is None:
        mask = np.zeros_like(recorded_mask)
    else:
        mask = recorded_mask & np.broadcast_to(np.asarray(input_leads, bool), recorded_mask.shape)
    return np.where(mask[:, :, None], ecg, 0.0).astype(np.float32), mask


def input_only_probabilities(classifier, ecg: np.ndarray, recorded_mask: np.ndarray,
                             input_leads: np.ndarray | None) -> np.ndarray:
    """(n, 13) classifier probabilities on the input leads alone (`input_only_view`).

    A window with no recorded input lead shows the classifier nothing: it gets the classifier's output on
    an empty window, computed once, so every such window scores exactly the same (batched convolutions
    would differ in the last bits and order them at random, faking an AUROC away from 0.5)."""
    view, mask = input_only_view(ecg, recorded_mask, input_leads)
    empty = ~mask.any(axis=1)
    out = np.empty((len(view), len(LABELS)), np.float32)
    if empty.any():
        out[empty] = classify(classifier, np.zeros((1, *view.shape[1:]), np.float32), mask[:1] & False)[0]
    if (~empty).any():
        out[~empty] = classify(classifier, view[~empty], mask[~empty])
    return out


def classify(classifier, ecg: np.ndarray, ecg_mask: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """(n, 13) probabilities of an ECGClassifier on model-space (n, 12, L) ECGs."""
    return _batched(classifier.predict_proba, ecg, ecg_mask, batch_size, len(LABELS))


def classifier_features(classifier, ecg: np.ndarray, ecg_mask: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """(n, D) pooled features (before the head) of an ECGClassifier: `fd` without a foundation encoder."""
    return _batched(classifier.features, ecg, ecg_mask, batch_size, None)


def _batched(method, ecg: np.ndarray, ecg_mask: np.ndarray, batch_size: int, width: int | None) -> np.ndarray:
    import torch

    out = []
    for lo in range(0, len(ecg), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(ecg[lo : lo + batch_size], dtype=np.float32))
        m = torch.from_numpy(np.ascontiguousarray(ecg_mask[lo : lo + batch_size], dtype=bool))
        out.append(method(x, m).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, width or 0), np.float32)


def diagnostic_summary(labels: np.ndarray) -> dict:
    """How many windows carry labels; the rest are unknown and skipped."""
    labelled = (np.asarray(labels) > 0.5).any(axis=1)
    return {"n_labelled": int(labelled.sum()), "n_unlabelled": int((~labelled).sum())}
