"""The synthetic source: determinism, the shard schema, exact limb-lead relations, and the physiology each
label claims, measured on the generated arrays (R peaks detected from the signals, not read back)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from scipy.signal import find_peaks

from p2es_dist.constants import FS, LABELS, LEAD_INDEX, WINDOW
from p2es_dist.data.schema import SHARD_SCHEMA
from p2es_dist.data.sources.synthetic import (
    CONDITIONS,
    TERRITORIES,
    SyntheticConfig,
    generate,
    generate_arrays,
    n_chunks,
)

CLEAN = dict(ecg_noise_mv=0.0, baseline_wander_mv=0.0, ppg_noise=0.0)  # isoelectric line at exactly 0 mV


@pytest.fixture(scope="module")
def cohort() -> dict[str, np.ndarray]:
    """3,000 noise-free windows of 375 subjects, with every condition well represented."""
    config = SyntheticConfig(n_windows=3000, seed=11, p_mi=0.2, p_af=0.2, p_lbbb=0.15, p_rbbb=0.15, **CLEAN)
    return generate_arrays(config, chunk_index=0, chunk_size=3000)


def _rows(cohort: dict, condition: str, territory: str | None = None) -> np.ndarray:
    keep = cohort["condition"] == CONDITIONS.index(condition)
    if territory is not None:
        keep &= cohort["mi_territory"] == TERRITORIES.index(territory)
    return np.flatnonzero(keep)


def _r_peaks(ecg: np.ndarray) -> np.ndarray:
    """Sample indices of R peaks in one (12, L) window: peaks of the spatial QRS velocity, moved to the
    largest QRS vector magnitude nearby."""
    velocity = np.abs(np.diff(ecg, axis=1)).sum(axis=0)
    peaks, _ = find_peaks(velocity, height=0.35 * velocity.max(), distance=int(0.2 * FS))
    magnitude = np.sqrt((ecg**2).sum(axis=0))
    refined = [p - 6 + int(np.argmax(magnitude[max(p - 6, 0) : p + 7])) for p in peaks if p >= 6]
    return np.unique(refined)


def _templates(ecg: np.ndarray, peaks: np.ndarray, before: float = 0.25, after: float = 0.5) -> np.ndarray:
    """(12, T) beat average around the R peaks that fit in the window; index `before * FS` is the R peak."""
    lo, hi = int(before * FS), int(after * FS)
    keep = [p for p in peaks if p - lo >= 0 and p + hi <= ecg.shape[1]]
    return np.mean([ecg[:, p - lo : p + hi] for p in keep], axis=0)


def _qrs_duration_s(template: np.ndarray, r_index: int) -> float:
    """Span around the R peak where the spatial velocity exceeds 10 % of its QRS maximum."""
    velocity = np.abs(np.diff(template, axis=1)).sum(axis=0)
    near = slice(r_index - int(0.15 * FS), r_index + int(0.15 * FS))
    above = np.flatnonzero(velocity[near] > 0.1 * velocity[near].max())
    return (above[-1] - above[0] + 1) / FS


# --- determinism and layout
def test_same_seed_and_chunk_give_identical_windows_and_other_seeds_do_not():
    config = SyntheticConfig(n_windows=200, seed=3)
    first = generate_arrays(config, chunk_index=1, chunk_size=64)
    again = generate_arrays(config, chunk_index=1, chunk_size=64)
    assert first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert generate(config, chunk_index=1, chunk_size=64).equals(generate(config, chunk_index=1, chunk_size=64))
    other = generate_arrays(SyntheticConfig(n_windows=200, seed=4), chunk_index=1, chunk_size=64)
    assert not np.allclose(first["ecg"], other["ecg"])
    assert not np.allclose(first["ppg"], other["ppg"])


def test_a_window_does_not_depend_on_how_the_cohort_is_chunked():
    config = SyntheticConfig(n_windows=100, seed=5, p_af=0.5)
    small = generate_arrays(config, chunk_index=3, chunk_size=10)  # windows 30..39
    large = generate_arrays(config, chunk_index=0, chunk_size=48)
    for key in ("ecg", "ppg", "age", "sex", "condition", "start"):
        np.testing.assert_allclose(small[key], large[key][30:40], atol=1e-5, err_msg=key)


def test_table_matches_the_shard_schema_and_the_cohort_layout():
    config = SyntheticConfig(n_windows=50, seed=1, windows_per_subject=4)
    assert n_chunks(config, 16) == 4
    table = generate(config, chunk_index=3, chunk_size=16)  # the short last chunk: windows 48, 49
    assert table.schema.equals(SHARD_SCHEMA)
    assert table.num_rows == 2
    rows = table.to_pylist()
    assert [r["window_id"] for r in rows] == ["synthetic:syn00000012:0", "synthetic:syn00000012:1024"]
    assert {r["subject_id"] for r in rows} == {"syn-00000012"}
    assert all(r["fs"] == FS and r["source"] == "synthetic" and r["ecg_mask"] == [True] * 12 for r in rows)
    assert generate(config, chunk_index=4, chunk_size=16).num_rows == 0
    with pytest.raises(ValueError):
        generate(config, chunk_index=-1, chunk_size=16)

    full = generate(config, chunk_index=0, chunk_size=50)
    assert pa.compute.all(pa.compute.is_valid(full["ppg"])).as_py()
    assert len(full["ecg"][0]) == 12 * WINDOW and len(full["ppg"][0]) == WINDOW
    quality = full["quality"].to_numpy()
    assert quality.dtype == np.float32 and np.all((quality >= 0) & (quality <= 1))
    assert set(full["sex"].to_numpy()) <= {0, 1}
    age = full["age"].to_numpy()
    assert np.all((age >= 18) & (age <= 95))
    for labels in full["labels"].to_pylist():
        assert labels and set(labels) <= set(LABELS)
        assert ("CD" in labels) == ("LBBB" in labels or "RBBB" in labels)


def test_subjects_have_consecutive_windows_fixed_demographics_and_one_split():
    config = SyntheticConfig(n_windows=1500, seed=2, windows_per_subject=5)
    table = generate(config, chunk_index=0, chunk_size=1500).drop_columns(["ecg", "ppg"])
    by_subject: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_subject.setdefault(row["subject_id"], []).append(row)
    assert len(by_subject) == 300
    for subject, rows in by_subject.items():
        assert [r["start"] for r in rows] == [i * WINDOW for i in range(5)]
        assert {r["record"] for r in rows} == {"syn" + subject.removeprefix("syn-")}
        for key in ("split", "age", "sex", "labels"):
            assert len({str(r[key]) for r in rows}) == 1, (subject, key)
    splits = [rows[0]["split"] for rows in by_subject.values()]
    assert {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}["train"] > 0.7
    assert {"val", "test"} <= set(splits)


def test_consecutive_windows_of_a_subject_are_one_continuous_recording():
    arrays = generate_arrays(SyntheticConfig(n_windows=400, seed=8), chunk_index=0, chunk_size=400)
    ecg, ppg = arrays["ecg"], arrays["ppg"]
    same_subject = np.flatnonzero(arrays["subject"][1:] == arrays["subject"][:-1])
    for signal in (ecg, ppg[:, None, :]):
        across = np.abs(signal[same_subject + 1, :, 0] - signal[same_subject, :, -1]).mean()
        within = np.abs(np.diff(signal[same_subject], axis=-1)).mean()
        between_subjects = np.abs(signal[1:, :, 0] - signal[:-1, :, -1])[
            arrays["subject"][1:] != arrays["subject"][:-1]].mean()
        assert across < 1.5 * within < between_subjects


def test_prevalences_follow_the_config():
    config = SyntheticConfig(n_windows=4000, seed=9, windows_per_subject=1, p_mi=0.2, p_af=0.1, p_lbbb=0.05,
                             p_rbbb=0.05)
    condition = generate_arrays(config, chunk_index=0, chunk_size=4000)["condition"]
    share = np.bincount(condition, minlength=len(CONDITIONS)) / len(condition)
    np.testing.assert_allclose(share, [0.6, 0.2, 0.1, 0.05, 0.05], atol=0.03)  # ~4 standard errors
    only_af = generate_arrays(SyntheticConfig(n_windows=40, p_af=1.0, p_mi=0.0, p_lbbb=0.0, p_rbbb=0.0),
                              chunk_index=0, chunk_size=40)
    assert np.all(only_af["condition"] == CONDITIONS.index("AF"))
    with pytest.raises(ValueError):
        SyntheticConfig(p_mi=0.7, p_af=0.5)


# --- signals
def test_derived_limb_leads_are_exact():
    arrays = generate_arrays(SyntheticConfig(n_windows=64, seed=4), chunk_index=0, chunk_size=64)
    ecg = arrays["ecg"]
    lead = {name: ecg[:, i] for name, i in LEAD_INDEX.items()}
    np.testing.assert_array_equal(lead["III"], lead["II"] - lead["I"])
    np.testing.assert_array_equal(lead["aVR"], -(lead["I"] + lead["II"]) / 2)
    np.testing.assert_array_equal(lead["aVL"], lead["I"] - lead["II"] / 2)
    np.testing.assert_array_equal(lead["aVF"], lead["II"] - lead["I"] / 2)
    assert np.all(arrays["ecg_mask"])

    table = generate(SyntheticConfig(n_windows=64, seed=4), chunk_index=0, chunk_size=64)
    stored = table["ecg"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    stored = stored.reshape(64, 12, WINDOW)
    np.testing.assert_allclose(stored, ecg, atol=2e-3, rtol=1e-3)  # float16 storage
    np.testing.assert_allclose(stored[:, 2], stored[:, 1] - stored[:, 0], atol=3e-3)


def test_heart_rate_is_plausible_and_matches_the_beats(cohort):
    inner = slice(8, WINDOW - 8)  # beats cut by the window edges are left out
    for w in range(0, 3000, 7):
        peaks = _r_peaks(cohort["ecg"][w])
        peaks = peaks[(peaks >= inner.start) & (peaks < inner.stop)]
        truth = cohort["r_peaks"][w][np.isfinite(cohort["r_peaks"][w])] * FS
        # One detected peak per generated beat, at its R wave (LBBB: possibly its taller second hump).
        tolerance = 6.0 if cohort["condition"][w] == CONDITIONS.index("LBBB") else 1.0
        assert np.abs(peaks[:, None] - truth[None, :]).min(axis=1).max() <= tolerance
        inner_truth = truth[(truth >= inner.start + tolerance) & (truth < inner.stop - tolerance)]
        assert np.abs(inner_truth[:, None] - peaks[None, :]).min(axis=1).max() <= tolerance
        hr = 60 * FS / np.median(np.diff(peaks))
        assert 40 <= hr <= 160
    sinus = np.flatnonzero(cohort["condition"] != CONDITIONS.index("AF"))
    assert np.all((cohort["hr"][sinus] > 45) & (cohort["hr"][sinus] < 110))


def test_af_has_irregular_rr_and_no_p_waves(cohort):
    def rr_variation(rows):
        cv = []
        for w in rows[:150]:
            rr = np.diff(_r_peaks(cohort["ecg"][w]))
            cv.append(np.std(rr) / np.mean(rr))
        return np.median(cv)

    def p_wave_mv(rows):  # lead II beat average, just before QRS onset (P peak sits 100-190 ms before R)
        amplitude = []
        for w in rows[:150]:
            template = _templates(cohort["ecg"][w], _r_peaks(cohort["ecg"][w]))[LEAD_INDEX["II"]]
            r = int(0.25 * FS)
            amplitude.append(template[r - int(0.2 * FS) : r - int(0.09 * FS)].max())
        return np.median(amplitude)

    norm, af = _rows(cohort, "NORM"), _rows(cohort, "AF")
    assert rr_variation(af) > 0.1 > 0.05 > rr_variation(norm)
    assert p_wave_mv(norm) > 0.08
    assert p_wave_mv(af) < 0.5 * p_wave_mv(norm)


def test_bundle_branch_blocks_widen_qrs_with_their_v1_v6_signatures(cohort):
    r = int(0.25 * FS)

    def beats(condition):
        rows = _rows(cohort, condition)[:80]
        return [_templates(cohort["ecg"][w], _r_peaks(cohort["ecg"][w])) for w in rows]

    norm, rbbb, lbbb = beats("NORM"), beats("RBBB"), beats("LBBB")
    width = {name: np.median([_qrs_duration_s(t, r) for t in group])
             for name, group in (("NORM", norm), ("RBBB", rbbb), ("LBBB", lbbb))}
    assert width["NORM"] < 0.11
    assert width["RBBB"] >= width["NORM"] + 0.025 and width["LBBB"] >= width["NORM"] + 0.025

    v1, v6 = LEAD_INDEX["V1"], LEAD_INDEX["V6"]
    terminal = slice(r + int(0.04 * FS), r + int(0.11 * FS))  # 40-110 ms after the R peak
    # RBBB: rsR' in V1, a positive terminal deflection; normal V1 ends its QRS in the S wave.
    assert np.median([t[v1, terminal].max() for t in rbbb]) > 0.3
    assert np.median([t[v1, terminal].max() for t in norm]) < 0.1
    # LBBB: broad notched R in V6 (two humps inside the QRS), deep QS in V1.
    qrs = slice(r - int(0.08 * FS), r + int(0.09 * FS))
    notched = [len(find_peaks(t[v6, qrs], prominence=0.03)[0]) >= 2 for t in lbbb]
    assert np.mean(notched) > 0.8
    assert np.mean([len(find_peaks(t[v6, qrs], prominence=0.03)[0]) >= 2 for t in norm]) < 0.2
    early_qrs = slice(r - int(0.06 * FS), r + int(0.04 * FS))  # before the discordant ST elevation
    assert np.median([t[v1, early_qrs].min() for t in lbbb]) < -0.5
    assert np.median([t[v1, early_qrs].max() for t in lbbb]) < 0.05


@pytest.mark.parametrize(("territory", "leads"), [
    ("anterior", ("V1", "V2", "V3")),
    ("inferior", ("II", "III", "aVF")),
    ("lateral", ("I", "aVL", "V6")),
])
def test_mi_has_q_waves_and_st_elevation_in_its_territory(cohort, territory, leads):
    r = int(0.25 * FS)

    def measure(rows):
        q_depth, st_level = [], []
        for w in rows[:60]:
            template = _templates(cohort["ecg"][w], _r_peaks(cohort["ecg"][w]))
            index = [LEAD_INDEX[name] for name in leads]
            q_depth.append(-template[index, r - int(0.07 * FS) : r - 1].min(axis=1))
            st_level.append(template[index, r + int(0.08 * FS)])  # ST segment; isoelectric line is 0 mV
        return np.median(q_depth, axis=0), np.median(st_level, axis=0)

    q_mi, st_mi = measure(_rows(cohort, "MI", territory))
    q_norm, st_norm = measure(_rows(cohort, "NORM"))
    assert len(_rows(cohort, "MI", territory)) >= 30
    assert np.all(q_mi > q_norm + 0.1), (q_mi, q_norm)
    assert np.all(st_mi > st_norm + 0.05), (st_mi, st_norm)


def test_ppg_peaks_follow_r_peaks_after_the_configured_delay(cohort):
    config = SyntheticConfig()  # the cohort fixture keeps the default pulse arrival range
    delays, ages = [], []
    for w in _rows(cohort, "NORM")[::5]:
        ppg = cohort["ppg"][w]
        per_beat = []
        for p in _r_peaks(cohort["ecg"][w]):
            segment = ppg[p + int(0.05 * FS) : p + int(0.45 * FS)]
            if len(segment) == int(0.4 * FS):
                per_beat.append((int(np.argmax(segment)) + int(0.05 * FS)) / FS)
        delays.append(np.median(per_beat))
        ages.append(cohort["age"][w])
        assert abs(delays[-1] - cohort["pat"][w]) <= 1.5 / FS
    delays = np.array(delays)
    assert np.all(delays > 0)
    assert np.all((delays >= config.pat_min_s - 1 / FS) & (delays <= config.pat_max_s + 1 / FS))
    assert np.corrcoef(ages, delays)[0, 1] < -0.5  # stiffer arteries with age: earlier arrival


def test_af_pulse_amplitude_follows_the_preceding_rr(cohort):
    correlations = []
    for w in _rows(cohort, "AF")[:60]:
        peaks = _r_peaks(cohort["ecg"][w])
        ppg = cohort["ppg"][w]
        rr, height = [], []
        for before, p in zip(peaks[:-1], peaks[1:], strict=True):
            segment = ppg[p + int(0.1 * FS) : p + int(0.35 * FS)]
            if len(segment):
                rr.append(p - before)
                height.append(segment.max() - ppg[p : p + int(0.1 * FS) + 1].min())
        correlations.append(np.corrcoef(rr, height)[0, 1])
    assert np.median(correlations) > 0.5


def test_qt_follows_heart_rate(cohort):
    rr, rt = [], []
    for w in _rows(cohort, "NORM")[::4]:
        peaks = _r_peaks(cohort["ecg"][w])
        template = _templates(cohort["ecg"][w], peaks)[LEAD_INDEX["V5"]]
        r = int(0.25 * FS)
        rt.append(np.argmax(template[r + int(0.12 * FS) :]) + int(0.12 * FS))  # R peak -> T peak
        rr.append(np.median(np.diff(peaks)))
    assert np.corrcoef(rr, rt)[0, 1] > 0.5


def test_bench_prints_one_json_line(capsys):
    from p2es_dist.bench.synth import main

    assert main(["--windows", "64", "--chunk-size", "32", "--set", "synthetic.seed=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"bench", "windows", "windows_per_s", "windows_per_s_per_core", "cores"}
    assert result["bench"] == "synth" and result["windows"] == 64 and result["cores"] == 1
    assert result["windows_per_s"] > 0 and result["windows_per_s_per_core"] == result["windows_per_s"]
