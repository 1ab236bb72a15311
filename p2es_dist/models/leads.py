"""Lead physics: the four limb leads III, aVR, aVL, aVF are fixed linear functions of I and II.

Einthoven: III = II - I. Goldberger (augmented leads, with the central terminal of the other two limbs):
    aVR = -(I + II) / 2,   aVL = I - II / 2,   aVF = II - I / 2.
So a 12-lead ECG has 8 independent leads: I, II, V1..V6. A generator that emits those 8 and derives
the other 4 here produces ECGs whose limb leads agree exactly, whatever the network learnt.

Any two of the six limb leads are independent (no two of their axes are 180 degrees apart), so any two
given limb leads fix I and II, and through them all six (`impose_given_leads`, which every lead-conditioned
model's `generate` applies: `models/base.py`).

Everything works on (..., leads, L) tensors with leads in `constants.LEADS` order for 12-lead tensors
and `INDEPENDENT_LEADS` order for 8-lead tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2es_dist.constants import LEAD_INDEX, LEADS, N_LEADS

INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
DERIVED_LEADS: tuple[str, ...] = ("III", "aVR", "aVL", "aVF")
LIMB_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF")  # rows 0..5 of `LEADS`
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


def limb_leads(lead_i: Tensor, lead_ii: Tensor) -> dict[str, Tensor]:
    """The six limb leads from I and II by Einthoven's and Goldberger's formulas, one rounding each."""
    return {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }


def expand_leads(independent: Tensor) -> Tensor:
    """(..., 8, L) leads I, II, V1..V6 -> (..., 12, L) in `LEADS` order, limb leads derived exactly.

    Written as the formulas rather than a matmul so each derived sample is one rounding of the exact
    expression (II - I, ...), which is what a reader checking Einthoven's law will compute.
    """
    if independent.shape[-2] != N_INDEPENDENT:
        raise ValueError(f"expected {N_INDEPENDENT} independent leads on dim -2, got shape {tuple(independent.shape)}")
    limb = limb_leads(independent[..., 0, :], independent[..., 1, :])
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


def determined_leads(given: Tensor) -> Tensor:
    """(..., 12) bool given leads -> (..., 12) bool leads they fix: themselves, and all six limb leads
    wherever two or more limb leads are given."""
    limb = given[..., : len(LIMB_LEADS)]
    two = limb.sum(dim=-1, keepdim=True) >= 2
    return torch.cat([limb | two, given[..., len(LIMB_LEADS):]], dim=-1)


def _limb_matrix() -> Tensor:
    """(6, 2) float64: each limb lead's coefficients on (I, II)."""
    return torch.tensor([_LIMB_COEFFICIENTS[lead] for lead in LIMB_LEADS], dtype=torch.float64)


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """values (..., 6, L), index (...,) -> (..., L): each window's row `index`."""
    expanded = index[..., None, None].expand(*index.shape, 1, values.shape[-1])
    return torch.gather(values, -2, expanded).squeeze(-2)


def impose_given_leads(generated: Tensor, ecg: Tensor, given: Tensor) -> Tensor:
    """A generated ECG made to agree with the leads it was given, by lead physics.

    generated (..., B, 12, L) (e.g. several samples of a batch), ecg (B, 12, L) the recorded leads,
    given (B, 12) bool -> like `generated`, where per window:
      - two or more limb leads given: I and II solved exactly from the first two given (in `LEADS` order;
        any two are independent), and all six limb leads derived from them (`limb_leads`);
      - one limb lead given: the model's own limb leads, fitted to (I, II) by least squares, moved the
        least (in the six-lead norm) to agree with it, then the six derived: the output obeys
        Einthoven/Goldberger and passes through the given lead;
      - no limb lead given: the limb leads as generated;
    and last, every given lead is the recorded one, exactly (a given I or II also before deriving, so that
    e.g. III == II - I holds bit for bit when I and II are given). Unrecorded samples of `ecg` may hold
    junk: only given leads are read. The arithmetic runs in float64 and is rounded once to the output dtype.
    """
    dtype, n_limb = generated.dtype, len(LIMB_LEADS)
    given = given.bool()
    recorded = torch.where(given[..., None], ecg, torch.zeros_like(ecg)).to(torch.float64)
    limb_given = given[..., :n_limb]
    count = limb_given.sum(dim=-1)  # (B,)
    # The first two given limb leads of each window (stable sort puts given ones first, in LEADS order).
    order = torch.sort((~limb_given).to(torch.int8), dim=-1, stable=True).indices
    first, second = order[..., 0], order[..., 1]
    matrix = _limb_matrix().to(ecg.device)
    a, b = matrix[first], matrix[second]  # (B, 2) rows of the 2x2 system
    value_a, value_b = _pick(recorded[..., :n_limb, :], first), _pick(recorded[..., :n_limb, :], second)
    # Two given: [a; b] x = [value_a; value_b], by the closed-form inverse (det is 1 for I+II and II+III,
    # so those pairs solve without rounding). One given: the guard only keeps det away from 0.
    det = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])[:, None]
    det = torch.where(count[:, None] >= 2, det, torch.ones_like(det))
    solved_i = (b[:, 1:2] * value_a - a[:, 1:2] * value_b) / det
    solved_ii = (a[:, 0:1] * value_b - b[:, 0:1] * value_a) / det
    # One given: min ||C x - g|| subject to a.x = value_a, g the generated limb leads (C: 6x2 matrix).
    fit = torch.linalg.pinv(matrix) @ generated[..., :n_limb, :].to(torch.float64)  # (..., B, 2, L)
    direction = torch.linalg.solve(matrix.T @ matrix, a.T).T  # (B, 2): G^-1 a
    miss = (value_a - (a[:, 0:1] * fit[..., 0, :] + a[:, 1:2] * fit[..., 1, :])) / (a * direction).sum(-1)[:, None]
    moved_i, moved_ii = fit[..., 0, :] + direction[:, 0:1] * miss, fit[..., 1, :] + direction[:, 1:2] * miss
    two = (count >= 2)[:, None]
    lead_i = torch.where(two, solved_i, moved_i).to(dtype)
    lead_ii = torch.where(two, solved_ii, moved_ii).to(dtype)
    lead_i = torch.where(given[:, 0:1], ecg[:, 0].to(dtype), lead_i)
    lead_ii = torch.where(given[:, 1:2], ecg[:, 1].to(dtype), lead_ii)
    derived = torch.stack(list(limb_leads(lead_i, lead_ii).values()), dim=-2)
    any_limb = (count >= 1)[:, None, None]
    out = torch.cat([torch.where(any_limb, derived, generated[..., :n_limb, :]), generated[..., n_limb:, :]], dim=-2)
    return torch.where(given[..., None], ecg.to(dtype), out)
