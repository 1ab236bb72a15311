"""`classifier`: the fixed 12-lead diagnostic classifier behind the `diagnostic` metrics
(`p2es_dist/evaluate/diagnostic.py`).

A compact 1-D ResNet: a strided stem, one or more residual basic blocks per stage (the first of each
stage halves the length), global average and max pooling, and a linear head to one logit per label of
`constants.LABELS` (multi-label, BCE). Leads that were not recorded are zeroed and the lead mask is
also fed to the head, so the same classifier scores 12-lead corpora and partially recorded windows.

It is not a translation model: it subclasses `nn.Module` (not `TranslationModel`) and has no
`generate`. The trainer trains it through the same `loss(batch)`; the evaluator calls
`predict_proba(ecg, ecg_mask)` on recorded and on generated ECGs. Windows with an empty label set
are "unknown" (e.g. BIDMC) and do not enter the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from p2es_dist.constants import LABELS, N_LEADS
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

    def __post_init__(self) -> None:
        if self.stem_kernel % 2 == 0 or self.kernel_size % 2 == 0:
            raise ValueError("stem_kernel and kernel_size must be odd")
        if not self.stage_channels or self.blocks_per_stage < 1:
            raise ValueError("need at least one stage with at least one block")


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

    def forward(self, ecg: Tensor, ecg_mask: Tensor) -> Tensor:
        """(B, 12, L) ECG and (B, 12) mask -> (B, 13) label logits."""
        ecg = torch.where(ecg_mask[:, :, None], ecg, torch.zeros_like(ecg))
        h = self.blocks(self.stem(ecg))
        pooled = torch.cat([h.mean(dim=-1), h.amax(dim=-1), ecg_mask.to(h.dtype)], dim=1)
        return self.head(self.dropout(pooled))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self(batch["ecg"], batch["ecg_mask"].bool())
        bce = masked_bce(logits, batch["labels"])
        return bce, {"bce": bce.detach(), "n_labelled": labelled_windows(batch["labels"]).sum().detach()}

    @torch.no_grad()
    def predict_proba(self, ecg: Tensor, ecg_mask: Tensor) -> Tensor:
        """(B, 13) probabilities in `constants.LABELS` order; call `.eval()` first for fixed BN/dropout."""
        return torch.sigmoid(self(ecg, ecg_mask.bool()))
