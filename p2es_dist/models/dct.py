"""`dct`: DCT-domain linear regression from PPG to ECG (Zhu, Tian, Wong, Wu, IEEE BHI 2019).

    c_ppg = DCT(ppg)[:K_in]                   orthonormal DCT-II of the PPG window, low band kept
    c_lead = W_lead c_ppg + b_lead            one linear map per output lead, to its first K_out coefficients
    ecg_lead = IDCT([c_lead, 0, ..., 0])      coefficients above K_out are zero

Zhu et al. regress single aligned cycles; here the input is a whole 1024-sample, 125 Hz window and
there are 12 outputs, so the map is a (12 K_out) x K_in matrix. K = 512 keeps content up to
512 / (2 * 8.192 s) = 31 Hz, enough for a QRS complex at 125 Hz; K = L keeps everything.

The model reads PPG only (the paper's setting): `cond_leads` are ignored, and a window without PPG
gets the bias, i.e. the mean ECG of the training windows. Trainable by gradient descent through
`loss(batch)` like every model, or in one pass with `fit_closed_form(batches)` (ridge regression,
solved per lead on the windows where that lead was recorded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from p2es_dist.constants import LEADS, N_LEADS, WINDOW
from p2es_dist.models.base import Batch, GenerationOptions, TranslationModel
from p2es_dist.models.common import masked_mse, ppg_input, regression_target_mask
from p2es_dist.models.registry import register


@dataclass
class DCTConfig:
    in_coeffs: int = 512  # PPG DCT coefficients kept (the lowest ones)
    out_coeffs: int = 512  # ECG DCT coefficients predicted per lead; the rest are zero
    ridge: float = 1e-3  # closed-form penalty, relative to the mean diagonal of X^T X
    window: int = WINDOW  # samples per window

    def __post_init__(self) -> None:
        for name in ("in_coeffs", "out_coeffs"):
            value = getattr(self, name)
            if not 1 <= value <= self.window:
                raise ValueError(f"{name} must be in [1, window={self.window}], got {value}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


def dct_basis(length: int, n_coeffs: int) -> Tensor:
    """(n_coeffs, length) rows of the orthonormal DCT-II (scipy's `dct(norm="ortho")`): x @ B.T is the
    transform, c @ B the inverse restricted to the kept coefficients."""
    n = torch.arange(length, dtype=torch.float64)
    k = torch.arange(n_coeffs, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (2 * n + 1) * k / (2 * length)) * math.sqrt(2.0 / length)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


@register("dct", DCTConfig)
class DCTRegression(TranslationModel):
    """Linear PPG -> 12-lead map between truncated DCT spectra."""

    def __init__(self, *, config: DCTConfig) -> None:
        super().__init__()
        self.config = config
        # A fixed transform: rebuilt on load rather than stored in every checkpoint.
        self.register_buffer("ppg_basis", dct_basis(config.window, config.in_coeffs), persistent=False)
        self.register_buffer("ecg_basis", dct_basis(config.window, config.out_coeffs), persistent=False)
        self.map = nn.Linear(config.in_coeffs, N_LEADS * config.out_coeffs)
        # Start from the zero prediction; the map is linear, so this costs gradient descent nothing.
        nn.init.zeros_(self.map.weight)
        nn.init.zeros_(self.map.bias)

    def ppg_coefficients(self, batch: Batch) -> Tensor:
        """(B, K_in) DCT coefficients of the (absent -> zero) PPG."""
        return ppg_input(batch)[:, 0] @ self.ppg_basis.T

    def forward(self, batch: Batch) -> Tensor:
        coefficients = self.map(self.ppg_coefficients(batch))
        coefficients = coefficients.view(-1, N_LEADS, self.config.out_coeffs)
        return coefficients @ self.ecg_basis

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        mask = regression_target_mask(batch, with_leads=False)
        mse = masked_mse(self(batch), batch["ecg"], mask)
        return mse, {"mse": mse.detach(), "n_pairs": mask.sum().detach()}

    @torch.no_grad()
    def generate(self, batch: Batch, options: GenerationOptions | None = None) -> Tensor:
        return self(batch)  # deterministic: `options` (the seed too) has nothing to act on

    @torch.no_grad()
    def fit_closed_form(self, batches: Iterable[Batch], *, ridge: float | None = None) -> dict[str, int]:
        """Ridge regression in one pass over `batches`; returns how many windows fitted each lead.

        For lead l with design X (rows: windows with PPG and lead l recorded; columns: the K_in PPG
        coefficients and a 1 for the bias) and targets Y (that lead's first K_out coefficients),
        solves (X^T X + r I) W = X^T Y in float64, with r = ridge * mean(diag X^T X) and no penalty
        on the bias. A lead never recorded keeps its current weights.
        """
        ridge = self.config.ridge if ridge is None else ridge
        n_in, n_out = self.config.in_coeffs, self.config.out_coeffs
        gram = torch.zeros(N_LEADS, n_in + 1, n_in + 1, dtype=torch.float64)
        cross = torch.zeros(N_LEADS, n_in + 1, n_out, dtype=torch.float64)
        counts = torch.zeros(N_LEADS, dtype=torch.int64)
        device = self.ppg_basis.device
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            features = self.ppg_coefficients(batch).double()
            design = torch.cat([features, torch.ones_like(features[:, :1])], dim=1).cpu()
            mask = regression_target_mask(batch, with_leads=False)
            # Zero unrecorded leads first: 0 * NaN is NaN, so a weight of zero alone would not do.
            ecg = torch.where(mask[:, :, None], batch["ecg"], torch.zeros_like(batch["ecg"]))
            targets = (ecg @ self.ecg_basis.T).double().cpu()  # (B, 12, K_out)
            mask = mask.cpu()
            weights = mask.double()  # (B, 12): a window enters lead l's sums only where recorded
            gram += torch.einsum("bl,bi,bj->lij", weights, design, design)
            cross += torch.einsum("bl,bi,blk->lik", weights, design, targets)
            counts += mask.sum(dim=0)
        weight = self.map.weight.view(N_LEADS, n_out, n_in)
        bias = self.map.bias.view(N_LEADS, n_out)
        for lead in range(N_LEADS):
            if counts[lead] == 0:
                continue
            penalty = torch.eye(n_in + 1, dtype=torch.float64)
            penalty[-1, -1] = 0.0
            scale = gram[lead].diagonal()[:-1].mean().clamp_min(1e-12)
            solution = torch.linalg.solve(gram[lead] + ridge * scale * penalty, cross[lead])
            weight[lead].copy_(solution[:-1].T.to(weight.dtype))
            bias[lead].copy_(solution[-1].to(bias.dtype))
        return {LEADS[i]: int(counts[i]) for i in range(N_LEADS)}
