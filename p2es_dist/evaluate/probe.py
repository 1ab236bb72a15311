"""Linear probes on frozen foundation-encoder features: how much diagnosis the embedding carries.

    run_probe(encoder_uri="out/pretrain", train_data=["s3://p2es/ptbxl"], data=["s3://p2es/ptbxl"],
              labels=["MI", "NORM"], out="out/probe")

For each label: `Encoder.embed` features of the `train_split` windows of `train_data` (standardised
with the training mean and std) -> an L2-regularised logistic regression (full-batch L-BFGS in
float64) -> AUROC on the `split` windows of `data`. The same is done with a randomly initialised
encoder of the same config (seeded), the floor that pretraining must beat. The pass over the
evaluation windows also measures masked-lead reconstruction from lead II (`reconstruction.py`).

Windows are read straight from the shards with pyarrow (no Ray); `max_windows` takes the first
windows of each split in shard order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from p2es_dist.constants import LABEL_INDEX, LABELS
from p2es_dist.errors import UserError
from p2es_dist.models.base import Batch, count_parameters
from p2es_dist.storage import uri as uri_lib

WINDOW_COLUMNS = ["subject_id", "ppg", "ecg", "ecg_mask", "age", "sex", "labels"]


# --- windows -----------------------------------------------------------------------------------------
def window_batches(uris: Sequence[str], split: str, *, max_windows: int | None = None,
                   batch_size: int = 64) -> Iterator[Batch]:
    """Model-space torch batches of one split (`all` for every window), read with pyarrow, in shard order."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from p2es_dist.data.batches import table_to_batch
    from p2es_dist.data.loader import shard_paths

    filesystem, paths = shard_paths(list(uris))
    dataset = ds.dataset(paths, filesystem=filesystem, format="parquet")
    row_filter = None if split == "all" else ds.field("split") == split
    remaining = max_windows if max_windows is not None else float("inf")
    with uri_lib.storage_errors(uris[0]):
        for record_batch in dataset.to_batches(columns=WINDOW_COLUMNS, filter=row_filter, batch_size=batch_size):
            if remaining <= 0:
                return
            table = pa.Table.from_batches([record_batch]).slice(0, int(min(remaining, record_batch.num_rows)))
            if not table.num_rows:
                continue
            remaining -= table.num_rows
            yield {key: torch.from_numpy(np.array(value)) for key, value in table_to_batch(table).items()}


# --- logistic regression and AUROC -------------------------------------------------------------------
def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None when one class is missing."""
    targets = np.asarray(targets).astype(bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class LogisticProbe:
    """Standardised features -> L2-regularised logistic regression, fitted with full-batch L-BFGS.

    Minimises mean binary cross-entropy + l2 / 2 * ||w||^2 (the bias is not penalised).
    """

    def __init__(self, *, l2: float = 1e-2, max_iter: int = 200) -> None:
        self.l2 = l2
        self.max_iter = max_iter

    def fit(self, features: np.ndarray, targets: np.ndarray) -> LogisticProbe:
        x = torch.as_tensor(features, dtype=torch.float64)
        self.mean = x.mean(dim=0)
        self.std = x.std(dim=0).clamp_min(1e-8)  # a constant feature stays 0 after scaling
        x = (x - self.mean) / self.std
        y = torch.as_tensor(targets, dtype=torch.float64)
        self.weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], max_iter=self.max_iter, tolerance_grad=1e-9,
                                      line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            logits = x @ self.weight + self.bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            loss = loss + 0.5 * self.l2 * self.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()
        return self

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        x = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.std
        return (x @ self.weight + self.bias).numpy()

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision_function(features)))


def probe_label(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray) -> float | None:
    """AUROC of a probe fitted on (train_x, train_y); None when either side lacks a class."""
    if train_y.min() == train_y.max() or eval_y.min() == eval_y.max():
        return None
    return auroc(LogisticProbe().fit(train_x, train_y).decision_function(eval_x), eval_y)


# --- the probe job -----------------------------------------------------------------------------------
def _features(encoders: dict[str, Any], uris: Sequence[str], split: str, max_windows: int | None,
              on_batch=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    features: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    labels: list[np.ndarray] = []
    for batch in window_batches(uris, split, max_windows=max_windows):
        for name, encoder in encoders.items():
            features[name].append(encoder.embed(batch).numpy())
        labels.append(batch["labels"].numpy())
        if on_batch is not None:
            on_batch(batch)
    if not labels:
        raise UserError(f"{', '.join(uris)}: no windows in split {split!r} (check --split / the shards' manifest)")
    return {name: np.concatenate(parts) for name, parts in features.items()}, np.concatenate(labels)


def update_metrics(out: str, block: dict[str, Any]) -> dict[str, Any]:
    """Merge top-level keys into out/metrics.json (other jobs' keys stay) and return the whole file."""
    path = uri_lib.join(out, "metrics.json")
    metrics = json.loads(uri_lib.read_text(path)) if uri_lib.exists(path) else {}
    metrics.update(block)
    uri_lib.write_text_atomic(path, json.dumps(metrics, indent=2))
    return metrics


def run_probe(*, encoder_uri: str, train_data: list[str], data: list[str], labels: list[str], out: str,
              split: str = "test", train_split: str = "train", seed: int = 0,
              max_windows: int | None = None) -> dict[str, Any]:
    """Linear-probe AUROC per label (pretrained vs. random-init encoder); writes out/metrics.json."""
    from p2es_dist.evaluate.reconstruction import LeadMeans, ReconstructionErrors
    from p2es_dist.export.loading import load_model
    from p2es_dist.models import build_model

    unknown = [label for label in labels if label not in LABEL_INDEX]
    if unknown or not labels:
        raise UserError(f"--labels: expected some of {', '.join(LABELS)}, got {','.join(labels) or 'nothing'}")
    loaded = load_model(encoder_uri)
    if loaded.name != "encoder":
        raise UserError(f"--encoder {encoder_uri}: holds a {loaded.name!r} model, expected a pretrained encoder "
                        "(the --out folder of `p2es pretrain`)")
    torch.manual_seed(seed)
    random_init = build_model(loaded.model_config).eval()
    encoders = {"pretrained": loaded.model, "random_init": random_init}

    lead_means = LeadMeans()
    train_x, train_y = _features(encoders, train_data, train_split, max_windows, on_batch=lead_means.update)
    errors = ReconstructionErrors(given=("II",), baseline=lead_means.means())
    eval_x, eval_y = _features(encoders, data, split, max_windows,
                               on_batch=lambda batch: errors.update(batch, loaded.model))

    probe: dict[str, Any] = {}
    for label in labels:
        column = LABEL_INDEX[label]
        y_train, y_eval = train_y[:, column], eval_y[:, column]
        probe[label] = {
            "auroc": probe_label(train_x["pretrained"], y_train, eval_x["pretrained"], y_eval),
            "auroc_random_init": probe_label(train_x["random_init"], y_train, eval_x["random_init"], y_eval),
            "n": int(len(y_eval)), "n_pos": int(y_eval.sum()),
            "n_train": int(len(y_train)), "n_train_pos": int(y_train.sum()),
        }
    result = {
        "probe": probe,
        "encoder": {"uri": loaded.uri, "params": count_parameters(loaded.model), "width": loaded.model.width,
                    "digest": loaded.digest},
        "probe_data": {"train": {"uri": list(train_data), "split": train_split, "n_windows": int(len(train_y))},
                       "eval": {"uri": list(data), "split": split, "n_windows": int(len(eval_y))},
                       "seed": seed, "classifier": "L2 logistic regression on standardised embed features"},
        "reconstruction": errors.result(split=split),
    }
    update_metrics(out, result)
    return result
