"""Masked-lead reconstruction: all 12 leads from lead II (or any given channels) with the foundation encoder.

    run_reconstruction(encoder_uri="out/pretrain", data=["s3://p2es/ptbxl"], split="test", out="out/recon")

Metric: MSE in model space (`p2es_dist/data/normalize.py`, `"space": "window"` in metrics.json) on every
recorded lead that was not given; per window, averaged over windows for each lead, then over leads for
`overall`. Windows that lack a given channel are skipped (there is nothing to reconstruct from).

Baseline: the per-lead mean. For lead l, c_l is the mean of its model-space samples over all recorded
windows of the training split (over windows and time: windows are not beat-aligned, so a per-sample
mean would be flat anyway); the baseline predicts c_l at every sample. An encoder that reconstructs
leads from lead II must beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from p2es_dist.constants import LEADS, N_LEADS
from p2es_dist.errors import UserError
from p2es_dist.evaluate.probe import update_metrics, window_batches
from p2es_dist.models.base import Batch
from p2es_dist.models.encoder import N_CHANNELS, batch_channels

CHANNEL_NAMES: tuple[str, ...] = (*LEADS, "PPG")
BASELINE = "per-lead constant: mean model-space sample of each recorded lead over the training windows"


def given_channels(names: Sequence[str]) -> np.ndarray:
    """Channel names (leads, `PPG`) -> (13,) bool."""
    unknown = [name for name in names if name not in CHANNEL_NAMES]
    if unknown or not names:
        raise UserError(f"given: expected some of {', '.join(CHANNEL_NAMES)}, got {list(names)}")
    return np.isin(np.array(CHANNEL_NAMES), list(names))


class LeadMeans:
    """Running mean of each lead's model-space samples over recorded windows."""

    def __init__(self) -> None:
        self.sums = np.zeros(N_LEADS)
        self.counts = np.zeros(N_LEADS)

    def update(self, batch: Batch) -> None:
        recorded = batch["ecg_mask"].bool()
        ecg = torch.where(recorded[:, :, None], batch["ecg"].double(), torch.zeros((), dtype=torch.float64))
        self.sums += ecg.sum(dim=(0, 2)).numpy()
        self.counts += recorded.sum(dim=0).numpy() * ecg.shape[-1]

    def means(self) -> np.ndarray:
        return np.divide(self.sums, self.counts, out=np.zeros(N_LEADS), where=self.counts > 0)


class ReconstructionErrors:
    """Per-lead masked-lead MSE of the encoder and of the per-lead mean baseline, accumulated over batches."""

    def __init__(self, *, given: Sequence[str], baseline: np.ndarray) -> None:
        self.given_names = list(given)
        self.given = torch.from_numpy(given_channels(given))
        self.baseline = torch.as_tensor(baseline, dtype=torch.float32)
        self.sums = {"mse": np.zeros(N_LEADS), "mse_baseline": np.zeros(N_LEADS)}
        self.counts = np.zeros(N_LEADS)
        self.windows = 0

    def update(self, batch: Batch, encoder) -> None:
        _, present = batch_channels(batch)
        usable = present[:, self.given].all(dim=1)
        if not usable.any():
            return
        batch = {key: value[usable] for key, value in batch.items()}
        given = self.given.expand(int(usable.sum()), N_CHANNELS) & present[usable]
        prediction = encoder.reconstruct(batch, given)
        targets = batch["ecg_mask"].bool() & ~given[:, :N_LEADS]
        ecg = torch.where(targets[:, :, None], batch["ecg"].float(), torch.zeros(()))
        errors = {"mse": (prediction - ecg).square().mean(dim=-1),
                  "mse_baseline": (self.baseline[None, :, None] - ecg).square().mean(dim=-1)}
        for name, per_pair in errors.items():
            self.sums[name] += torch.where(targets, per_pair, torch.zeros(())).sum(dim=0).double().numpy()
        self.counts += targets.sum(dim=0).numpy()
        self.windows += len(ecg)

    def result(self, *, split: str) -> dict[str, Any]:
        leads = {}
        for i, lead in enumerate(LEADS):
            if self.counts[i]:
                leads[lead] = {name: float(sums[i] / self.counts[i]) for name, sums in self.sums.items()}
                leads[lead]["n"] = int(self.counts[i])
        overall = {name: float(np.mean([values[name] for values in leads.values()])) if leads else None
                   for name in self.sums}
        return {"given": self.given_names, "split": split, "n_windows": self.windows, "space": "window",
                "metric": "mse on recorded leads that were not given", "baseline": BASELINE,
                "leads": leads, "overall": overall}


def run_reconstruction(*, encoder_uri: str, data: list[str], split: str, out: str, given: Sequence[str] = ("II",),
                       train_split: str = "train", max_windows: int | None = None) -> dict[str, Any]:
    """Masked-lead MSE of the encoder vs. the per-lead mean baseline; merged into out/metrics.json."""
    from p2es_dist.models.checkpoint import load_model

    loaded = load_model(encoder_uri)
    if loaded.name != "encoder":
        raise UserError(f"{encoder_uri}: holds a {loaded.name!r} model, expected a pretrained encoder")
    means = LeadMeans()
    for batch in window_batches(data, train_split, max_windows=max_windows):
        means.update(batch)
    if not means.counts.any():
        raise UserError(f"{', '.join(data)}: no recorded leads in split {train_split!r} for the per-lead mean baseline")
    errors = ReconstructionErrors(given=given, baseline=means.means())
    for batch in window_batches(data, split, max_windows=max_windows):
        errors.update(batch, loaded.model)
    if not errors.windows:
        raise UserError(f"{', '.join(data)}: no window of split {split!r} records all of {', '.join(given)}")
    result = {"reconstruction": errors.result(split=split)}
    update_metrics(out, result)
    return result
