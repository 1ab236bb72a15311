"""The interface every model follows, so the trainer, evaluator and distiller treat them alike.

A batch is a dict of tensors in model space (SPEC section 5), as the Ray Data loader yields it:

| key          | shape / dtype          | meaning                                                    |
|--------------|------------------------|------------------------------------------------------------|
| `ppg`        | (B, L) float32         | PPG min-max scaled to [-1, 1]; zeros where absent          |
| `ppg_mask`   | (B,) bool              | whether the window has PPG                                 |
| `ecg`        | (B, 12, L) float32     | 12 leads, one scale factor per window; zeros where absent  |
| `ecg_mask`   | (B, 12) bool           | which leads were recorded                                  |
| `cond_leads` | (B, 12) bool, optional | recorded leads given to the model as input (`--condition`) |
| `age`        | (B,) float32           | years, NaN when unknown                                    |
| `sex`        | (B,) int64             | 0 female, 1 male, -1 unknown                               |
| `labels`     | (B, 13) float32        | multi-hot over `constants.LABELS`                          |
| `subject`    | (B,) int64             | stable hash of `subject_id` (same patient -> same value)   |

Leads are in `constants.LEADS` order, L = `constants.WINDOW`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


class TranslationModel(nn.Module):
    """A model that maps a condition (PPG and/or some leads, demographics) to 12 ECG leads."""

    name: ClassVar[str]

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (masked to recorded leads) and named parts for logging."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, batch: Batch, *, seed: int = 0) -> Tensor:
        """12-lead ECG in model space, (B, 12, L). Stochastic models are deterministic under `seed`."""
        raise NotImplementedError


def condition_leads(batch: Batch) -> Tensor:
    """(B, 12) bool: recorded leads the model may see as input; none unless `cond_leads` is given."""
    if "cond_leads" in batch:
        return batch["cond_leads"] & batch["ecg_mask"]
    return torch.zeros_like(batch["ecg_mask"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
