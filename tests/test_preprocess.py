"""Preprocessing: resampling, band-pass, gap repair and artefact rejection, on synthetic and real records."""

import numpy as np
import pytest
from conftest import require_data

from p2es_dist.constants import FS, LEAD_INDEX, WINDOW
from p2es_dist.data.preprocess import PreprocessConfig, make_windows, resample, window_starts
from p2es_dist.data.record import Record, RecordError


def _record(seconds=40.0, fs=500.0, with_ppg=True, **signals):
    t = np.arange(int(seconds * fs)) / fs
    noise = np.random.default_rng(0).normal(scale=0.01, size=t.size)  # real baselines are never exactly flat
    beat = np.exp(-(((t % 0.8) - 0.4) ** 2) / (2 * 0.01**2)) + noise  # 75 bpm spikes
    ecg = {"II": beat.copy(), "I": 0.5 * beat.copy()}
    ecg.update({k: v for k, v in signals.items() if k != "ppg"})
    ppg = signals.get("ppg", np.sin(2 * np.pi * 1.25 * t) if with_ppg else None)
    return Record(source="t", record="r", subject_id="s", fs=fs, ecg=ecg, ppg=ppg)


@pytest.mark.parametrize("fs_in", [100, 125, 250, 360, 400, 500, 1000])
def test_resample_preserves_duration_and_a_sine(fs_in):
    t = np.arange(fs_in * 20) / fs_in
    out = resample(np.sin(2 * np.pi * 2.0 * t), fs_in)
    assert len(out) == FS * 20
    expected = np.sin(2 * np.pi * 2.0 * np.arange(FS * 20) / FS)
    assert np.abs(out[200:-200] - expected[200:-200]).max() < 0.01


def test_windows_shape_hop_and_mask():
    windows = make_windows(_record(seconds=40.0), PreprocessConfig(hop=256))
    n_samples = 40 * FS
    assert np.array_equal(windows.start, window_starts(n_samples, 256))
    assert windows.ecg.shape == (len(windows.start), 12, WINDOW)
    assert windows.ecg_mask[:, [LEAD_INDEX["I"], LEAD_INDEX["II"]]].all()
    assert not windows.ecg_mask[:, LEAD_INDEX["V1"]].any() and np.all(windows.ecg[:, LEAD_INDEX["V1"]] == 0)
    assert windows.ppg.shape == (len(windows.start), WINDOW)
    assert windows.rejected == []


def test_band_pass_removes_baseline_and_mains():
    fs = 500.0
    t = np.arange(int(30 * fs)) / fs
    drift = 5.0 + 2.0 * t / t[-1]  # DC offset plus a slow drift
    mains = 0.5 * np.sin(2 * np.pi * 50 * t)
    windows = make_windows(_record(seconds=30, fs=fs, II=drift + mains), PreprocessConfig())
    lead = windows.ecg[:, LEAD_INDEX["II"], 100:-100]
    assert np.abs(lead.mean()) < 0.01 and lead.std() < 0.01


def test_short_nan_gap_is_interpolated_long_gap_rejects_windows():
    fs = 250.0
    ppg = np.sin(2 * np.pi * 1.2 * np.arange(int(60 * fs)) / fs)
    ppg[1000:1050] = np.nan  # 0.2 s: repaired
    ppg[10000:10500] = np.nan  # 2 s: windows covering it are rejected
    windows = make_windows(_record(seconds=60, fs=fs, ppg=ppg), PreprocessConfig())
    assert np.isfinite(windows.ppg).all()
    gap_start = 10000 / fs * FS
    covering = [r for r in windows.rejected if r["start"] <= gap_start < r["start"] + WINDOW + 2 * FS]
    assert covering and all("NaN gap in PPG" in r["reason"] for r in covering)
    assert all(not (s <= gap_start + 1 and gap_start < s + WINDOW - 1) for s in windows.start)


def test_flat_lead_is_masked_but_window_kept():
    fs = 500.0
    t = np.arange(int(30 * fs)) / fs
    lead_i = 0.5 * np.exp(-(((t % 0.8) - 0.4) ** 2) / 2e-4) + np.random.default_rng(1).normal(scale=0.01, size=t.size)
    lead_i[: int(15 * fs)] = 0.123  # lead off for 15 s
    windows = make_windows(_record(seconds=30, fs=fs, I=lead_i), PreprocessConfig())
    first = windows.start == 0
    assert first.any()
    assert not windows.ecg_mask[first, LEAD_INDEX["I"]].any() and windows.ecg_mask[first, LEAD_INDEX["II"]].all()
    assert windows.ecg_mask[:, LEAD_INDEX["I"]].any()  # later windows keep lead I


def test_saturated_ppg_rejects_the_window():
    fs = 125.0
    t = np.arange(int(40 * fs)) / fs
    ppg = np.sin(2 * np.pi * 1.2 * t)
    ppg[2000:2100] = ppg.max()  # clipped at the rail for 0.8 s (shorter than a flat line)
    windows = make_windows(_record(seconds=40, fs=fs, ppg=ppg), PreprocessConfig())
    assert any("saturation in PPG" in r["reason"] for r in windows.rejected)


def test_too_short_and_empty_records_raise():
    with pytest.raises(RecordError, match="shorter than one window"):
        make_windows(_record(seconds=5.0), PreprocessConfig())
    with pytest.raises(RecordError, match="no ECG lead and no PPG"):
        make_windows(Record(source="t", record="r", subject_id="s", fs=125, ecg={}), PreprocessConfig())


def test_quality_is_high_on_clean_and_low_on_noise():
    rng = np.random.default_rng(0)
    clean = make_windows(_record(seconds=30), PreprocessConfig())
    noisy_ecg = {"II": rng.normal(size=30 * 500)}
    noisy_record = _record(seconds=30, **noisy_ecg, ppg=rng.normal(size=30 * 500))
    noisy = make_windows(noisy_record, PreprocessConfig(min_quality=0.0))  # the index itself, nothing rejected
    assert clean.quality.min() > 0.8
    assert noisy.quality.max() < clean.quality.min()
    # The default min_quality rejects windows of noise and says why.
    rejected = make_windows(noisy_record, PreprocessConfig())
    assert len(rejected.start) == 0 and all("below 0.10" in r["reason"] for r in rejected.rejected)


@pytest.mark.real_data
def test_real_bidmc_record_windows():
    from p2es_dist.data.sources import bidmc

    root = require_data("bidmc")
    windows = make_windows(bidmc.read_record(root, "bidmc_csv/bidmc_03"), PreprocessConfig())
    assert len(windows.start) + len(windows.rejected) == (480 * FS - WINDOW) // 512 + 1
    assert all("beats disagree" in r["reason"] for r in windows.rejected) and len(windows.rejected) <= 4
    assert windows.ecg_mask[:, LEAD_INDEX["II"]].all()
    # BIDMC scaled each signal on its own: only lead II is kept, so no lead of other units meets it.
    assert windows.ecg_mask.sum(axis=1).max() == 1
    assert np.isfinite(windows.ecg).all() and np.isfinite(windows.ppg).all()
    assert np.median(windows.quality) > 0.5
