"""`classifier`: the fixed 12-lead diagnostic classifier behind the `diagnostic` metrics
(`p2es_dist/evaluate/diagnostic.py`).

A compact 1-D ResNet: a strided stem, one or more residual basic blocks per stage (the first of each
stage halves the length), global average and max pooling, and a linear head to one logit per label of
`constants.LABELS` (multi-label, BCE). Leads that were not recorded are zeroed and the lead mask is
also fed to the head, so the same classifier scores 12-lead corpora and partially recorded windows.

It is not a translation model: it subclasses `nn.Module` (not `TranslationModel`) and has no
`generate`. The trainer trains it through the same `loss(batch)`; the evaluator calls
`predict_proba(ecg, ecg_mask)` on recorded and on generated ECGs, and `features(ecg, ecg_mask)` (the
pooled features before the head) for the Fréchet distance. Windows with an empty label set are "unknown"
(e.g. BIDMC) and do not enter the loss.

Lead dropout (`lead_dropout`, training `loss()` only): the evaluation also scores the recorded ECG with
only the model's input leads unmasked (the input-only floor, e.g. lead II alone). A classifier trained on
full recordings alone would see such windows far outside its training distribution and its floor would
be artificially low; so a fraction of training windows keep only a random subset of their recorded
leads: lead II, I + II, II + V1 + V5, one random recorded lead, or each lead with probability 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from p2es_dist.constants import LABELS, LEAD_INDEX, N_LEADS
from p2es_dist.models.base import Batch
from p2es_dist.models.common import labelled_windows, masked_bce
from p2es_dist.models.registry import register


@dataclass
class ClassifierConfig:
    stem_channels: int = 32
    stage_channels: tuple[int, ...] = (32, 64, 128, 128)  # every stage but the first halves the length
    blocks_per_stage: int = 1
    stem_kernel: int = 15  # odd
    kernel_size: int = 7  # odd
    dropout: float = 0.1  # before the head
    lead_dropout: float = 0.0  # training only: share of windows that keep a random subset of their leads

    def __post_init__(self) -> None:
        if self.stem_kernel % 2 == 0 or self.kernel_size % 2 == 0:
            raise ValueError("stem_kernel and kernel_size must be odd")
        if not 0.0 <= self.lead_dropout <= 1.0:
            raise ValueError(f"lead_dropout must be in [0, 1], got {self.lead_dropout}")
        if not self.stage_channels or self.blocks_per_stage < 1:
            raise ValueError("need at least one stage with at least one block")


# The reduced lead sets a generator's input commonly is (`--condition`); besides, one random recorded lead
# and a random half of the leads. Each of these five kinds is drawn with equal probability.
DROPOUT_SUBSETS: tuple[tuple[str, ...], ...] = (("II",), ("I", "II"), ("II", "V1", "V5"))


def drop_leads(mask: Tensor, p: float, *, generator: torch.Generator | None = None) -> Tensor:
    """(B, 12) mask with, for a share `p` of the windows, only a random subset of its recorded leads.

    A window whose drawn subset holds none of its recorded leads keeps its full mask (an empty mask
    carries no signal to learn from).
    """
    mask = mask.bool()
    batch, device = mask.shape[0], mask.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    fixed = torch.zeros(len(DROPOUT_SUBSETS), N_LEADS, dtype=torch.bool, device=device)
    for row, subset in enumerate(DROPOUT_SUBSETS):
        fixed[row, [LEAD_INDEX[lead] for lead in subset]] = True
    kind = (rand(batch) * (len(DROPOUT_SUBSETS) + 2)).long().clamp_max(len(DROPOUT_SUBSETS) + 1)
    scores = torch.where(mask, rand(batch, N_LEADS), torch.full((batch, N_LEADS), -1.0, device=device))
    single = nn.functional.one_hot(scores.argmax(dim=1), N_LEADS).bool()  # one random recorded lead
    half = rand(batch, N_LEADS) < 0.5
    n_fixed = len(DROPOUT_SUBSETS)
    chosen = torch.where((kind < n_fixed)[:, None], fixed[kind.clamp_max(n_fixed - 1)],
                         torch.where((kind == n_fixed)[:, None], single, half))
    reduced = mask & chosen
    apply = (rand(batch) < p) & reduced.any(dim=1)
    return torch.where(apply[:, None], reduced, mask)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected, if shape changes) shortcut."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm1d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


@register("classifier", ClassifierConfig)
class ECGClassifier(nn.Module):
    """Multi-label diagnosis from a (partially recorded) 12-lead window."""

    name: ClassVar[str]

    def __init__(self, *, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv1d(N_LEADS, config.stem_channels, config.stem_kernel, stride=2,
                      padding=config.stem_kernel // 2, bias=False),
            nn.BatchNorm1d(config.stem_channels), nn.ReLU(), nn.MaxPool1d(3, stride=2, padding=1),
        )
        blocks = []
        width = config.stem_channels
        for stage, out_width in enumerate(config.stage_channels):
            for block in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels=width, out_channels=out_width, stride=stride,
                                         kernel_size=config.kernel_size))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * width + N_LEADS, len(LABELS))

    def _pooled(self, ecg: Tensor, ecg_mask: Tensor) -> Tensor:
        """(B, 2 * width): average and max pooling of the last stage over time; unrecorded leads zeroed."""
        ecg = torch.where(ecg_mask[:, :, None], ecg, torch.zeros_like(ecg))
        h = self.blocks(self.stem(ecg))
        return torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=1)

    def forward(self, ecg: Tensor, ecg_mask: Tensor) -> Tensor:
        """(B, 12, L) ECG and (B, 12) mask -> (B, 13) label logits."""
        pooled = self._pooled(ecg, ecg_mask)
        return self.head(self.dropout(torch.cat([pooled, ecg_mask.to(pooled.dtype)], dim=1)))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch["ecg_mask"].bool()
        if self.training and self.config.lead_dropout > 0:
            mask = drop_leads(mask, self.config.lead_dropout)
        logits = self(batch["ecg"], mask)
        bce = masked_bce(logits, batch["labels"])
        return bce, {"bce": bce.detach(), "n_labelled": labelled_windows(batch["labels"]).sum().detach()}

    @torch.no_grad()
    def predict_proba(self, ecg: Tensor, ecg_mask: Tensor) -> Tensor:
        """(B, 13) probabilities in `constants.LABELS` order; call `.eval()` first for fixed BN/dropout."""
        return torch.sigmoid(self(ecg, ecg_mask.bool()))

    @torch.no_grad()
    def features(self, ecg: Tensor, ecg_mask: Tensor) -> Tensor:
        """(B, 2 * width) pooled features before the head (the mask itself left out): the learned space
        `fd` is measured in when no foundation encoder is given. Call `.eval()` first."""
        return self._pooled(ecg, ecg_mask.bool())
