"""The ingest job end to end on Ray: shards, manifest, quarantine, resume, patient-disjoint splits."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import require_data

from p2es_dist.data.ingest import pending_tasks, plan_ingest, run_ingest, run_task, shard_uris
from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib

pytestmark = pytest.mark.ray


def _config(**ingest):
    return {"ingest": {"records_per_task": 2, "shard_rows": 300, **ingest}}


def _read_rows(output):
    return sum(pq.read_metadata(uri_lib.filesystem(u)[0].open(uri_lib.filesystem(u)[1])).num_rows
               for u in shard_uris(output))


def _subjects_by_split(output):
    tables = [pq.read_table(uri_lib.filesystem(u)[0].open(uri_lib.filesystem(u)[1]), columns=["subject_id", "split"])
              for u in shard_uris(output)]
    by_split = {}
    for table in tables:
        for subject, split in zip(table.column("subject_id").to_pylist(), table.column("split").to_pylist(),
                                  strict=True):
            by_split.setdefault(split, set()).add(subject)
    return by_split


def assert_patient_disjoint(output):
    by_split = _subjects_by_split(output)
    splits = list(by_split)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not by_split[a] & by_split[b], f"{a} and {b} share subjects"
    return by_split


@pytest.mark.real_data
def test_bidmc_ingest_manifest_matches_shards(ray_local, tmp_path):
    root = require_data("bidmc")
    output = str(tmp_path / "bidmc")
    manifest = run_ingest("bidmc", str(root), output, _config(records_per_task=8, shard_rows=1000))
    # Only lead II is kept (BIDMC scaled each lead on its own), and bidmc_32's lead II is clipped throughout.
    assert manifest["n_records_ok"] == 42 and manifest["n_records_quarantined"] == 1
    assert sum(manifest["n_windows"].values()) == _read_rows(output) == sum(s["rows"] for s in manifest["shards"])
    assert all(s["rows"] <= 1000 for s in manifest["shards"])
    # Paired records carry a calibration beat (from their first 60 s) on every window of the record.
    assert all(0 < s["calibrated_rows"] <= s["rows"] for s in manifest["shards"])
    assert sum(manifest["n_subjects"].values()) == 35
    assert manifest["units"]["ecg"].startswith("normalised")
    by_split = assert_patient_disjoint(output)
    assert set(by_split) == {"train", "val", "test"}
    lines = [json.loads(x) for x in (tmp_path / "bidmc" / "quarantine.jsonl").read_text().splitlines()]
    assert lines and all({"record", "reason"} <= set(line) for line in lines)
    assert manifest["n_windows_quarantined"] == sum("start" in line for line in lines)
    assert [line["record"] for line in lines if "start" not in line] == ["bidmc_32"]
    # Row groups sized for streaming.
    first = uri_lib.join(output, manifest["shards"][0]["path"])
    assert pq.ParquetFile(first).metadata.row_group(0).num_rows <= 256


@pytest.mark.real_data
def test_corrupted_records_go_to_quarantine_and_good_ones_ingest(ray_local, tmp_path):
    source = require_data("bidmc", "bidmc_csv")
    folder = tmp_path / "raw" / "bidmc_csv"
    folder.mkdir(parents=True)
    for name in ("bidmc_01", "bidmc_02", "bidmc_03"):
        for suffix in ("_Signals.csv.gz", "_Fix.txt"):
            shutil.copy(source / f"{name}{suffix}", folder / f"{name}{suffix}")
    truncated = folder / "bidmc_02_Signals.csv.gz"
    truncated.write_bytes(truncated.read_bytes()[:20000])
    with gzip.open(folder / "bidmc_03_Signals.csv.gz", "rt") as f:
        text = f.read().replace("PLETH", "SPO2WAVE")
    with gzip.open(folder / "bidmc_03_Signals.csv.gz", "wt") as f:
        f.write(text)
    output = tmp_path / "out"
    manifest = run_ingest("bidmc", str(tmp_path / "raw"), str(output), _config())
    assert manifest["n_records_ok"] == 1 and manifest["n_records_quarantined"] == 2
    reasons = {json.loads(x)["record"]: json.loads(x)["reason"] for x in (output / "quarantine.jsonl").open()}
    assert "truncated or corrupt" in reasons["bidmc_csv/bidmc_02"]
    assert "no PLETH column" in reasons["bidmc_csv/bidmc_03"]
    assert _read_rows(str(output)) == manifest["n_windows"]["train"] + manifest["n_windows"]["val"] + \
        manifest["n_windows"]["test"] > 100


@pytest.mark.real_data
def test_every_record_failing_is_an_error(ray_local, tmp_path):
    source = require_data("bidmc", "bidmc_csv")
    folder = tmp_path / "raw"
    folder.mkdir()
    shutil.copy(source / "bidmc_01_Signals.csv.gz", folder / "bidmc_01_Signals.csv.gz")  # no _Fix.txt
    with pytest.raises(UserError, match="every record failed"):
        run_ingest("bidmc", str(folder), str(tmp_path / "out"), _config())
    assert (tmp_path / "out" / "quarantine.jsonl").exists()


@pytest.mark.real_data
def test_interrupted_ingest_resumes_and_matches_a_clean_run(ray_local, tmp_path):
    root = require_data("bidmc")
    config = _config(records_per_task=10)
    clean = run_ingest("bidmc", str(root), str(tmp_path / "clean"), config)
    # Simulate a crash: two tasks finished, no manifest yet.
    partial = str(tmp_path / "partial")
    plan = plan_ingest("bidmc", str(root), partial, config)
    run_task(plan, 0)
    run_task(plan, 2)
    assert not uri_lib.exists(uri_lib.join(partial, "manifest.json"))
    assert pending_tasks(plan) == [1, 3, 4]
    resumed = run_ingest("bidmc", str(root), partial, config)
    assert resumed["n_windows"] == clean["n_windows"]
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    # A finished ingest is not redone; a different config refuses to mix into the same folder.
    assert run_ingest("bidmc", str(root), partial, config)["fingerprint"] == resumed["fingerprint"]
    other = {**config, "preprocess": {"hop": 256}}
    with pytest.raises(UserError, match="other settings"):
        run_ingest("bidmc", str(root), partial, other)
    # An output a command owns (quickstart's demo bucket) is redone with the new settings instead.
    redone = run_ingest("bidmc", str(root), partial, other, replace_other_settings=True)
    assert redone["fingerprint"] != resumed["fingerprint"] and redone["n_windows"] != resumed["n_windows"]
    shard_files = {p.name for p in (tmp_path / "partial").rglob("*.parquet")}
    assert shard_files == {Path(s["path"]).name for s in redone["shards"]}  # the old shards are gone


@pytest.mark.s3
@pytest.mark.real_data
def test_ingest_to_s3(ray_local, s3_bucket):
    root = require_data("bidmc")
    output = f"{s3_bucket}/bidmc"
    manifest = run_ingest("bidmc", str(root), output, _config(records_per_task=11, shard_rows=2000))
    assert uri_lib.exists(uri_lib.join(output, "manifest.json"))
    assert _read_rows(output) == sum(manifest["n_windows"].values())
    assert_patient_disjoint(output)


def test_synthetic_ingest(ray_local, tmp_path):
    output = str(tmp_path / "syn")
    manifest = run_ingest("synthetic", None, output, {"ingest": {"shard_rows": 256},
                                                      "synthetic": {"n_windows": 700, "seed": 3}})
    assert sum(manifest["n_windows"].values()) == _read_rows(output) == 700
    assert [s["rows"] for s in manifest["shards"]] == [256, 256, 188]
    assert manifest["units"]["ecg"] == "mV"
    assert_patient_disjoint(output)


@pytest.mark.real_data
@pytest.mark.parametrize(("source", "folder"), [
    ("ptbxl", "ptbxl"), ("ludb", "ludb"), ("cinc", "cinc2021"), ("wfdb", "wfdb_samples"),
])
def test_every_real_source_ingests_patient_disjoint(ray_local, tmp_path, source, folder):
    root = require_data(*folder.split("/"))
    output = str(tmp_path / source)
    manifest = run_ingest(source, str(root), output, _config(records_per_task=64, shard_rows=2000))
    assert manifest["n_records_ok"] > 0
    assert _read_rows(output) == sum(manifest["n_windows"].values()) > 0
    assert sum(manifest["n_subjects"].values()) == len(set().union(*assert_patient_disjoint(output).values()))
    assert manifest["units"]["ecg"] == "mV"


@pytest.mark.real_data
def test_mimic_sample_with_gaps_everywhere_is_quarantined_window_by_window(ray_local, tmp_path):
    # The shared MIMIC-III excerpt has lead II in one segment only and NaN gaps in PLETH: no clean window.
    root = require_data("wfdb_samples", "multi-segment")
    with pytest.raises(UserError, match="every record failed"):
        run_ingest("mimic3wdb", str(root), str(tmp_path / "out"), _config())
    lines = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert any("NaN gap in II" in line["reason"] for line in lines)
    assert lines[-1] == {"record": "p000878/3269321", "source": "mimic3wdb", "reason": "no usable window"}


def test_code15_ingests_patient_disjoint(ray_local, tmp_path):
    from test_readers import _write_code15

    _write_code15(tmp_path)
    output = str(tmp_path / "out")
    manifest = run_ingest("code15", str(tmp_path), output, _config())
    # CODE-15% holds 10-s and 7-s exams; a 7-s exam is shorter than one 8.192-s window.
    assert manifest["n_records_ok"] == 3 and manifest["n_records_quarantined"] == 2
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert all("shorter than one window" in reason for reason in reasons)
    by_split = assert_patient_disjoint(output)
    # Patient 523632 has two exams: both land in one split.
    tables = [pq.read_table(u) for u in shard_uris(output)]
    rows = [(s, p) for t in tables for s, p in zip(t["subject_id"].to_pylist(), t["split"].to_pylist(), strict=True)]
    assert len({split for subject, split in rows if subject.endswith("523632")}) == 1 and by_split
