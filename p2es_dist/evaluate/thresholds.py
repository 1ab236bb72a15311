"""Per-label decision thresholds of the diagnostic classifier, chosen on its validation windows only.

    thresholds = fit_thresholds(probabilities, labels)                 # {label: Youden-J threshold}
    doc = fit_classifier_thresholds("runs/clf", data=["shards/ptbxl"])  # writes <checkpoint>/thresholds.json
    stored = load_thresholds(loaded)                                    # what `p2es evaluate` uses, or None

A fixed 0.5 on a sigmoid says little for rare labels, and a threshold picked on the split being
evaluated flatters every figure that depends on it. So each label's threshold is the one that maximises
Youden's J = sensitivity + specificity - 1 on the classifier's *validation* windows (scored as they were
recorded, recorded-lead mask), written once as `thresholds.json` beside the classifier's
`model.safetensors`, together with the digest of those weights and the windows it came from. The
evaluation only reads it; it never fits one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from p2es_dist.constants import LABELS
from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib

log = logging.getLogger("p2es.thresholds")

THRESHOLDS_FILE = "thresholds.json"
METHOD = "youden_j"
# What is read to score a window: the conversion to model space needs these columns.
READ_COLUMNS = ["window_id", "split", "subject_id", "ppg", "ecg", "ecg_mask", "age", "sex", "labels"]


def youden_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float] | None:
    """(threshold, J) maximising Youden's J = TPR - FPR (scikit-learn's `roc_curve`); None without both
    classes. Predicting positive means score >= threshold. Of equal J, the highest threshold wins."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
    if targets.all() or not targets.any():
        return None
    fpr, tpr, thresholds = roc_curve(targets, scores)
    # thresholds[0] is +inf (nothing predicted positive, J = 0): never a usable threshold.
    j = (tpr - fpr)[1:]
    best = int(np.argmax(j))
    return float(thresholds[1:][best]), float(j[best])


def fit_thresholds(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """{label: {"threshold", "youden_j", "n_pos", "n"}} over the labelled windows (an empty label set is
    unknown, not negative), for labels with both classes among them."""
    labels = np.asarray(labels) > 0.5
    labelled = labels.any(axis=1)
    probabilities, labels = np.asarray(probabilities)[labelled], labels[labelled]
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(LABELS):
        fitted = youden_threshold(probabilities[:, k], labels[:, k])
        if fitted is not None:
            out[name] = {"threshold": fitted[0], "youden_j": fitted[1], "n_pos": int(labels[:, k].sum()),
                         "n": int(len(labels))}
    return out


def classifier_probabilities(classifier, uris: Sequence[str], *, split: str = "val",
                             max_windows: int | None = None, batch_size: int = 64,
                             option: str = "--data") -> tuple[np.ndarray, np.ndarray, int]:
    """(probabilities (n, 13), labels (n, 13), n) of `classifier` on the `split` windows of `uris`, each
    scored with its recorded-lead mask (how the classifier sees recorded ECG in the evaluation)."""
    from p2es_dist.data.loader import convert_block
    from p2es_dist.data.read import read_table
    from p2es_dist.evaluate.diagnostic import classify

    table = read_table(list(uris), READ_COLUMNS, split=split, subset=max_windows, option=option)
    if not len(table):
        raise UserError(f"{option} {','.join(uris)}: no windows in split {split!r} to choose thresholds on")
    probabilities, labels = [], []
    for lo in range(0, len(table), batch_size):
        batch = convert_block(table.slice(lo, batch_size))
        probabilities.append(classify(classifier, batch["ecg"].astype(np.float32), batch["ecg_mask"]))
        labels.append(batch["labels"])
    return np.concatenate(probabilities), np.concatenate(labels), len(table)


def thresholds_document(fitted: dict[str, dict[str, Any]], *, digest: str, uris: Sequence[str], split: str,
                        n_windows: int, max_windows: int | None) -> dict[str, Any]:
    return {"method": METHOD, "rule": "predict positive when probability >= threshold",
            "classifier_digest": digest, "data": list(uris), "split": split, "n_windows": n_windows,
            "max_windows": max_windows, "n_labelled": max((v["n"] for v in fitted.values()), default=0),
            "labels": fitted}


def fit_classifier_thresholds(classifier_uri: str, data: Sequence[str], *, split: str = "val",
                              max_windows: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Fit on `split` of `data` and write `thresholds.json` beside the classifier's weights; returns the
    document with `uri` (where it was written) added."""
    from p2es_dist.models.checkpoint import load_model

    if split not in ("val", "train"):
        raise UserError(f"thresholds are chosen on validation windows (or train), never on {split!r}: "
                        "that split may be the one evaluated")
    loaded = load_model(classifier_uri)
    if not hasattr(loaded.model, "predict_proba"):
        raise UserError(f"--classifier {classifier_uri}: model {loaded.name!r} is not a 'classifier'")
    probabilities, labels, n = classifier_probabilities(loaded.model.eval(), data, split=split,
                                                        max_windows=max_windows, batch_size=batch_size)
    fitted = fit_thresholds(probabilities, labels)
    if not fitted:
        log.warning("no label has both classes among the %d %s windows of %s: thresholds.json lists none",
                    n, split, ",".join(data))
    document = thresholds_document(fitted, digest=loaded.digest, uris=data, split=split, n_windows=n,
                                   max_windows=max_windows)
    target = uri_lib.join(loaded.uri, THRESHOLDS_FILE)
    with uri_lib.storage_errors(target):
        uri_lib.write_text_atomic(target, json.dumps(document, indent=2) + "\n")
    return {**document, "uri": target}


def load_thresholds(loaded) -> tuple[dict[str, Any] | None, str]:
    """(the stored thresholds document of a LoadedModel classifier with its `uri`, or None; why, in words).

    Thresholds fitted on other weights than these (another digest) are refused like missing ones."""
    target = uri_lib.join(loaded.uri, THRESHOLDS_FILE)
    with uri_lib.storage_errors(target):
        if not uri_lib.exists(target):
            return None, (f"the classifier has no {THRESHOLDS_FILE} (run `p2es thresholds --classifier "
                          f"{loaded.uri}`, or retrain it): only threshold-free figures (AUROC, AUPRC)")
        document = json.loads(uri_lib.read_text(target))
    if document.get("classifier_digest") != loaded.digest:
        return None, (f"{target} was fitted for other weights (digest {document.get('classifier_digest')}, "
                      f"these are {loaded.digest}): ignored; only threshold-free figures")
    return {**document, "uri": target}, (f"{target}: Youden's J on split {document.get('split')!r} of "
                                         f"{','.join(document.get('data') or [])}")


def split_conflict(document: dict[str, Any], data: Sequence[str], split: str) -> str | None:
    """Why stored thresholds must not be used on `split` of `data` (fitted on those very windows), or None."""
    same_data = set(document.get("data") or []) & set(data)
    fitted_split = document.get("split")
    if same_data and (fitted_split == split or "all" in (fitted_split, split)):
        return (f"the thresholds were fitted on split {fitted_split!r} of {','.join(sorted(same_data))}, which "
                f"is (part of) the evaluated split {split!r}")
    return None


def run_data_uris(run: str) -> list[str] | None:
    """The `data.uris` a training run was trained on, from its `result.json` (the run's `--out` folder or
    the file itself); None when `run` is a bare checkpoint or bundle folder."""
    summary_uri = run if str(run).endswith(".json") else uri_lib.join(run, "result.json")
    with uri_lib.storage_errors(summary_uri):
        if not uri_lib.exists(summary_uri):
            return None
        summary = json.loads(uri_lib.read_text(summary_uri))
    uris = ((summary.get("config") or {}).get("data") or {}).get("uris")
    return [str(u) for u in uris] if uris else None
