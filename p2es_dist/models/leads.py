"""Lead physics: the four limb leads III, aVR, aVL, aVF are fixed linear functions of I and II.

Einthoven: III = II - I. Goldberger (augmented leads, with the central terminal of the other two limbs):
    aVR = -(I + II) / 2,   aVL = I - II / 2,   aVF = II - I / 2.
So a 12-lead ECG has 8 independent leads: I, II, V1..V6. A generator that emits those 8 and derives
the other 4 here produces ECGs whose limb leads agree exactly, whatever the network learnt.

Everything works on (..., leads, L) tensors with leads in `constants.LEADS` order for 12-lead tensors
and `INDEPENDENT_LEADS` order for 8-lead tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2es_dist.constants import LEAD_INDEX, LEADS, N_LEADS

INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
DERIVED_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")
N_INDEPENDENT = len(INDEPENDENT_LEADS)

# Coefficients of each 12-lead row on (I, II); precordial rows are unit vectors on their own lead.
_LIMB_COEFFICIENTS: dict[str, tuple[float, float]] = {
    "I": (1.0, 0.0),
    "II": (0.0, 1.0),
    "III": (-1.0, 1.0),
    "aVR": (-0.5, -0.5),
    "aVL": (1.0, -0.5),
    "aVF": (-0.5, 1.0),
}


def expansion_matrix(*, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """(12, 8) matrix M with ecg12 = M @ independent8, rows in `LEADS` order, columns in `INDEPENDENT_LEADS`."""
    matrix = torch.zeros(N_LEADS, N_INDEPENDENT, dtype=torch.float64)
    for lead, (coef_i, coef_ii) in _LIMB_COEFFICIENTS.items():
        matrix[LEAD_INDEX[lead], 0] = coef_i
        matrix[LEAD_INDEX[lead], 1] = coef_ii
    for column, lead in enumerate(INDEPENDENT_LEADS[2:], start=2):
        matrix[LEAD_INDEX[lead], column] = 1.0
    return matrix.to(dtype=dtype, device=device)


def expand_leads(independent: Tensor) -> Tensor:
    """(..., 8, L) leads I, II, V1..V6 -> (..., 12, L) in `LEADS` order, limb leads derived exactly.

    Written as the formulas rather than a matmul so each derived sample is one rounding of the exact
    expression (II - I, ...), which is what a reader checking Einthoven's law will compute.
    """
    if independent.shape[-2] != N_INDEPENDENT:
        raise ValueError(f"expected {N_INDEPENDENT} independent leads on dim -2, got shape {tuple(independent.shape)}")
    lead_i, lead_ii = independent[..., 0, :], independent[..., 1, :]
    limb = {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    precordial = {lead: independent[..., column, :] for column, lead in enumerate(INDEPENDENT_LEADS) if column >= 2}
    by_name = {**limb, **precordial}
    return torch.stack([by_name[lead] for lead in LEADS], dim=-2)


def select_independent(ecg: Tensor) -> Tensor:
    """(..., 12, L) -> (..., 8, L): the independent leads of a 12-lead tensor, as recorded."""
    return ecg[..., [LEAD_INDEX[lead] for lead in INDEPENDENT_LEADS], :]


def independent_from_recorded(ecg: Tensor, recorded: Tensor) -> Tensor:
    """Least-squares I, II, V1..V6 from whichever leads were recorded.

    ecg (B, 12, L), recorded (B, 12) bool -> (B, 8, L). Each window solves min ||M_r x - ecg_r|| over its
    recorded rows r with the minimum-norm solution, so any two recorded limb leads give I and II exactly
    (e.g. II and aVR give I = -2 aVR - II), and a lead the recording does not determine comes out as 0
    (e.g. I when only II was recorded). Unrecorded samples may hold junk: they are masked out first.
    """
    matrix = expansion_matrix(dtype=torch.float64, device=ecg.device)
    weights = recorded.to(torch.float64)[:, :, None]  # (B, 12, 1)
    masked_matrix = weights * matrix  # recorded rows only
    solve = torch.linalg.pinv(masked_matrix)  # (B, 8, 12), zero columns for unrecorded rows
    signal = torch.where(recorded[:, :, None], ecg, torch.zeros_like(ecg)).to(torch.float64)
    return (solve @ signal).to(ecg.dtype)


def project_to_physics(ecg: Tensor, recorded: Tensor) -> Tensor:
    """(B, 12, L) -> (B, 12, L): the closest ECG (on the recorded leads) that obeys Einthoven/Goldberger."""
    return expand_leads(independent_from_recorded(ecg, recorded))


def einthoven_residual(ecg: Tensor) -> Tensor:
    """(..., 12, L) -> (..., 4, L): each derived lead minus its formula; zero for a physical ECG."""
    return ecg[..., [LEAD_INDEX[lead] for lead in DERIVED_LEADS], :] - expand_leads(select_independent(ecg))[
        ..., [LEAD_INDEX[lead] for lead in DERIVED_LEADS], :
    ]
