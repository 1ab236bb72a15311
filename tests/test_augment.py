"""Training-time augmentations: determinism, masks, STAR invariants, and each augmentation's signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2es_dist.config import from_dict
from p2es_dist.constants import FS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.data.augment import (
    MAX_STAR_TIME_STRENGTH,
    AugmentConfig,
    augment_batch,
    find_r_peaks,
    ppg_shifts,
    shift_edge_padded,
    star_warp,
)
from p2es_dist.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
BIDMC_01 = DATA_ROOT / "bidmc" / "bidmc_csv" / "bidmc_01_Signals.csv.gz"

I, II, III = LEAD_INDEX["I"], LEAD_INDEX["II"], LEAD_INDEX["III"]
BEAT_SAMPLES = 100  # 75 bpm at 125 Hz
FIRST_BEAT = 45
ALL_OFF = dict(star_p=0.0, amp_scale_p=0.0, baseline_wander_p=0.0, ppg_motion_p=0.0)


def only(**probabilities: float) -> AugmentConfig:
    """A config with every augmentation off except the ones given."""
    return AugmentConfig(**{**ALL_OFF, **probabilities})


def _gaussians(centres: np.ndarray, width: float) -> np.ndarray:
    t = np.arange(WINDOW)
    return np.exp(-0.5 * ((t[None, :] - centres[:, None]) / width) ** 2).sum(axis=0)


def synthetic_row(shift: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ppg, ecg, true R-peaks): Gaussian QRS at 75 bpm with T waves in I and II, III = II - I, a V lead."""
    r_peaks = np.arange(FIRST_BEAT + shift, WINDOW - 30, BEAT_SAMPLES)
    beats = _gaussians(r_peaks, 2.0) + 0.25 * _gaussians(r_peaks + 35, 7.0) - 0.1 * _gaussians(r_peaks + 5, 2.0)
    ecg = np.zeros((N_LEADS, WINDOW), np.float32)
    ecg[II] = beats
    ecg[I] = 0.55 * beats + 0.02 * np.sin(2 * np.pi * np.arange(WINDOW) / 300)
    ecg[III] = ecg[II] - ecg[I]  # exact in float32, as the Einthoven relation of a real 12-lead
    ecg[LEAD_INDEX["V2"]] = -0.7 * beats
    ppg = (2.0 * _gaussians(r_peaks + 30, 12.0) - 1.0).astype(np.float32)
    return ppg, ecg, r_peaks


def synthetic_batch() -> dict[str, np.ndarray]:
    """Four windows: full pair, PPG absent, ECG-only limb leads, and no ECG lead at all."""
    rows = [synthetic_row(shift) for shift in (0, 7, 13, 21)]
    ppg = np.stack([row[0] for row in rows])
    ecg = np.stack([row[1] for row in rows])
    ecg_mask = np.zeros((4, N_LEADS), bool)
    ecg_mask[:, [I, II, III, LEAD_INDEX["V2"]]] = True
    ecg_mask[2, LEAD_INDEX["V2"]] = False
    ecg_mask[3] = False
    ppg_mask = np.array([True, False, True, True])
    ecg *= ecg_mask[:, :, None]  # the shard contract: absent leads are zeros
    ppg *= ppg_mask[:, None]
    return {
        "ppg": ppg, "ppg_mask": ppg_mask, "ecg": ecg, "ecg_mask": ecg_mask,
        "window_id": np.array([f"synthetic:r:{i}" for i in range(4)]), "age": np.full(4, 50.0, np.float32),
    }


def test_same_seed_same_output_and_other_seed_differs():
    batch, config = synthetic_batch(), AugmentConfig(star_p=1, amp_scale_p=1, baseline_wander_p=1, ppg_motion_p=1)
    first, again = augment_batch(batch, config, seed=3), augment_batch(batch, config, seed=3)
    other = augment_batch(batch, config, seed=4)
    for key in ("ppg", "ecg"):
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], other[key])
        assert first[key].dtype == np.float32 and first[key].shape == batch[key].shape


def test_input_is_not_mutated_and_extra_keys_pass_through():
    batch = synthetic_batch()
    original = {key: value.copy() for key, value in batch.items()}
    for value in batch.values():
        value.flags.writeable = False  # as Ray Data may hand out zero-copy, read-only arrays
    config = AugmentConfig(star_p=1, amp_scale_p=1, baseline_wander_p=1, ppg_motion_p=1)
    out = augment_batch(batch, config, seed=0)
    for key, value in original.items():
        np.testing.assert_array_equal(batch[key], value)
    assert out["window_id"] is batch["window_id"] and out["age"] is batch["age"]
    assert out["ecg"] is not batch["ecg"] and not np.array_equal(out["ecg"], batch["ecg"])


def test_disabled_config_is_identity():
    batch = synthetic_batch()
    out = augment_batch(batch, AugmentConfig(enabled=False), seed=0)
    assert out is not batch and out.keys() == batch.keys()
    for key in batch:
        np.testing.assert_array_equal(out[key], batch[key])
    # All probabilities zero is an identity too, through the enabled code path.
    out = augment_batch(batch, only(), seed=0)
    for key in batch:
        np.testing.assert_array_equal(out[key], batch[key])


@pytest.mark.parametrize("seed", range(5))
def test_absent_leads_and_absent_ppg_stay_exactly_zero(seed):
    batch = synthetic_batch()
    config = AugmentConfig(star_p=1, amp_scale_p=1, baseline_wander_p=1, ppg_motion_p=1, ppg_motion_amp=1.0)
    out = augment_batch(batch, config, seed=seed)
    assert np.all(out["ecg"][~batch["ecg_mask"]] == 0.0)
    assert np.all(out["ppg"][~batch["ppg_mask"]] == 0.0)
    assert np.all(np.abs(out["ecg"][batch["ecg_mask"]]).max(axis=-1) > 0.1)


def test_r_peaks_of_the_synthetic_window_are_the_qrs_centres():
    _, ecg, true_peaks = synthetic_row()
    np.testing.assert_array_equal(find_r_peaks(ecg[II]), true_peaks)
    np.testing.assert_array_equal(find_r_peaks(ecg[LEAD_INDEX["V2"]]), true_peaks)  # negative QRS
    single_beat = np.zeros(WINDOW, np.float32)
    single_beat[500] = 1.0
    assert find_r_peaks(single_beat).size == 1
    assert find_r_peaks(np.zeros(WINDOW, np.float32)).size == 0


def _star_invariants(before_ppg, before_ecg, after_ppg, after_ecg, r_peaks):
    first, last = r_peaks[0], r_peaks[-1]
    for before, after in ((before_ecg, after_ecg), (before_ppg[None], after_ppg[None])):
        np.testing.assert_array_equal(after[:, :first], before[:, :first])  # head
        np.testing.assert_array_equal(after[:, last:], before[:, last:])  # tail, last R-peak included
        np.testing.assert_array_equal(after[:, r_peaks], before[:, r_peaks])  # R-peaks stay put
    assert np.abs(after_ecg[II, first:last] - before_ecg[II, first:last]).max() > 1e-2
    assert np.abs(after_ppg[first:last] - before_ppg[first:last]).max() > 1e-2


@pytest.mark.parametrize("seed", range(4))
def test_star_keeps_head_tail_and_r_peaks_and_warps_between(seed):
    batch = synthetic_batch()
    config = only(star_p=1.0, star_time_strength=0.3, star_amp_strength=0.3)
    out = augment_batch(batch, config, seed=seed)
    for row in (0, 2):
        r_peaks = find_r_peaks(batch["ecg"][row, II])
        assert r_peaks.size >= 9
        _star_invariants(batch["ppg"][row], batch["ecg"][row], out["ppg"][row], out["ecg"][row], r_peaks)
    np.testing.assert_array_equal(out["ppg"][3], batch["ppg"][3])  # no ECG lead: nothing to align to


def test_star_moves_ppg_and_ecg_with_the_same_warp():
    batch = synthetic_batch()
    batch["ppg"][0] = batch["ecg"][0, II]  # a PPG channel that is a copy of lead II must stay one
    out = augment_batch(batch, only(star_p=1.0, star_time_strength=0.3, star_amp_strength=0.3), seed=0)
    assert not np.array_equal(out["ppg"][0], batch["ppg"][0])
    np.testing.assert_array_equal(out["ppg"][0], out["ecg"][0, II])


def test_star_uses_the_first_recorded_lead_when_ii_is_absent():
    batch = synthetic_batch()
    batch["ecg_mask"][0] = False
    batch["ecg_mask"][0, LEAD_INDEX["V2"]] = True
    batch["ecg"][0] *= batch["ecg_mask"][0][:, None]
    out = augment_batch(batch, only(star_p=1.0, star_time_strength=0.3), seed=1)
    r_peaks = find_r_peaks(batch["ecg"][0, LEAD_INDEX["V2"]])
    first, last = r_peaks[0], r_peaks[-1]
    np.testing.assert_array_equal(out["ppg"][0, :first], batch["ppg"][0, :first])
    np.testing.assert_array_equal(out["ppg"][0, r_peaks], batch["ppg"][0, r_peaks])
    assert not np.array_equal(out["ppg"][0, first:last], batch["ppg"][0, first:last])


def test_star_leaves_windows_with_fewer_than_three_beats_unchanged():
    batch = synthetic_batch()
    two_beats = np.zeros(WINDOW, np.float32)
    two_beats[[300, 700]] = 1.0
    batch["ecg"][0, [I, II, III]] = two_beats
    out = augment_batch(batch, only(star_p=1.0, star_time_strength=0.3), seed=0)
    np.testing.assert_array_equal(out["ecg"][0], batch["ecg"][0])
    np.testing.assert_array_equal(out["ppg"][0], batch["ppg"][0])
    assert not np.array_equal(out["ecg"][2], batch["ecg"][2])


@pytest.mark.parametrize("seed", range(4))
def test_star_preserves_einthoven_relation(seed):
    batch = synthetic_batch()
    out = augment_batch(batch, only(star_p=1.0, star_time_strength=0.3, star_amp_strength=0.5), seed=seed)
    ecg = out["ecg"]
    assert not np.array_equal(ecg[:, III], batch["ecg"][:, III])
    # Exact up to float32 rounding of the interpolation: linear relations survive a shared linear resampling.
    np.testing.assert_allclose(ecg[:, III], ecg[:, II] - ecg[:, I], rtol=0, atol=2e-7)
    np.testing.assert_allclose(ecg[:2, LEAD_INDEX["V2"]], -0.7 * ecg[:2, II], rtol=0, atol=2e-7)  # V2 recorded


def test_star_warp_is_monotone_and_fixes_the_r_peaks_at_maximal_strength():
    r_peaks = np.array([40, 130, 260, 330, 480, 1000])
    time_index = np.arange(WINDOW, dtype=np.float64)[None, :]
    n_beats = r_peaks.size - 1
    strength = np.nextafter(MAX_STAR_TIME_STRENGTH, 0.0)
    source = star_warp(time_index, r_peaks, np.full(n_beats, strength), np.zeros(n_beats))[0]
    assert np.all(np.diff(source) > 0)
    np.testing.assert_array_equal(source[r_peaks], r_peaks)
    assert np.abs(source - time_index[0]).max() > 0.99 * strength * 520  # the longest beat moves the most
    gain = star_warp(np.ones((1, WINDOW)), r_peaks, np.zeros(n_beats), np.full(n_beats, 0.5))[0]
    np.testing.assert_allclose(gain[(r_peaks[:-1] + r_peaks[1:]) // 2], 1.5, atol=1e-3)  # mid-beat: 1 + b
    np.testing.assert_array_equal(gain[r_peaks], 1.0)


def test_amplitude_scaling_keeps_inter_lead_ratios():
    batch = synthetic_batch()
    out = augment_batch(batch, only(amp_scale_p=1.0, amp_scale_range=(0.5, 1.5)), seed=2)
    ecg_factors = []
    for row in range(3):
        recorded = np.flatnonzero(batch["ecg_mask"][row])
        nonzero = np.abs(batch["ecg"][row, recorded]) > 1e-3
        ratio = out["ecg"][row, recorded][nonzero] / batch["ecg"][row, recorded][nonzero]
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-5)  # one factor for every lead
        ecg_factors.append(ratio.mean())
    assert all(0.5 <= factor <= 1.5 for factor in ecg_factors) and len(set(ecg_factors)) == 3
    ppg_ratio = out["ppg"][0] / batch["ppg"][0]
    np.testing.assert_allclose(ppg_ratio, ppg_ratio.mean(), rtol=1e-5)
    assert 0.5 <= ppg_ratio.mean() <= 1.5 and abs(ppg_ratio.mean() - ecg_factors[0]) > 1e-4  # its own factor


def test_baseline_wander_is_below_one_hertz_and_shared_in_phase_across_leads():
    batch = synthetic_batch()
    out = augment_batch(batch, only(baseline_wander_p=1.0, baseline_wander_amp=0.2), seed=5)
    np.testing.assert_array_equal(out["ppg"], batch["ppg"])
    wander = (out["ecg"] - batch["ecg"]).astype(np.float64)
    for row in range(3):
        recorded = np.flatnonzero(batch["ecg_mask"][row])
        added = wander[row, recorded]
        assert np.abs(added).max() > 1e-2
        power = np.abs(np.fft.rfft(added, axis=-1)) ** 2
        hz = np.fft.rfftfreq(WINDOW, d=1.0 / FS)
        assert power[:, hz < 1.0].sum() / power.sum() > 0.95
        # One waveform (same phase) on every lead, scaled by a lead-specific gain.
        gain = added @ added[0] / (added[0] @ added[0])
        assert np.all(gain > 0.3)
        np.testing.assert_allclose(added, gain[:, None] * added[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_ppg_motion_touches_only_limited_segments_of_recorded_ppg(seed):
    batch = synthetic_batch()
    out = augment_batch(batch, only(ppg_motion_p=1.0, ppg_motion_amp=0.8), seed=seed)
    np.testing.assert_array_equal(out["ecg"], batch["ecg"])
    np.testing.assert_array_equal(out["ppg"][1], 0.0)
    for row in (0, 2, 3):
        changed = np.flatnonzero(out["ppg"][row] != batch["ppg"][row])
        assert 0 < changed.size <= 2 * 2 * FS  # at most two segments of at most 2 s
        assert np.abs(out["ppg"][row] - batch["ppg"][row]).max() > 0.1 * 0.8


def test_config_is_checked_and_builds_from_yaml_like_dicts():
    config = from_dict(AugmentConfig, {"star_p": 1, "amp_scale_range": [0.9, 1.1]})
    assert config.amp_scale_range == (0.9, 1.1) and config.star_p == 1.0
    with pytest.raises(ConfigError, match="star_time_strength"):
        from_dict(AugmentConfig, {"star_time_strength": 0.4})
    with pytest.raises(ConfigError, match="ppg_motion_p"):
        from_dict(AugmentConfig, {"ppg_motion_p": 1.5})
    with pytest.raises(ConfigError, match="baseline_wander_hz"):
        from_dict(AugmentConfig, {"baseline_wander_hz": [0.5, 0.1]})


def test_ppg_shift_of_zero_is_the_identity_and_draws_nothing():
    batch = synthetic_batch()
    assert AugmentConfig().ppg_shift_ms == 0.0  # off by default
    assert not ppg_shifts(only(), 4, seed=3).any()
    out = augment_batch(batch, only(ppg_shift_ms=0.0), seed=3)
    np.testing.assert_array_equal(out["ppg"], batch["ppg"])
    np.testing.assert_array_equal(out["ecg"], batch["ecg"])
    # With other augmentations on, a zero shift leaves their draws (and results) as they were.
    others = dict(star_p=1.0, amp_scale_p=1.0, ppg_motion_p=1.0)
    np.testing.assert_array_equal(augment_batch(batch, only(**others), seed=3)["ppg"],
                                  augment_batch(batch, only(**others, ppg_shift_ms=0.0), seed=3)["ppg"])


def test_ppg_shift_moves_a_ppg_impulse_by_the_drawn_amount():
    n, at = 64, WINDOW // 2
    ppg = np.zeros((n, WINDOW), np.float32)
    ppg[:, at] = 1.0
    ecg = np.zeros((n, N_LEADS, WINDOW), np.float32)
    ecg[:, II, at] = 1.0
    ppg_mask = np.ones(n, bool)
    ppg_mask[0] = False
    ppg[0] = 0.0
    batch = {"ppg": ppg, "ppg_mask": ppg_mask, "ecg": ecg, "ecg_mask": np.ones((n, N_LEADS), bool)}
    config = only(ppg_shift_ms=40.0)  # +-5 samples at 125 Hz
    shifts = ppg_shifts(config, n, seed=11)
    assert np.abs(shifts).max() <= round(0.040 * FS) and shifts.min() < 0 < shifts.max()
    out = augment_batch(batch, config, seed=11)
    for row in range(1, n):
        assert int(np.argmax(out["ppg"][row])) == at + shifts[row] and out["ppg"][row].sum() == 1.0
    assert not out["ppg"][0].any()  # an absent PPG stays zeros
    np.testing.assert_array_equal(out["ecg"], ecg)  # only the PPG moves
    np.testing.assert_array_equal(out["ppg"], augment_batch(batch, config, seed=11)["ppg"])  # seeded
    assert not np.array_equal(shifts, ppg_shifts(config, n, seed=12))


def test_shift_edge_padded_repeats_the_edge_rather_than_wrapping():
    rows = np.tile(np.arange(1.0, 6.0), (3, 1))
    np.testing.assert_array_equal(shift_edge_padded(rows, np.array([2, -2, 0])),
                                  [[1, 1, 1, 2, 3], [3, 4, 5, 5, 5], [1, 2, 3, 4, 5]])
    with pytest.raises(ConfigError, match="ppg_shift_ms"):
        from_dict(AugmentConfig, {"ppg_shift_ms": -5})


@pytest.mark.real_data
@pytest.mark.skipif(not BIDMC_01.exists(), reason=f"real BIDMC data not found at {BIDMC_01}")
def test_star_on_a_real_bidmc_window():
    pd = pytest.importorskip("pandas")
    signals = pd.read_csv(BIDMC_01)
    signals.columns = [name.strip() for name in signals.columns]
    lead_ii = signals["II"].to_numpy(np.float64)[:WINDOW]
    pleth = signals["PLETH"].to_numpy(np.float64)[:WINDOW]
    ecg = np.zeros((1, N_LEADS, WINDOW), np.float32)
    ecg[0, II] = lead_ii / np.abs(lead_ii).max()  # model space: one scale for all leads
    ppg = (2 * (pleth - pleth.min()) / (pleth.max() - pleth.min()) - 1)[None].astype(np.float32)
    ecg_mask = np.zeros((1, N_LEADS), bool)
    ecg_mask[0, II] = True
    batch = {"ppg": ppg, "ppg_mask": np.array([True]), "ecg": ecg, "ecg_mask": ecg_mask}

    r_peaks = find_r_peaks(ecg[0, II])
    rr = np.diff(r_peaks)
    assert 8 <= r_peaks.size <= 20  # bidmc_01 is a regular rhythm near 90 bpm
    assert rr.std() / rr.mean() < 0.1
    out = augment_batch(batch, only(star_p=1.0, star_time_strength=0.2, star_amp_strength=0.2), seed=0)
    _star_invariants(ppg[0], ecg[0], out["ppg"][0], out["ecg"][0], r_peaks)


def test_star_warps_the_calibration_template_with_the_ecg_and_ppg():
    """A template placed by the PPG moves with the PPG: one equal to the ECG stays equal after STAR."""
    batch = synthetic_batch()
    batch["template"] = batch["ecg"].copy()
    out = augment_batch(batch, only(star_p=1), seed=0)
    assert not np.allclose(out["ecg"][0], batch["ecg"][0])  # STAR did warp this window
    np.testing.assert_allclose(out["template"], out["ecg"], atol=1e-6)
    np.testing.assert_array_equal(augment_batch(batch, only(amp_scale_p=1), seed=0)["template"], batch["template"])
