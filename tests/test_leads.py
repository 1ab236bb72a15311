"""Lead physics: Einthoven/Goldberger derived leads, exact, and the least-squares fit from recorded leads."""

from __future__ import annotations

import pytest
import torch

from p2es_dist.constants import LEAD_INDEX, LEADS
from p2es_dist.models.leads import (
    DERIVED_LEADS,
    INDEPENDENT_LEADS,
    einthoven_residual,
    expand_leads,
    expansion_matrix,
    independent_from_recorded,
    project_to_physics,
    select_independent,
)


def random_independent(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, len(INDEPENDENT_LEADS), 1024, dtype=dtype, generator=torch.Generator().manual_seed(1))


def test_lead_sets_cover_the_twelve_leads() -> None:
    assert sorted(INDEPENDENT_LEADS + DERIVED_LEADS) == sorted(LEADS)
    assert len(set(INDEPENDENT_LEADS) & set(DERIVED_LEADS)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_derived_leads_are_exact(dtype: torch.dtype) -> None:
    independent = random_independent(4, dtype=dtype)
    ecg = expand_leads(independent)
    assert ecg.shape == (4, 12, 1024) and ecg.dtype == dtype
    lead = {name: ecg[:, LEAD_INDEX[name]] for name in LEADS}
    # Exact in floating point: each derived sample is the one rounding of the formula.
    assert torch.equal(lead["III"], lead["II"] - lead["I"])
    assert torch.equal(lead["aVR"], -(lead["I"] + lead["II"]) / 2)
    assert torch.equal(lead["aVL"], lead["I"] - lead["II"] / 2)
    assert torch.equal(lead["aVF"], lead["II"] - lead["I"] / 2)
    # The independent leads pass through untouched and in LEADS order.
    assert torch.equal(select_independent(ecg), independent)
    # Goldberger's augmented leads sum to zero; the classical forms agree to rounding.
    torch.testing.assert_close(lead["aVR"] + lead["aVL"] + lead["aVF"], torch.zeros_like(lead["I"]))
    torch.testing.assert_close(lead["aVL"], (lead["I"] - lead["III"]) / 2)
    torch.testing.assert_close(lead["aVF"], (lead["II"] + lead["III"]) / 2)
    assert einthoven_residual(ecg).abs().max() == 0


def test_expansion_matrix_matches_the_formulas() -> None:
    independent = random_independent(3, dtype=torch.float64)
    matrix = expansion_matrix(dtype=torch.float64)
    assert matrix.shape == (12, 8)
    torch.testing.assert_close(torch.einsum("lm,bmn->bln", matrix, independent), expand_leads(independent))


def test_expand_rejects_the_wrong_number_of_leads() -> None:
    with pytest.raises(ValueError, match="8 independent leads"):
        expand_leads(torch.zeros(2, 12, 1024))


def test_least_squares_recovers_leads_from_any_two_limb_leads() -> None:
    independent = random_independent(1, dtype=torch.float64)
    ecg = expand_leads(independent)
    limb = ("I", "II", "III", "aVR", "aVL", "aVF")
    pairs = [(a, b) for i, a in enumerate(limb) for b in limb[i + 1 :]]
    for first, second in pairs:
        recorded = torch.zeros(1, 12, dtype=torch.bool)
        recorded[0, [LEAD_INDEX[first], LEAD_INDEX[second]]] = True
        recorded[0, LEAD_INDEX["V3"]] = True
        fitted = independent_from_recorded(ecg, recorded)
        torch.testing.assert_close(fitted[:, :2], independent[:, :2], msg=f"{first}+{second}")
        torch.testing.assert_close(fitted[:, 4], independent[:, 4])  # V3 recorded
        assert torch.all(fitted[:, [2, 3, 5, 6, 7]] == 0)  # unrecorded precordials: minimum norm


def test_least_squares_with_one_limb_lead_and_junk_elsewhere() -> None:
    independent = random_independent(2, dtype=torch.float64)
    ecg = expand_leads(independent)
    ecg[:, LEAD_INDEX["I"]] = float("nan")  # unrecorded samples may hold anything
    recorded = torch.zeros(2, 12, dtype=torch.bool)
    recorded[:, LEAD_INDEX["II"]] = True
    fitted = independent_from_recorded(ecg, recorded)
    assert torch.isfinite(fitted).all()
    torch.testing.assert_close(fitted[:, 1], independent[:, 1])  # II as recorded
    assert torch.all(fitted[:, 0] == 0)  # I is undetermined -> 0
    # full 12 leads of a physical ECG: the projection is the identity
    full = torch.ones(2, 12, dtype=torch.bool)
    clean = expand_leads(independent)
    torch.testing.assert_close(project_to_physics(clean, full), clean)
