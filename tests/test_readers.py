"""Record readers on the real shared data (../shared/data), on corrupted copies, and on a CODE-15% file
written here in the real layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import wfdb
from conftest import require_data

from p2es_dist.constants import LEADS, SEX_FEMALE, SEX_MALE, SEX_UNKNOWN
from p2es_dist.data.record import RecordError
from p2es_dist.data.sources import cinc, code15, ludb, mimic3wdb, ptbxl, reader, wfdb_records
from p2es_dist.data.sources.wfdb_common import canonical_lead, mv_factor, parse_age
from p2es_dist.errors import UserError

real_data = pytest.mark.real_data


def _copy_record(source: Path, destination: Path, *extensions: str) -> Path:
    """Copy `<source>.<ext>` files into `destination`, writable; returns the new record path."""
    destination.mkdir(parents=True, exist_ok=True)
    for extension in extensions:
        target = destination / f"{source.name}.{extension}"
        shutil.copyfile(f"{source}.{extension}", target)
        target.chmod(0o644)
    return destination / source.name


def _einthoven_residual(ecg: dict[str, np.ndarray]) -> float:
    """max |II - (I + III)| relative to lead II's range: ~0 for leads in consistent units."""
    return float(np.nanmax(np.abs(ecg["II"] - ecg["I"] - ecg["III"])) / np.ptp(ecg["II"]))


# --- helpers -----------------------------------------------------------------------------------------

def test_lead_aliases_units_and_ages():
    assert [canonical_lead(n) for n in ("MLII", "ii", "DII", "lead II", "avr", "AVL", "aVF", "v6")] == [
        "II", "II", "II", "II", "aVR", "aVL", "aVF", "V6"]
    assert [canonical_lead(n) for n in ("V", "MCL1", "vx", "PLETH", "ABP")] == [None] * 5
    assert (mv_factor("mV"), mv_factor("mv"), mv_factor("uV"), mv_factor("V"), mv_factor("NU")) == (
        1.0, 1.0, 1e-3, 1e3, None)
    assert (parse_age("90+"), parse_age("61"), parse_age("NaN"), parse_age("Unknown")) == (90.0, 61.0, None, None)


def test_registry_resolves_every_reader():
    for source, module in [("wfdb", wfdb_records), ("ptbxl", ptbxl), ("ludb", ludb), ("cinc", cinc),
                           ("mimic3wdb", mimic3wdb), ("code15", code15)]:
        assert reader(source) is module


@pytest.mark.parametrize("module", [wfdb_records, ptbxl, ludb, cinc, mimic3wdb, code15])
def test_list_records_rejects_missing_and_empty_roots(module, tmp_path):
    with pytest.raises(UserError, match="not a directory|not found"):
        module.list_records(tmp_path / "absent")
    with pytest.raises(UserError):
        module.list_records(tmp_path)


# --- wfdb: any record set ------------------------------------------------------------------------------

@real_data
def test_wfdb_lists_records_not_segments_or_layouts():
    root = require_data("wfdb_samples")
    assert wfdb_records.list_records(root) == [
        "100", "3000003_0003", "a103l", "mixedsignals", "multi-segment/041s/041s",
        "multi-segment/p000878/3269321_0001", "multi-segment/p000878/3269321_0002", "s0010_re", "v102s"]


@real_data
def test_wfdb_formats_names_units_and_demographics():
    root = require_data("wfdb_samples")
    mitbih = wfdb_records.read_record(root, "100")  # format 212, MLII -> II, MIT-BIH "69 M" comment
    assert (mitbih.fs, list(mitbih.ecg), mitbih.n_samples, mitbih.ppg) == (360.0, ["II", "V5"], 650000, None)
    assert (mitbih.age, mitbih.sex, mitbih.ecg_units) == (69.0, SEX_MALE, "mV")
    assert 0.5 < np.ptp(mitbih.ecg["II"][:3600]) < 5  # QRS amplitude of 10 s, in mV

    ptb = wfdb_records.read_record(root, "s0010_re")  # lowercase 12 leads + Frank leads, "age: 81"
    assert list(ptb.ecg) == list(LEADS) and (ptb.fs, ptb.n_samples) == (1000.0, 38400)
    assert (ptb.age, ptb.sex) == (81.0, SEX_FEMALE)
    assert _einthoven_residual(ptb.ecg) < 0.02

    mimic = wfdb_records.read_record(root, "3000003_0003")  # format 80; `V` has no known position
    assert (list(mimic.ecg), mimic.ppg, mimic.n_samples) == (["II"], None, 1028)

    challenge = wfdb_records.read_record(root, "a103l")  # Challenge 2015 .mat
    assert (list(challenge.ecg), challenge.fs, challenge.n_samples, challenge.ppg.shape) == (
        ["II"], 250.0, 82500, (82500,))
    assert challenge.ppg_fs is None and challenge.sex == SEX_UNKNOWN and challenge.split is None


@real_data
def test_wfdb_nan_gaps_in_format_212():
    record = wfdb_records.read_record(require_data("wfdb_samples"), "v102s")
    assert list(record.ecg) == ["II"] and record.ppg is not None
    assert int(np.isnan(record.ecg["II"]).sum()) == 3 and int(np.isnan(record.ppg).sum()) == 17
    assert np.isfinite(record.ecg["II"]).sum() == 75000 - 3


@real_data
def test_wfdb_multi_segment_record_is_merged():
    root = require_data("wfdb_samples")
    record = wfdb_records.read_record(root, "multi-segment/041s/041s")
    assert (list(record.ecg), record.fs, record.n_samples) == (["I", "III"], 125.0, 2000)
    assert record.ppg is not None and record.ppg.shape == (2000,)
    first = wfdb.rdrecord(str(root / "multi-segment" / "041s" / "041s01"))
    np.testing.assert_allclose(record.ecg["I"][:1000], first.p_signal[:, first.sig_name.index("I")], rtol=1e-6)


@real_data
def test_wfdb_multi_rate_flac_keeps_each_rate():
    record = wfdb_records.read_record(require_data("wfdb_samples"), "mixedsignals")
    assert list(record.ecg) == ["II", "III"]  # V skipped
    assert record.fs == pytest.approx(4 * 62.4725) and record.ppg_fs == pytest.approx(2 * 62.4725)
    assert len(record.ecg["II"]) == 2 * len(record.ppg) == 57600


@real_data
def test_wfdb_segments_without_master_share_the_patient_folder():
    root = require_data("wfdb_samples")
    ppg_only = wfdb_records.read_record(root, "multi-segment/p000878/3269321_0001")
    with_ecg = wfdb_records.read_record(root, "multi-segment/p000878/3269321_0002")
    assert ppg_only.ecg == {} and ppg_only.ppg.shape == (2000,)
    assert list(with_ecg.ecg) == ["II"] and int(np.isnan(with_ecg.ecg["II"]).sum()) == 137
    assert ppg_only.subject_id == with_ecg.subject_id == "p000878"


# --- PTB-XL ----------------------------------------------------------------------------------------------

@real_data
def test_ptbxl_records_units_demographics_and_folds():
    root = require_data("ptbxl")
    database = pd.read_csv(root / "ptbxl_database.csv", index_col="ecg_id")
    keys = ptbxl.list_records(root)
    assert len(keys) == len(database) == 353 and keys[:2] == ["00001", "00002"]
    amplitudes = []
    for key in keys[::7]:
        record = ptbxl.read_record(root, key)
        row = database.loc[int(key)]
        assert list(record.ecg) == list(LEADS) and (record.fs, record.n_samples) == (500.0, 5000)
        assert record.split == ptbxl.split_of_fold(int(row["strat_fold"]))
        assert record.subject_id == str(int(row["patient_id"]))
        assert record.sex == (SEX_FEMALE if row["sex"] == 1 else SEX_MALE)  # PTB-XL: 0 male, 1 female
        assert record.age == (None if np.isnan(row["age"]) else row["age"])
        amplitudes.append(np.ptp(record.ecg["II"]))
        assert _einthoven_residual(record.ecg) < 0.05
    assert 0.5 < np.median(amplitudes) < 3.0  # lead II QRS in mV
    first = ptbxl.read_record(root, "00001")
    assert (first.age, first.sex, first.labels, first.split) == (56.0, SEX_FEMALE, ["NORM"], "train")


@real_data
def test_ptbxl_records100_and_fold_mapping():
    root = require_data("ptbxl")
    assert ptbxl.list_records(root, resolution="records100")[:1] == ["00001"]
    low = ptbxl.read_record(root, "00001", resolution="records100")
    assert (low.fs, low.n_samples) == (100.0, 1000)
    assert [ptbxl.split_of_fold(fold) for fold in range(1, 11)] == ["train"] * 8 + ["val", "test"]
    remapped = [ptbxl.split_of_fold(fold, val_folds=(7,), test_folds=(8,)) for fold in range(1, 11)]
    assert remapped == ["train"] * 6 + ["val", "test", "train", "train"]
    with pytest.raises(UserError, match="overlap"):
        ptbxl.split_of_fold(3, val_folds=(8,), test_folds=(8,))
    with pytest.raises(UserError, match="resolution"):
        ptbxl.list_records(root, resolution="records250")


# --- LUDB ------------------------------------------------------------------------------------------------

@real_data
def test_ludb_records_units_and_diagnoses():
    root = require_data("ludb")
    keys = ludb.list_records(root)
    assert len(keys) == 180 and "data/1" in keys
    amplitudes = []
    for key in keys[::9]:
        record = ludb.read_record(root, key)
        assert list(record.ecg) == list(LEADS) and (record.fs, record.n_samples) == (500.0, 5000)
        assert record.split is None and record.subject_id == key.split("/")[1]
        # The v1.0.1 headers' per-lead gains would leave II != I + III; the digital samples add up.
        assert _einthoven_residual(record.ecg) < 1e-4
        amplitudes.append(np.ptp(record.ecg["II"]))
    assert len(set(np.round(amplitudes, 3))) > 5 and 0.5 < np.median(amplitudes) < 3.0
    first = ludb.read_record(root, "data/1")
    assert (first.age, first.sex, first.labels) == (51.0, SEX_FEMALE, ["STTC", "HYP", "SB"])


# --- CinC 2021 -------------------------------------------------------------------------------------------

@real_data
def test_cinc_mat_records_with_lowercase_units():
    root = require_data("cinc2021")
    keys = cinc.list_records(root)
    assert len(keys) == 50 and keys[0] == "E07500"
    assert "/mv " in (root / "HR06000.hea").read_text()  # the quirk is really there
    amplitudes = {}
    for key in keys:
        record = cinc.read_record(root, key)
        assert list(record.ecg) == list(LEADS) and (record.fs, record.n_samples) == (500.0, 5000)
        assert record.ecg_units == "mV" and record.subject_id == key and record.split is None
        amplitudes.setdefault(key[:2], []).append(np.ptp(record.ecg["II"]))
    for prefix in ("E0", "HR", "JS"):  # lowercase `mv` (HR) lands on the same scale as `mV`
        assert 0.5 < np.median(amplitudes[prefix]) < 3.0, prefix
    hr = cinc.read_record(root, "HR06000")
    assert (hr.age, hr.sex, hr.labels) == (59.0, SEX_FEMALE, ["STTC"])
    georgia = cinc.read_record(root, "E07500")
    assert (georgia.age, georgia.sex, georgia.labels) == (78.0, SEX_MALE, ["HYP", "SB"])


# --- MIMIC-III matched subset --------------------------------------------------------------------------

@real_data
def test_mimic_segments_assembled_without_master_header():
    root = require_data("wfdb_samples")
    assert mimic3wdb.list_records(root) == ["3000003", "multi-segment/p000878/3269321"]
    record = mimic3wdb.read_record(root, "multi-segment/p000878/3269321")
    assert (record.subject_id, record.fs, record.n_samples, list(record.ecg)) == ("p000878", 125.0, 3750, ["II"])
    # Segment 1 (16 s) has PLETH only, segment 2 starts at its end with II + PLETH.
    assert np.isnan(record.ecg["II"][:2000]).all()
    segment = wfdb.rdrecord(str(root / "multi-segment" / "p000878" / "3269321_0002"))
    np.testing.assert_array_equal(record.ecg["II"][2000:], segment.p_signal[:, 0].astype(np.float32))
    np.testing.assert_array_equal(record.ppg[2000:], segment.p_signal[:, 1].astype(np.float32))


@real_data
def test_mimic_master_header_gives_the_same_signal_and_its_gaps(tmp_path):
    source = require_data("wfdb_samples", "multi-segment", "p000878")
    patient = tmp_path / "p00" / "p000878"
    for name in ("3269321_0001", "3269321_0002"):
        _copy_record(source / name, patient, "hea", "dat")
    shutil.copyfile(source / "3269321_layout.hea", patient / "3269321_layout.hea")
    without_master = mimic3wdb.read_record(tmp_path, "p00/p000878/3269321")
    (patient / "3269321.hea").write_text(
        "3269321/4 2 125 4000 16:57:09\n3269321_layout 0\n3269321_0001 2000\n~ 250\n3269321_0002 1750\n")
    with_master = mimic3wdb.read_record(tmp_path, "p00/p000878/3269321")
    assert with_master.subject_id == "p000878" and with_master.n_samples == 4000
    np.testing.assert_array_equal(with_master.ppg[:2000], without_master.ppg[:2000])
    assert np.isnan(with_master.ppg[2000:2250]).all()  # the `~` gap
    np.testing.assert_array_equal(with_master.ecg["II"][2250:], without_master.ecg["II"][2000:])
    # wfdb's own multi-segment merge (the `wfdb` source) agrees sample for sample.
    merged = wfdb_records.read_record(tmp_path, "p00/p000878/3269321")
    assert merged.subject_id == "p000878"
    np.testing.assert_array_equal(merged.ecg["II"], with_master.ecg["II"])
    np.testing.assert_array_equal(merged.ppg, with_master.ppg)


# --- corrupted inputs ------------------------------------------------------------------------------------

@real_data
def test_truncated_dat_and_lying_header_raise_record_error(tmp_path):
    ptb = require_data("ptbxl", "records500", "00000", "00001_hr.hea").with_suffix("")
    truncated = _copy_record(ptb, tmp_path / "cut", "hea", "dat")
    with open(f"{truncated}.dat", "r+b") as handle:
        handle.truncate(50_000)
    with pytest.raises(RecordError, match=r"00001_hr\.dat: holds 2083 of the 5000 samples"):
        wfdb_records.read_record(tmp_path, "cut/00001_hr")

    lying = _copy_record(ptb, tmp_path / "lies", "hea", "dat")
    header = Path(f"{lying}.hea")
    header.write_text(header.read_text().replace("00001_hr 12 500 5000", "00001_hr 12 500 6000", 1))
    with pytest.raises(RecordError, match="holds 5000 of the 6000 samples"):
        wfdb_records.read_record(tmp_path, "lies/00001_hr")

    v102s = _copy_record(require_data("wfdb_samples", "v102s.hea").with_suffix(""), tmp_path / "f212", "hea", "dat")
    with open(f"{v102s}.dat", "r+b") as handle:
        handle.truncate(6000)  # format 212: 4 signals, 1.5 bytes per sample -> 1000 samples
    with pytest.raises(RecordError, match="holds 1000 of the 75000 samples"):
        wfdb_records.read_record(tmp_path, "f212/v102s")


@real_data
def test_truncated_challenge_mat_and_ptbxl_record_raise_record_error(tmp_path):
    mat = _copy_record(require_data("cinc2021", "E07500.hea").with_suffix(""), tmp_path / "cinc", "hea", "mat")
    with open(f"{mat}.mat", "r+b") as handle:
        handle.truncate(30_000)
    with pytest.raises(RecordError, match=r"E07500\.mat: holds 1249 of the 5000"):
        cinc.read_record(tmp_path / "cinc", "E07500")

    root = require_data("ptbxl")
    shutil.copyfile(root / "ptbxl_database.csv", tmp_path / "ptbxl_database.csv")
    _copy_record(root / "records500" / "00000" / "00002_hr", tmp_path / "records500" / "00000", "hea")
    assert ptbxl.list_records(tmp_path) == ["00002"]  # only rows whose files are here
    with pytest.raises(RecordError, match="signal file missing"):
        ptbxl.read_record(tmp_path, "00002")


def test_record_without_ecg_or_ppg_and_unreadable_header_raise_record_error(tmp_path):
    resp = np.sin(np.linspace(0, 20, 1000))[:, None]
    wfdb.wrsamp("resp_only", fs=125, units=["NU"], sig_name=["RESP"], p_signal=resp, fmt=["16"],
                write_dir=str(tmp_path))
    with pytest.raises(RecordError, match=r"no usable ECG lead or PPG among its signals \(RESP\)"):
        wfdb_records.read_record(tmp_path, "resp_only")

    (tmp_path / "garbage.hea").write_text("this is not a header\n")
    with pytest.raises(RecordError, match="unreadable header"):
        wfdb_records.read_record(tmp_path, "garbage")
    with pytest.raises(RecordError, match="header file not found"):
        wfdb_records.read_record(tmp_path, "absent")


def test_uv_units_are_converted_to_mv(tmp_path):
    signal = np.stack([np.linspace(-1000, 1000, 500), np.linspace(0, 2, 500)], axis=1)  # uV, then PPG
    wfdb.wrsamp("uv", fs=250, units=["uV", "NU"], sig_name=["ECG II", "Pleth"], p_signal=signal,
                fmt=["16", "16"], adc_gain=[10.0, 10000.0], baseline=[0, 0], write_dir=str(tmp_path))
    record = wfdb_records.read_record(tmp_path, "uv")
    assert record.ecg_units == "mV" and list(record.ecg) == ["II"]
    np.testing.assert_allclose(record.ecg["II"], signal[:, 0] / 1000, atol=1e-3)
    np.testing.assert_allclose(record.ppg, signal[:, 1], atol=1e-4)


# --- CODE-15% --------------------------------------------------------------------------------------------

def _write_code15(root: Path) -> dict[int, np.ndarray]:
    """5 exams in the real layout: (N, 4096, 12) float32 at 400 Hz, centred zero padding, a trailing
    exam_id 0 padding row, and exams.csv with the dataset's columns."""
    rng = np.random.default_rng(0)
    lengths = {1169160: 4000, 2873686: 2800, 168405: 4000, 271011: 2800, 384368: 4096}
    tracings = np.zeros((6, 4096, 12), dtype=np.float32)
    originals = {}
    for row, (exam_id, length) in enumerate(lengths.items()):
        signal = rng.normal(0, 0.3, size=(length, 12)).astype(np.float32)
        start = (4096 - length) // 2
        tracings[row, start : start + length] = signal
        originals[exam_id] = signal
    with h5py.File(root / "exams_part0.hdf5", "w") as handle:
        handle.create_dataset("tracings", data=tracings)
        handle.create_dataset("exam_id", data=np.array([*lengths, 0], dtype=np.int64))
    columns = ["exam_id", "age", "is_male", "nn_predicted_age", "1dAVb", "RBBB", "LBBB", "SB", "ST", "AF",
               "patient_id", "death", "timey", "normal_ecg", "trace_file"]
    rows = [  # trace_file is appended below
        [1169160, 38, True, 40.2, False, True, False, False, True, False, 523632, False, 2.09, False],
        [2873686, 73, True, 67.1, False, False, False, False, False, False, 1724173, False, 6.0, True],
        [168405, 67, True, 80.4, False, False, False, False, False, True, 51421, False, 7.6, False],
        [271011, 41, False, 43.3, True, False, False, False, False, False, 523632, "", "", False],
        [384368, 73, False, 77.9, False, False, True, True, False, False, 2110, True, 0.9, False],
        [999999, 50, False, 50.0, False, False, False, False, False, False, 7, False, 1.0, True],
    ]
    rows = [[*row, "exams_part0.hdf5" if row[0] != 999999 else "exams_part1.hdf5"] for row in rows]
    pd.DataFrame(rows, columns=columns).to_csv(root / "exams.csv", index=False)
    return originals


def test_code15_reads_tracings_strips_padding_and_maps_metadata(tmp_path):
    originals = _write_code15(tmp_path)
    keys = code15.list_records(tmp_path)  # exam 999999 has no tracing; exam_id 0 is padding
    assert keys == sorted(f"exams_part0.hdf5/{exam_id}" for exam_id in originals)
    for exam_id, signal in originals.items():
        record = code15.read_record(tmp_path, f"exams_part0.hdf5/{exam_id}")
        assert (record.fs, list(record.ecg), record.n_samples) == (400.0, list(LEADS), len(signal))
        np.testing.assert_array_equal(np.stack([record.ecg[lead] for lead in LEADS], axis=1), signal)
    first = code15.read_record(tmp_path, "exams_part0.hdf5/1169160")
    assert (first.age, first.sex, first.subject_id, first.labels) == (38.0, SEX_MALE, "523632", ["CD", "RBBB", "ST"])
    second_visit = code15.read_record(tmp_path, "exams_part0.hdf5/271011")
    assert (second_visit.sex, second_visit.subject_id, second_visit.labels) == (SEX_FEMALE, "523632", ["CD", "1AVB"])
    assert code15.read_record(tmp_path, "exams_part0.hdf5/2873686").labels == ["NORM"]
    with pytest.raises(RecordError, match="not in both"):
        code15.read_record(tmp_path, "exams_part0.hdf5/999999")


def test_code15_all_zero_tracing_is_a_record_error(tmp_path):
    _write_code15(tmp_path)
    with h5py.File(tmp_path / "exams_part0.hdf5", "r+") as handle:
        handle["tracings"][1] = 0.0
    with pytest.raises(RecordError, match="all zeros"):
        code15.read_record(tmp_path, "exams_part0.hdf5/2873686")
