"""Pieces the regression baselines share: what they see as input, demographics, the masked loss.

A baseline sees PPG (zeroed where `ppg_mask` is false) and, when it conditions on leads, the recorded
leads that `condition_leads(batch)` allows (others zeroed); with `use_template`, also the patient's
calibration template (`template_input`, 12 channels, time-aligned with the output) and which leads it
has. A window that offers none of these gives a regressor nothing to map from, so `input_present` lets
the loss skip it rather than teach the mean ECG; and a lead given as input is no target
(`regression_target_mask`): copying it would be learnt, and scored, for free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS
from p2es_dist.models.base import Batch, condition_leads, template_input, template_leads

AGE_SCALE = 100.0  # years -> roughly [0, 1]


def ppg_input(batch: Batch) -> Tensor:
    """(B, 1, L): PPG with absent windows zeroed (a loader may leave junk there)."""
    present = batch["ppg_mask"].to(batch["ppg"].dtype)[:, None]
    return (batch["ppg"] * present)[:, None, :]


def lead_input(batch: Batch) -> Tensor:
    """(B, 12, L): the condition leads, every other lead zeroed."""
    given = condition_leads(batch)
    return torch.where(given[:, :, None], batch["ecg"], torch.zeros_like(batch["ecg"]))


def template_flag_input(batch: Batch) -> Tensor:
    """(B, 12, L): one constant channel per lead, 1 where the template has that lead."""
    flags = template_leads(batch).to(batch["ppg"].dtype)
    return flags[:, :, None].expand(-1, -1, batch["ppg"].shape[-1])


def signal_input(batch: Batch, *, with_leads: bool, with_template: bool = False,
                 template_flags: bool = False) -> Tensor:
    """(B, C, L): PPG; the condition leads when the model takes them (12); the template (12) and, with
    `template_flags`, its per-lead presence flags as constant channels (12), when it uses a template."""
    parts = [ppg_input(batch)]
    if with_leads:
        parts.append(lead_input(batch))
    if with_template:
        parts.append(template_input(batch))
        if template_flags:
            parts.append(template_flag_input(batch))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def signal_channels(*, with_leads: bool, with_template: bool = False, template_flags: bool = False) -> int:
    """Channels of `signal_input` with the same switches."""
    return 1 + N_LEADS * (int(with_leads) + int(with_template) + int(with_template and template_flags))


def presence_flags(batch: Batch, *, with_template: bool = False) -> Tensor:
    """(B, 13 or 25) float: whether PPG is present, which leads are given as condition, then (with a
    template) which leads the template has."""
    parts = [batch["ppg_mask"][:, None].bool(), condition_leads(batch).bool()]
    if with_template:
        parts.append(template_leads(batch))
    return torch.cat(parts, dim=1).float()


def input_present(batch: Batch, *, with_leads: bool, with_template: bool = False) -> Tensor:
    """(B,) bool: the window offers the model some signal (PPG, a condition lead or a template it reads)."""
    present = batch["ppg_mask"].bool()
    if with_leads:
        present = present | condition_leads(batch).any(dim=1)
    if with_template:
        present = present | template_leads(batch).any(dim=1)
    return present


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over (window, lead) pairs where `mask` (B, 12) is true of the per-sample squared error.

    `torch.where` (not a multiply) keeps NaN or junk at unrecorded leads out of the value and the
    gradient. With no recorded pair the loss is a graph-connected zero, so a step still runs.
    """
    per_pair = (prediction - target).square().mean(dim=-1)
    per_pair = torch.where(mask, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum() / mask.sum().clamp_min(1)


def regression_target_mask(batch: Batch, *, with_leads: bool, with_template: bool = False) -> Tensor:
    """(B, 12) bool: recorded leads of windows that offer the model some input, less the leads it is
    given as input (`cond_leads`, when it reads them): a window whose only recorded lead is an input
    contributes nothing to the loss."""
    mask = batch["ecg_mask"].bool() & input_present(batch, with_leads=with_leads, with_template=with_template)[:, None]
    if with_leads:
        mask = mask & ~condition_leads(batch).bool()
    return mask


def labelled_windows(labels: Tensor) -> Tensor:
    """(B,) bool: windows with at least one label. An empty label set means "unknown" (e.g. BIDMC),
    not "healthy": NORM is a label of its own, so all-zero rows carry no supervision."""
    return labels.sum(dim=1) > 0


def masked_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label BCE averaged over labelled windows (and labels); zero, graph-connected, if none."""
    keep = labelled_windows(labels)
    per_window = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    per_window = torch.where(keep, per_window, torch.zeros_like(per_window))
    return per_window.sum() / keep.sum().clamp_min(1)


class DemographicsEmbedding(nn.Module):
    """Age (scaled; unknown -> 0 plus a flag) and sex (female / male / unknown) -> a `dim` vector."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.sex = nn.Embedding(3, dim)
        self.age = nn.Sequential(nn.Linear(2, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, age: Tensor, sex: Tensor) -> Tensor:
        known = ~torch.isnan(age)
        age_scaled = torch.where(known, age / AGE_SCALE, torch.zeros_like(age))
        age_features = torch.stack([age_scaled, known.to(age_scaled.dtype)], dim=-1)
        # Embedding rows: 0 female, 1 male, 2 unknown (any code other than 0/1 counts as unknown).
        sex_index = torch.where((sex == 0) | (sex == 1), sex, torch.full_like(sex, 2)).long()
        return self.age(age_features.float()) + self.sex(sex_index)


class ConditionVector(nn.Module):
    """Demographics plus which inputs are present -> one `dim` vector that blocks add as a bias."""

    def __init__(self, *, dim: int, use_demographics: bool, use_template: bool = False) -> None:
        super().__init__()
        self.use_template = use_template
        self.demographics = DemographicsEmbedding(dim=dim) if use_demographics else None
        self.presence = nn.Linear(1 + N_LEADS * (2 if use_template else 1), dim)

    def forward(self, batch: Batch) -> Tensor:
        vector = self.presence(presence_flags(batch, with_template=self.use_template))
        if self.demographics is not None:
            vector = vector + self.demographics(batch["age"], batch["sex"])
        return vector


__all__ = [
    "ConditionVector",
    "DemographicsEmbedding",
    "input_present",
    "labelled_windows",
    "masked_bce",
    "masked_mse",
    "presence_flags",
    "regression_target_mask",
    "signal_channels",
    "signal_input",
    "template_flag_input",
]
