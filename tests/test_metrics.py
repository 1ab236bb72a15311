"""Evaluation metrics against hand-computed cases, invariants, and real BIDMC heart rate."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bidmc_windows_table, require_data

from p2es_dist.constants import FS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.evaluate import diagnostic, metrics


def _one(values: list[float]) -> np.ndarray:
    """A single-window single-lead (1, 1, L) array."""
    return np.asarray(values, dtype=np.float64)[None, None, :]


def test_pointwise_metrics_hand_computed():
    target, prediction = _one([1.0, 2.0, 3.0, 4.0]), _one([1.0, 1.0, 5.0, 4.0])
    got = {k: v[0, 0] for k, v in metrics.pointwise_errors(target, prediction, np.ones((1, 1), bool)).items()}
    # errors 0, -1, 2, 0
    assert got["mse"] == pytest.approx(5 / 4)
    assert got["mae"] == pytest.approx(3 / 4)
    assert got["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert got["rrmse"] == pytest.approx(np.sqrt(5) / np.sqrt(30))
    # centred: t = (-1.5, -0.5, 0.5, 1.5), p = (-1.75, -1.75, 2.25, 1.25)
    r = (2.625 + 0.875 + 1.125 + 1.875) / np.sqrt(5.0 * 12.75)
    assert got["pearson"] == pytest.approx(r)
    assert got["amp_ratio"] == pytest.approx(4 / 3)  # peak-to-peak 4 (1 .. 5) over 3 (1 .. 4)


def test_amp_ratio_sees_a_flattened_qrs_that_pearson_forgives():
    """A spike averaged over +-2 samples of where it might fall keeps a high Pearson at a fifth of the height."""
    target = np.zeros((1, 1, 64))
    target[0, 0, 30] = 1.0
    hedged = np.zeros_like(target)
    hedged[0, 0, 28:33] = 0.2
    got = metrics.pointwise_errors(target, hedged, np.ones((1, 1), bool))
    assert got["pearson"][0, 0] > 0.4
    assert got["amp_ratio"][0, 0] == pytest.approx(0.2)
    flat = metrics.pointwise_errors(np.zeros_like(target), hedged, np.ones((1, 1), bool))
    assert np.isnan(flat["amp_ratio"][0, 0])  # undefined against a flat recording


def test_perfect_and_zero_predictions_and_mask():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(3, N_LEADS, 128))
    mask = np.ones((3, N_LEADS), bool)
    mask[1, 4:] = False
    perfect = metrics.window_metrics(target, target.copy(), mask)
    assert np.nanmax(perfect["mse"]) == 0.0 and np.nanmax(perfect["dtw"]) == 0.0
    assert np.allclose(perfect["pearson"][mask], 1.0)
    assert np.isnan(perfect["mse"][1, 4:]).all()  # unmasked leads never enter
    zero = metrics.pointwise_errors(target, np.zeros_like(target), mask)
    assert np.allclose(zero["rrmse"][mask], 1.0)
    assert np.allclose(zero["mse"][mask], np.mean(target**2, axis=-1)[mask])
    assert np.isnan(zero["pearson"][mask]).all()  # undefined against a constant, so left out of every mean


def test_dtw_hand_computed_band_and_shift():
    # One warping step absorbs a one-sample shift: a = 0 1 2 0 0, b = 0 0 1 2 0 -> DTW 0.
    a, b = np.array([0.0, 1, 2, 0, 0]), np.array([0.0, 0, 1, 2, 0])
    assert metrics.dtw_distance(a, b, window=2) == pytest.approx(0.0)
    assert metrics.dtw_distance(a, b, window=1) == pytest.approx(np.abs(a - b).sum())  # diagonal only: L1
    # |a-b| local cost: 0 vs 3 (two samples) can only align 3 to 0 -> sum of |.| = 6 with no warping gain.
    assert metrics.dtw_distance(np.zeros(2), np.full(2, 3.0), window=2) == pytest.approx(6.0)
    # Band: |i - j| <= round(0.1 L) = 102 for L = 1024, dtaidistance's exclusive bound one more.
    assert metrics.sakoe_chiba_window(WINDOW) == 103
    spike_a, spike_b = np.zeros(WINDOW), np.zeros(WINDOW)
    spike_a[300], spike_b[300 + 102] = 1.0, 1.0
    assert metrics.dtw_distance(spike_a, spike_b, window=metrics.sakoe_chiba_window(WINDOW)) == pytest.approx(0)
    spike_b[:] = 0.0
    spike_b[300 + 103] = 1.0  # just outside the band: the spikes cannot be matched
    assert metrics.dtw_distance(spike_a, spike_b, window=metrics.sakoe_chiba_window(WINDOW)) == pytest.approx(2)


def test_dtw_of_shifted_copy_below_euclidean_and_mae():
    t = np.arange(WINDOW) / FS
    target = np.sin(2 * np.pi * 1.3 * t) + 0.3 * np.sin(2 * np.pi * 7.0 * t)
    shifted = np.roll(target, 12)
    values = metrics.window_metrics(target[None, None], shifted[None, None], np.ones((1, 1), bool))
    dtw = values["dtw"][0, 0]
    assert 0 < dtw < np.linalg.norm(target - shifted) / WINDOW
    assert dtw < 0.2 * values["mae"][0, 0]  # the diagonal is one admissible path, warping does far better


def test_bootstrap_pools_subjects_and_contains_point():
    rng = np.random.default_rng(1)
    subjects = np.repeat(np.arange(20), 5)
    values = rng.normal(loc=2.0, size=(100, 3))
    values[:10, 2] = np.nan
    point, low, high = metrics.subject_bootstrap(values, subjects, n_boot=500, seed=0)
    assert np.allclose(point[:3], np.nanmean(values, axis=0))
    assert point[3] == pytest.approx(np.nanmean(values, axis=0).mean())
    assert np.all(low <= point) and np.all(point <= high) and np.all(high - low > 0)
    # One subject only: every replicate is the same data, the interval collapses.
    p1, l1, h1 = metrics.subject_bootstrap(values[:5, :1], subjects[:5], n_boot=50)
    assert l1[0] == pytest.approx(p1[0]) and h1[0] == pytest.approx(p1[0])


def test_aggregate_means_over_windows_then_leads():
    per_window = {"mse": np.array([[1.0, np.nan], [3.0, 10.0]])}
    mask = np.array([[True, False], [True, True]])
    padded_mask = np.zeros((2, N_LEADS), bool)
    padded_mask[:, :2] = mask
    padded = {"mse": np.full((2, N_LEADS), np.nan)}
    padded["mse"][:, :2] = per_window["mse"]
    out = metrics.aggregate(padded, padded_mask, ["a", "b"], n_boot=100)
    assert out["leads"]["I"]["mse"] == pytest.approx(2.0) and out["leads"]["I"]["n"] == 2
    assert out["leads"]["II"]["mse"] == pytest.approx(10.0) and out["leads"]["II"]["n"] == 1
    assert out["overall"]["mse"] == pytest.approx(6.0) and set(out["leads"]) == {"I", "II"}


def test_frechet_distance_identical_and_shifted():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert metrics.frechet_distance(features, features + shift) == pytest.approx(shift @ shift, rel=1e-6)
    # Different spread, same mean: for 1-D Gaussians FD = (sigma_a - sigma_b)^2.
    x = rng.normal(size=(5000, 1))
    x -= x.mean()
    assert metrics.frechet_distance(x, 3.0 * x) == pytest.approx((np.std(x, ddof=1) * 2) ** 2, rel=1e-6)
    # Fewer windows than features: still finite (regularised), still ~0 for identical sets.
    few = rng.normal(size=(4, 16))
    assert metrics.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-3)


def test_auroc_and_binary_metrics_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.2])
    targets = np.array([1, 0, 1, 1, 0, 0], bool)
    # pairs (pos, neg): 9 in all; misordered: (0.7, 0.8), (0.6, 0.8) -> 7/9
    assert diagnostic.auroc(scores, targets) == pytest.approx(7 / 9)
    assert diagnostic.auroc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)  # tie counts 1/2
    assert diagnostic.auroc(scores, np.ones(6, bool)) is None
    got = diagnostic.binary_metrics(scores, targets)  # predicted positive: 0.9, 0.8, 0.7, 0.6
    assert got["sensitivity"] == pytest.approx(1.0) and got["specificity"] == pytest.approx(2 / 3)
    assert got["precision"] == pytest.approx(3 / 4) and got["f1"] == pytest.approx(6 / 7)
    assert (got["n_pos"], got["n"]) == (3, 6)


def test_label_metrics_skip_unlabelled_windows_and_labels_without_positives():
    labels = np.zeros((4, 13), np.float32)
    labels[0, 1] = 1  # MI
    labels[1, 0] = 1  # NORM
    # windows 2 and 3 carry no label: unknown, skipped
    probabilities = np.full((4, 13), 0.9, np.float32)
    out = diagnostic.label_metrics(probabilities, labels)
    assert set(out) == {"NORM", "MI"} and out["MI"]["n"] == 2 and out["MI"]["n_pos"] == 1


@pytest.mark.real_data
def test_heart_rate_of_real_bidmc_lead_ii_matches_the_monitor():
    import pandas as pd

    from p2es_dist.data.batches import table_to_batch

    root = require_data("bidmc", "bidmc_csv")
    table = bidmc_windows_table(6, records=("bidmc_01",))
    batch = table_to_batch(table)
    lead_ii = batch["ecg"][:, LEAD_INDEX["II"]] * batch["scale"][:, None]
    rates = metrics.heart_rates(lead_ii)
    numerics = pd.read_csv(root / "bidmc_01_Numerics.csv", skipinitialspace=True)
    numerics.columns = [c.strip() for c in numerics.columns]
    starts = table.column("start").to_numpy() / FS
    monitor = np.array([numerics.loc[(numerics["Time [s]"] >= s) & (numerics["Time [s]"] < s + WINDOW / FS),
                                     "HR"].mean() for s in starts])
    assert np.isfinite(rates).all()
    assert np.max(np.abs(rates - monitor)) < 4.0, (rates, monitor)
    # A flat or too-short trace has too few peaks: excluded, not a number.
    assert np.isnan(metrics.heart_rate(np.zeros(WINDOW)))
    assert np.isnan(metrics.heart_rate(lead_ii[0, : FS * 2]))  # 2 s: fewer than HR_MIN_PEAKS beats
