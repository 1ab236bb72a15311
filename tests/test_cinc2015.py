"""Issue 13 readers on the real shared files: PhysioNet/CinC Challenge 2015 (`--source cinc2015`) and
CODE-15% exams converted to WFDB (`--source code15`), from the header to the windows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from conftest import require_data

from p2es_dist.constants import LEADS, SEX_UNKNOWN, WINDOW
from p2es_dist.data.ingest import _subject_note, plan_ingest, run_task, write_manifest
from p2es_dist.data.ingest_core import record_to_table
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.data.record import RecordError
from p2es_dist.data.sources import RECORDS_PER_TASK, cinc2015, code15, reader, wfdb_records
from p2es_dist.data.splits import hash_split
from p2es_dist.errors import UserError

real_data = pytest.mark.real_data

FS = 250
KEPT = 270 * FS  # 300-s `*s` records lose 30 s, 330-s `*l` records 60 s: both keep 270 s
HOP = PreprocessConfig().hop
FULL_WINDOWS = (270 * 125 - WINDOW) // HOP + 1  # 64 windows of 270 s at 125 Hz


def _copy(root: Path, name: str, destination: Path, extensions=("hea", "mat")) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for extension in extensions:
        target = destination / f"{name}.{extension}"
        shutil.copyfile(root / f"{name}.{extension}", target)
        target.chmod(0o644)
    return destination / name


def _raw(root: Path, name: str, signal: str) -> np.ndarray:
    rec = wfdb.rdrecord(str(root / name))
    return rec.p_signal[:, rec.sig_name.index(signal)]


def _nan_runs(x: np.ndarray) -> list[int]:
    """Lengths of the runs of NaN in x."""
    edges = np.diff(np.concatenate([[0], np.isnan(x).astype(np.int8), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


# --- cinc2015: registry, listing ---------------------------------------------------------------------------

def test_cinc2015_is_registered_with_a_subject_note():
    assert reader("cinc2015") is cinc2015 and RECORDS_PER_TASK["cinc2015"] == 8
    assert _subject_note("cinc2015") == cinc2015.SUBJECT_NOTE == "no patient ids in CinC 2015: one record = one subject"
    assert _subject_note("bidmc") is None and _subject_note("synthetic") is None
    assert [cinc2015.alarm_tail_s(n) for n in ("a103l", "v102s", "odd")] == [60.0, 30.0, 30.0]


def test_cinc2015_rejects_missing_and_empty_roots(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        cinc2015.list_records(tmp_path / "absent")
    with pytest.raises(UserError, match="no Challenge 2015 records"):
        cinc2015.list_records(tmp_path)


@real_data
def test_cinc2015_lists_the_records_file_or_globs_headers(tmp_path):
    root = require_data("cinc2015")
    listed = sorted((root / "RECORDS").read_text().split())
    assert cinc2015.list_records(root) == listed and len(listed) == 80
    assert all((root / f"{name}.hea").exists() for name in listed)
    for name in ("t112s", "a439l"):  # no RECORDS file: every header is a record
        _copy(root, name, tmp_path)
    assert cinc2015.list_records(tmp_path) == ["a439l", "t112s"]
    assert cinc2015.read_record(tmp_path, "a439l").n_samples == KEPT


# --- cinc2015: signals ------------------------------------------------------------------------------------

@real_data
def test_cinc2015_picks_channels_by_name():
    root = require_data("cinc2015")
    assert wfdb.rdheader(str(root / "a439l")).sig_name[:2] == ["I", "II"]  # the quirk is really there
    record = cinc2015.read_record(root, "a439l")
    assert list(record.ecg) == ["I", "II"] and record.ecg_units == "mV" and record.ppg_units == "au"
    for lead in ("I", "II"):  # by name, scaled by each channel's own gain
        np.testing.assert_allclose(record.ecg[lead], _raw(root, "a439l", lead)[:KEPT], rtol=1e-6)
    np.testing.assert_allclose(record.ppg, _raw(root, "a439l", "PLETH")[:KEPT], rtol=1e-6)
    assert 0.3 < np.ptp(record.ecg["II"][: 10 * FS]) < 5  # QRS amplitude in mV
    # V (chest position unknown) and MCL (no 12-lead equivalent) are dropped; III is kept.
    assert [list(cinc2015.read_record(root, n).ecg) for n in ("t112s", "v696s", "t577l")] == [
        ["II"], ["II"], ["II", "III"]]
    assert "MCL" in wfdb.rdheader(str(root / "v696s")).sig_name


@real_data
def test_cinc2015_drops_the_alarm_segment_of_every_record():
    root = require_data("cinc2015")
    for name in cinc2015.list_records(root):
        header = wfdb.rdheader(str(root / name))
        tail = 30 * FS if name.endswith("s") else 60 * FS
        assert header.sig_len == (300 * FS if name.endswith("s") else 330 * FS), name
        record = cinc2015.read_record(root, name)
        assert record.fs == FS and record.ppg_fs is None, name
        assert record.n_samples == len(record.ppg) == header.sig_len - tail == KEPT, name
        assert (record.subject_id, record.labels, record.age, record.sex, record.split) == (
            f"cinc2015:{name}", [], None, SEX_UNKNOWN, None)
    np.testing.assert_array_equal(cinc2015.read_record(root, "t112s").ecg["II"],  # the start is kept
                                  _raw(root, "t112s", "II")[:KEPT].astype(np.float32))


@real_data
def test_cinc2015_nan_runs_reach_the_record():
    root = require_data("cinc2015")
    v212s = cinc2015.read_record(root, "v212s")
    for name, values in (("II", v212s.ecg["II"]), ("PLETH", v212s.ppg)):
        assert _nan_runs(values) == _nan_runs(_raw(root, "v212s", name)[:KEPT]), name
        assert max(_nan_runs(values)) == 13756, name  # the 55-s run
    b684s = cinc2015.read_record(root, "b684s")
    runs = _nan_runs(b684s.ecg["II"])
    assert runs == _nan_runs(_raw(root, "b684s", "II")[:KEPT]) and len(runs) == 25 and max(runs) == 32


@real_data
def test_cinc2015_records_without_pleth_or_ecg_are_rejected(tmp_path):
    root = require_data("cinc2015")
    header = (root / "t112s.hea").read_text()
    for folder, old, new, reason in (("no_ppg", " PLETH\n", " ABP\n", "no usable PLETH"),
                                     ("no_ecg", " II\n", " MCL\n", "no usable ECG lead")):
        path = _copy(root, "t112s", tmp_path / folder)
        path.with_suffix(".hea").write_text(header.replace(old, new))
        with pytest.raises(RecordError, match=reason):
            cinc2015.read_record(tmp_path / folder, "t112s")


# --- cinc2015: windows, manifest ----------------------------------------------------------------------------

@real_data
def test_cinc2015_record_to_windows():
    root = require_data("cinc2015")
    table, quarantine = record_to_table(cinc2015.read_record(root, "a161l"), PreprocessConfig())
    assert table.num_rows == FULL_WINDOWS and quarantine == []
    assert table.column("start").to_pylist() == [i * HOP for i in range(FULL_WINDOWS)]
    assert table.column("ppg").null_count == 0
    masks = np.array(table.column("ecg_mask").to_pylist())
    assert masks[:, LEADS.index("II")].all() and masks.sum(axis=1).tolist() == [1] * FULL_WINDOWS
    assert set(table.column("split").to_pylist()) == {hash_split("cinc2015:a161l")}

    # 55 s of NaN in II, V, PLETH and RESP: windows touching it are dropped, each with a reason.
    table, quarantine = record_to_table(cinc2015.read_record(root, "v212s"), PreprocessConfig())
    assert table.num_rows + len(quarantine) == FULL_WINDOWS and 0 < table.num_rows < FULL_WINDOWS
    assert sum("NaN gap" in q["reason"] for q in quarantine) == 28
    gap_start, gap_stop = 26245 * 125 // FS, (26245 + 13756) * 125 // FS
    assert all(s + WINDOW <= gap_start or s >= gap_stop for s in table.column("start").to_pylist())

    table, quarantine = record_to_table(cinc2015.read_record(root, "b684s"), PreprocessConfig())
    assert table.num_rows > 0 and not any("NaN gap" in q["reason"] for q in quarantine)  # short: interpolated


@real_data
def test_cinc2015_manifest_says_one_record_is_one_subject(tmp_path):
    root = require_data("cinc2015")
    data = tmp_path / "in"
    for name in ("a161l", "v212s"):
        _copy(root, name, data)
    (data / "RECORDS").write_text("a161l\nv212s\n")
    plan = plan_ingest("cinc2015", str(data), str(tmp_path / "out"), {"ingest": {"records_per_task": 1}})
    for task in range(len(plan.tasks)):
        run_task(plan, task)
    manifest = write_manifest(plan, {})
    assert manifest["subjects_note"] == cinc2015.SUBJECT_NOTE
    assert manifest["n_records_ok"] == 2 and sum(manifest["n_subjects"].values()) == 2
    v212s, _ = record_to_table(cinc2015.read_record(root, "v212s"), PreprocessConfig())
    assert sum(manifest["n_windows"].values()) == FULL_WINDOWS + v212s.num_rows


# --- the same recording through `wfdb` and `cinc2015` ---------------------------------------------------

@real_data
def test_challenge_records_in_wfdb_samples_share_the_cinc2015_subject():
    root = require_data("wfdb_samples")
    for name in ("a103l", "v102s"):  # .mat and format 212
        generic = wfdb_records.read_record(root, name)
        challenge = cinc2015.read_record(root, name)
        assert generic.subject_id == challenge.subject_id == f"cinc2015:{name}"
        assert generic.n_samples - challenge.n_samples == (60 if name.endswith("l") else 30) * FS
        split = hash_split(f"cinc2015:{name}")
        for record in (generic, challenge):  # the windows of both copies land in one split
            assert set(record_to_table(record, PreprocessConfig())[0].column("split").to_pylist()) <= {split}
    assert wfdb_records.read_record(root, "100").subject_id == "100"  # other records keep their own
    assert cinc2015.is_challenge_record("f121l", ["Ventricular_Flutter_Fib", "False alarm"])
    assert not cinc2015.is_challenge_record("a103l", [])  # the name alone is not enough
    assert not cinc2015.is_challenge_record("p000878", ["True alarm"])


# --- CODE-15% as WFDB ---------------------------------------------------------------------------------------

@real_data
def test_code15_wfdb_exams_with_header_demographics():
    root = require_data("code15_samples")
    keys = code15.list_records(root)
    assert keys == sorted((root / "RECORDS").read_text().split()) and len(keys) == 30
    exams = pd.read_csv(root / "exams_from_headers.csv").set_index("exam_id")
    peaks = []
    for key in keys:
        record = code15.read_record(root, key)
        row = exams.loc[int(key)]
        assert list(record.ecg) == list(LEADS) and record.ecg_units == "mV" and record.fs == 400.0
        assert record.n_samples == row["n_samples"] and record.ppg is None
        assert record.subject_id == str(row["patient_id"])  # as the HDF5 layout names the patient
        assert (record.age, record.sex) == (float(row["age"]), {"Female": 0, "Male": 1}[row["sex"]])
        assert record.labels == [] and record.split is None  # Chagas is not in the vocabulary
        ii = record.ecg["II"]
        peaks.append(np.max(np.abs(ii - np.median(ii))))
    assert 0.1 < np.median(peaks) < 5  # R amplitudes in mV (1000 adu/mV in the headers)
    digital = wfdb.rdrecord(str(root / keys[0]), physical=False).d_signal[:, 0]
    np.testing.assert_allclose(code15.read_record(root, keys[0]).ecg["I"], digital / 1000.0, atol=1e-6)


@real_data
def test_code15_wfdb_windows_and_short_exams():
    root = require_data("code15_samples")
    lengths = {}
    for key in code15.list_records(root):
        record = code15.read_record(root, key)
        lengths[key] = record.n_samples
        if record.n_samples == 2934:
            # 7.3 s: shorter than one 8.192-s window. Existing behaviour: the record is rejected.
            with pytest.raises(RecordError, match="shorter than one window"):
                record_to_table(record, PreprocessConfig())
            continue
        assert record.n_samples == 4096  # 10.24 s: one window
        table, quarantine = record_to_table(record, PreprocessConfig())
        assert table.num_rows == 1 and quarantine == []
        assert np.array(table.column("ecg_mask").to_pylist()).all() and table.column("ppg").null_count == 1
    assert sorted(lengths.values()).count(2934) == 21 and sorted(lengths.values()).count(4096) == 9
