"""Beat timing, calibration profiles and template baselines on synthetic signals with known answers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from scipy.special import expit

from p2es_dist.constants import FS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile, estimate_profile, population_profile
from p2es_dist.errors import UserError
from p2es_dist.evaluate.metrics import lagged_pearson, pointwise_errors

PAT_S = 0.56


def synthetic_pair(seconds: float = 90.0, *, pat_s: float = PAT_S, rr_s: float = 0.8, seed: int = 0):
    """Lead II (QRS + T wave) with R-peaks at known places, and a PPG whose pulses rise `pat_s` later."""
    rng = np.random.default_rng(seed)
    n = int(seconds * FS)
    r_times = np.cumsum(rr_s + rng.uniform(-0.05, 0.05, int(seconds / rr_s) + 2))
    r_times = r_times[r_times < seconds - 1.0]
    t = np.arange(n) / FS
    ecg = np.zeros(n)
    ppg = np.zeros(n)
    for r in r_times:
        ecg += 1.2 * np.exp(-0.5 * ((t - r) / 0.012) ** 2) - 0.2 * np.exp(-0.5 * ((t - r - 0.03) / 0.015) ** 2)
        ecg += 0.3 * np.exp(-0.5 * ((t - r - 0.28) / 0.05) ** 2)
        # A pulse: fast rise (steepest point at r + pat_s), slow decay.
        ppg += expit((t - r - pat_s) / 0.03) * np.exp(-np.clip(t - r - pat_s, 0, None) / 0.35)
    return ecg, ppg, np.round(r_times * FS).astype(int)


def test_pulse_arrival_finds_a_known_delay_longer_than_the_beat():
    r = np.arange(50) * 100  # RR 0.8 s
    delay = 130  # 1.04 s: the previous beat's pulse lands 0.24 s after each R, inside the search range
    arrival = timing.pulse_arrival(r, r + delay)
    assert arrival is not None
    assert arrival.pat_s == pytest.approx(delay / FS)
    assert arrival.iqr_s == 0.0
    assert arrival.n_beats == 50


def test_pulse_arrival_needs_enough_beats():
    assert timing.pulse_arrival(np.arange(3) * 100, np.arange(3) * 100 + 70) is None


def test_beat_agreement_counts_beats_without_a_pulse():
    r = np.arange(20) * 100
    upstrokes = (r + 70)[::2]  # every other beat has no pulse
    assert timing.beat_agreement(r, upstrokes, 70 / FS) == pytest.approx(0.5)
    assert timing.beat_agreement(r, r + 70, 70 / FS) == 1.0


def test_render_places_beats_and_lets_the_next_p_wave_win():
    beat = np.arange(timing.BEAT_SAMPLES, dtype=np.float32)[None] + 1  # sample k of the beat has value k + 1
    out = timing.render_template(beat, np.array([100, 160]), 400)[0]
    assert out[100] == timing.BEAT_PRE + 1  # the R-peak sample of the first beat
    assert out[100 - timing.BEAT_PRE] == 1
    # 160 - BEAT_PRE = 122: from there on the second beat owns the samples, though the first still runs.
    assert out[122] == 1 and out[121] == 121 - 100 + timing.BEAT_PRE + 1
    assert out[160 + timing.BEAT_POST - 1] == timing.BEAT_SAMPLES
    assert out[160 + timing.BEAT_POST] == 0 and out[:100 - timing.BEAT_PRE].sum() == 0
    # A beat whose R lies before the window still draws its tail into it.
    tail = timing.render_template(beat, np.array([-10]), 50)[0]
    assert tail[0] == 10 + timing.BEAT_PRE + 1


def test_profile_of_a_synthetic_pair_reproduces_its_ecg():
    ecg, ppg, r = synthetic_pair()
    profile = estimate_profile({"II": ecg}, ppg, seconds=60.0, source="synthetic")
    assert profile is not None
    assert abs(profile.pat_s - PAT_S) <= 1.5 / FS  # within the PPG upstroke's sample grid
    assert profile.n_beats >= 60
    # The personal template placed at the PPG upstrokes after the calibration segment matches the ECG.
    template, mask = profile.template(timing.ppg_upstrokes(ppg), len(ecg))
    assert mask[LEAD_INDEX["II"]] and mask.sum() == 1
    scored = slice(60 * FS, len(ecg) - FS)
    pearson = np.corrcoef(ecg[scored], template[LEAD_INDEX["II"], scored])[0, 1]
    assert pearson > 0.9


def test_profile_json_round_trip_and_validation(tmp_path):
    ecg, ppg, _ = synthetic_pair()
    profile = estimate_profile({"II": ecg, "V1": -ecg}, ppg, seconds=60.0, source="synthetic")
    path = tmp_path / "profile.json"
    profile.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "p2es-calibration" and data["version"] == 1 and set(data["beat"]) == {"II", "V1"}
    again = CalibrationProfile.load(path)
    assert again.pat_s == pytest.approx(profile.pat_s)
    for lead in ("II", "V1"):
        np.testing.assert_allclose(again.beat[lead], profile.beat[lead], atol=1e-6)
    for broken, message in [
        ({**data, "format": "other"}, "not a calibration profile"),
        ({**data, "version": 99}, "version"),
        ({**data, "pat_s": 3.0}, "pat_s"),
        ({**data, "beat": {"X1": data["beat"]["II"]}}, "not one of"),
        ({**data, "beat": {"II": data["beat"]["II"][:5]}}, "samples"),
    ]:
        path.write_text(json.dumps(broken))
        with pytest.raises(UserError, match=message):
            CalibrationProfile.load(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        CalibrationProfile.load(path)


def test_population_profile_is_the_median_of_unit_peak_beats():
    beat = np.sin(np.linspace(0, np.pi, timing.BEAT_SAMPLES)).astype(np.float32)
    profiles = [CalibrationProfile(pat_s=p, pat_iqr_s=0, n_beats=20, beat={"II": beat * k}, seconds=60)
                for p, k in [(0.5, 1.0), (0.6, 5.0), (0.7, 0.2)]]
    population = population_profile(profiles)
    assert population.pat_s == pytest.approx(0.6)
    np.testing.assert_allclose(population.beat["II"], beat / np.abs(beat).max(), atol=1e-6)


def test_lagged_pearson_finds_the_shift_and_its_sign():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((2, N_LEADS, WINDOW))
    late = np.roll(target, 5, axis=-1)  # generated 5 samples (40 ms) late
    values = lagged_pearson(target, late, np.ones((2, N_LEADS), dtype=bool))
    np.testing.assert_allclose(values["pearson_lag"], 1.0, atol=1e-9)
    np.testing.assert_allclose(values["lag_ms"], 40.0)
    strict = pointwise_errors(target, late, np.ones((2, N_LEADS), dtype=bool))["pearson"]
    assert np.all(np.abs(strict) < 0.2)


def _paired_table(n_windows: int = 30):
    from p2es_dist.data.ingest_core import record_to_table
    from p2es_dist.data.preprocess import PreprocessConfig
    from p2es_dist.data.record import Record

    ecg, ppg, _ = synthetic_pair(seconds=120.0)
    record = Record(source="synthetic", record="pair", subject_id="s1", fs=FS, ecg={"II": ecg}, ppg=ppg)
    table, _ = record_to_table(record, PreprocessConfig())
    return table.slice(0, n_windows)


def test_ingest_stores_upstrokes_and_calibration_and_templates_skip_the_calibration_segment():
    from p2es_dist.data.batches import table_to_batch

    table = _paired_table()
    assert table.column("calib_end")[0].as_py() == 60 * FS
    assert abs(table.column("calib_pat_s")[0].as_py() - PAT_S) <= 1.5 / FS
    batch = table_to_batch(table)
    starts = table.column("start").to_numpy()
    inside = starts < 60 * FS
    assert not batch["template_mask"][inside].any()
    assert batch["template_mask"][~inside, LEAD_INDEX["II"]].all()
    ii = LEAD_INDEX["II"]
    pearson = [np.corrcoef(batch["ecg"][i, ii], batch["template"][i, ii])[0, 1] for i in np.flatnonzero(~inside)]
    assert min(pearson) > 0.85
    assert np.abs(batch["template"][~inside]).max() == pytest.approx(1.0)


def test_calibrated_protocol_scores_only_windows_after_the_segment_and_templates_know_the_answer():
    from p2es_dist.data.calibration import population_from_shards
    from p2es_dist.evaluate.templates import scored_rows, template_renders

    table = _paired_table()
    scored = scored_rows(table, "calibrated")
    assert len(scored) < len(table)
    assert (scored.column("start").to_numpy() >= scored.column("calib_end").to_numpy()).all()
    assert len(scored_rows(table, "zero-shot")) == len(table)
    # The population of one record is that record: its population template is its personal template.
    beats = np.asarray(table.column("calib_beat")[0].values.to_numpy(zero_copy_only=False), dtype=np.float32)
    profile = CalibrationProfile(pat_s=table.column("calib_pat_s")[0].as_py(), pat_iqr_s=0, n_beats=50,
                                 beat={"II": beats.reshape(N_LEADS, -1)[LEAD_INDEX["II"]]}, seconds=60)
    renders = template_renders(scored, population_profile([profile]), "calibrated")
    from p2es_dist.data.batches import table_to_batch

    personal = table_to_batch(scored)["template"]
    ii = LEAD_INDEX["II"]
    for name in ("template_population", "template_pat"):
        np.testing.assert_allclose(renders[name][:, ii], personal[:, ii], atol=2e-3)
    assert population_from_shards  # imported: reads shards, exercised in test_evaluate


def test_scored_rows_refuses_when_no_window_is_left():
    from p2es_dist.evaluate.templates import scored_rows

    table = _paired_table().slice(0, 3)  # all inside the first 60 s
    with pytest.raises(UserError, match="no window starts after"):
        scored_rows(table, "calibrated")


def test_windows_without_ppg_have_no_timing():
    from p2es_dist.data.ingest_core import record_to_table
    from p2es_dist.data.preprocess import PreprocessConfig
    from p2es_dist.data.record import Record

    ecg, _, _ = synthetic_pair(seconds=30.0)
    table, _ = record_to_table(Record(source="s", record="r", subject_id="s", fs=FS, ecg={"II": ecg}),
                               PreprocessConfig())
    assert table.column("ppg_upstrokes").null_count == len(table)
    assert table.column("calib_pat_s").null_count == len(table)
    assert isinstance(table.column("calib_beat").type, pa.FixedSizeListType)


def test_distillation_hides_the_same_windows_for_teacher_and_student():
    from p2es_dist.data.batches import table_to_batch
    from p2es_dist.distill.teacher_outputs import hidden_templates

    ids = [f"bidmc:r:{i}" for i in range(2000)]
    hidden = hidden_templates(ids, 0.5)
    assert 0.45 < hidden.mean() < 0.55
    np.testing.assert_array_equal(hidden, hidden_templates(ids, 0.5))  # by window id: stable across runs
    assert not hidden_templates(ids, 0.0).any() and hidden_templates(ids, 1.0).all()
    table = _paired_table()
    flags = np.zeros(len(table), dtype=bool)
    flags[-3:] = True
    batch = table_to_batch(table.append_column("template_hidden", pa.array(flags)))
    assert not batch["template_mask"][-3:].any() and batch["template_mask"][-4].any()
