"""Ingest robustness on real BIDMC/WFDB files copied and damaged: non-finite and out-of-range samples, resume
after the input set changed, a failed ingest, and the same recording under two keys."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bidmc_windows_table, require_data

from p2es_dist.constants import SHARD_SCHEMA_VERSION
from p2es_dist.data import ingest, preprocess
from p2es_dist.data.batches import table_to_batch
from p2es_dist.data.ingest import pending_tasks, plan_ingest, run_ingest, shard_uris
from p2es_dist.data.ingest_core import ingest_record
from p2es_dist.data.preprocess import PreprocessConfig, make_windows
from p2es_dist.data.sources import bidmc
from p2es_dist.errors import UserError

BIDMC_FILES = ("_Signals.csv.gz", "_Fix.txt")


def _config(**ingest):
    return {"ingest": {"records_per_task": 2, "shard_rows": 300, **ingest}}


def _copy_bidmc(folder: Path, *names: str, files=BIDMC_FILES) -> None:
    source = require_data("bidmc", "bidmc_csv")
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in files:
            shutil.copy(source / f"{name}{suffix}", folder / f"{name}{suffix}")


def _edit_signals(path: Path, edit) -> None:
    """Rewrite a BIDMC signals file after `edit(frame, columns)`; `columns` maps stripped names to columns."""
    frame = pd.read_csv(path)
    edit(frame, {str(c).strip(): c for c in frame.columns})
    frame.to_csv(path, index=False)


def _rows(output: str, columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(uri, columns=columns) for uri in shard_uris(output)])


def _quarantine(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "quarantine.jsonl").read_text().splitlines()]


# -- 3: non-finite and out-of-range samples --------------------------------------------------------------


@pytest.mark.real_data
def test_inf_samples_are_gaps_and_out_of_range_records_are_refused(ray_local, tmp_path):
    folder = tmp_path / "raw" / "bidmc_csv"
    _copy_bidmc(folder, "bidmc_01", "bidmc_02")

    def one_inf_each(frame, columns):
        frame.loc[5000, columns["PLETH"]] = np.inf
        frame.loc[7000, columns["II"]] = -np.inf

    def in_microvolts_times_a_thousand(frame, columns):
        frame[columns["II"]] *= 1e6

    _edit_signals(folder / "bidmc_01_Signals.csv.gz", one_inf_each)
    _edit_signals(folder / "bidmc_02_Signals.csv.gz", in_microvolts_times_a_thousand)
    output = tmp_path / "out"
    manifest = run_ingest("bidmc", str(tmp_path / "raw"), str(output), _config())

    # One inf is a one-sample gap, interpolated: the record gives the windows of the undamaged original.
    clean = ingest_record("bidmc", require_data("bidmc"), "bidmc_csv/bidmc_01", PreprocessConfig())["table"]
    rows = _rows(str(output), ["record", "start", "ecg", "ecg_mask", "ppg", "quality"])
    assert rows.column("start").to_pylist() == clean.column("start").to_pylist() and len(rows) > 100
    ecg = rows.column("ecg").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    ppg = rows.column("ppg").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    assert np.isfinite(ecg).all() and np.isfinite(ppg).all()
    assert all(mask[1] for mask in rows.column("ecg_mask").to_pylist())  # lead II recorded, and finite
    # x1e6 does not fit float16 shards: the whole record is refused with the reason, nothing stored as inf.
    assert manifest["n_records_ok"] == 1 and manifest["n_records_quarantined"] == 1
    refused = [line for line in _quarantine(output) if line["record"] == "bidmc_csv/bidmc_02"]
    assert len(refused) == 1 and "II: filtered amplitude reaches" in refused[0]["reason"]
    assert "beyond the float16 range" in refused[0]["reason"]
    assert set(rows.column("record").to_pylist()) == {"bidmc_01"}


@pytest.mark.real_data
def test_window_whose_lead_turns_non_finite_loses_that_lead(monkeypatch):
    record = bidmc.read_record(require_data("bidmc"), "bidmc_csv/bidmc_01")
    before = make_windows(record, PreprocessConfig())
    real_bandpass = preprocess.bandpass

    def bandpass_with_a_nan_run(x, band_hz, order, fs=125):
        out = real_bandpass(x, band_hz, order, fs)
        if band_hz == PreprocessConfig().ecg_band_hz:
            out[1600:1700] = np.nan  # inside the windows starting at 1024 and 1536 only (hop 512)
        return out

    monkeypatch.setattr(preprocess, "bandpass", bandpass_with_a_nan_run)
    after = make_windows(record, PreprocessConfig())
    # BIDMC keeps lead II alone, so losing it rejects the window; no window is kept with NaN as recorded.
    assert sorted(set(before.start) - set(after.start)) == [1024, 1536]
    assert np.isfinite(after.ecg).all() and after.ecg_mask[:, 1].all()
    reasons = {r["start"]: r["reason"] for r in after.rejected}
    assert reasons[1024] == reasons[1536] == "non-finite values in II"


@pytest.mark.real_data
def test_batches_refuse_non_finite_windows_naming_window_and_shard(ray_local, tmp_path):
    from p2es_dist.data.loader import LoaderConfig, model_space_dataset

    table = bidmc_windows_table(8)
    ecg = table.column("ecg").combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()
    ecg.reshape(8, -1)[5, 1030] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(ecg, pa.float16()), ecg.size // 8)
    table = table.set_column(table.schema.get_field_index("ecg"), "ecg", column)
    bad_id = table.column("window_id")[5].as_py()
    with pytest.raises(UserError, match=f"window {bad_id} in its shard holds NaN or inf"):
        table_to_batch(table)
    # Through the Ray Data loader it still arrives as a UserError (the CLI's one line), naming the shard too.
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "broken.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "schema_version": SHARD_SCHEMA_VERSION, "shards": [{"path": "shards/broken.parquet", "rows": 8}]}))
    dataset = model_space_dataset(LoaderConfig(uris=[str(tmp_path)], batch_size=4), split="all", training=False)
    with pytest.raises(UserError, match=rf"window {bad_id} in shard \S*broken\.parquet holds NaN or inf"):
        dataset.take_all()


# -- 4: resume keyed by record identity and content ------------------------------------------------------


@pytest.mark.real_data
def test_resume_after_a_record_was_added_ingests_every_record_once(ray_local, tmp_path, caplog, monkeypatch):
    folder = tmp_path / "raw" / "bidmc_csv"
    _copy_bidmc(folder, "bidmc_01", "bidmc_02", "bidmc_04", "bidmc_05")
    output = str(tmp_path / "out")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # both tasks [01, 02] [04, 05] done, killed before the manifest
        patch.setattr(ingest, "write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            run_ingest("bidmc", str(tmp_path / "raw"), output, _config())
    assert len(pending_tasks(plan_ingest("bidmc", str(tmp_path / "raw"), output, _config()))) == 0
    _copy_bidmc(folder, "bidmc_03")
    with caplog.at_level(logging.INFO, logger="p2es.ingest"):
        resumed = run_ingest("bidmc", str(tmp_path / "raw"), output, _config())
    # Tasks [01, 02] [03, 04] [05]: only the first is the same task as before.
    assert "resuming: 1 of 3 tasks already done" in caplog.text
    assert "added bidmc_csv/bidmc_03" in caplog.text
    rows = _rows(output, ["window_id", "record"])
    ids = rows.column("window_id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(resumed["n_windows"].values())
    assert set(rows.column("record").to_pylist()) == {f"bidmc_0{i}" for i in range(1, 6)}
    clean = run_ingest("bidmc", str(tmp_path / "raw"), str(tmp_path / "clean"), _config())
    assert resumed["n_windows"] == clean["n_windows"] and resumed["n_records_ok"] == 5
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]


@pytest.mark.real_data
def test_failed_ingest_writes_no_manifest_and_fixed_input_is_read(ray_local, tmp_path):
    folder = tmp_path / "raw" / "bidmc_csv"
    _copy_bidmc(folder, "bidmc_01", files=("_Signals.csv.gz",))  # no _Fix.txt: the record cannot be split
    output = tmp_path / "out"
    with pytest.raises(UserError, match="every record failed"):
        run_ingest("bidmc", str(tmp_path / "raw"), str(output), _config())
    assert (output / "quarantine.jsonl").exists() and not (output / "manifest.json").exists()
    _copy_bidmc(folder, "bidmc_01", files=("_Fix.txt",))
    manifest = run_ingest("bidmc", str(tmp_path / "raw"), str(output), _config())
    assert manifest["n_records_ok"] == 1 and sum(manifest["n_windows"].values()) > 100
    assert _quarantine(output) == [line for line in _quarantine(output) if "start" in line]  # no record line


@pytest.mark.real_data
def test_records_changed_or_removed_after_a_finished_ingest_are_noticed(ray_local, tmp_path, caplog):
    folder = tmp_path / "raw" / "bidmc_csv"
    _copy_bidmc(folder, "bidmc_01", "bidmc_02", "bidmc_03")
    output = tmp_path / "out"
    first = run_ingest("bidmc", str(tmp_path / "raw"), str(output), _config())
    assert first["n_records_ok"] == 3
    signals = folder / "bidmc_02_Signals.csv.gz"
    signals.write_bytes(signals.read_bytes()[:20000])  # damaged after the fact
    for suffix in BIDMC_FILES:
        (folder / f"bidmc_03{suffix}").unlink()
    with caplog.at_level(logging.INFO, logger="p2es.ingest"):
        second = run_ingest("bidmc", str(tmp_path / "raw"), str(output), _config())
    assert "removed bidmc_csv/bidmc_03; changed bidmc_csv/bidmc_02" in caplog.text
    assert "already complete" not in caplog.text
    assert second["n_records_ok"] == 1 and second["n_records_quarantined"] == 1
    assert second["input_fingerprint"] != first["input_fingerprint"]
    assert set(_rows(str(output), ["record"]).column("record").to_pylist()) == {"bidmc_01"}
    assert "truncated or corrupt" in {q["record"]: q["reason"] for q in _quarantine(output)}["bidmc_csv/bidmc_02"]


# -- 5: the same recording under two keys ---------------------------------------------------------------


@pytest.mark.real_data
def test_bidmc_copy_in_another_folder_is_ingested_once(ray_local, tmp_path, caplog):
    _copy_bidmc(tmp_path / "raw" / "bidmc_csv", "bidmc_01", "bidmc_02")
    _copy_bidmc(tmp_path / "raw" / "dup", "bidmc_01")
    output = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="p2es.ingest"):
        manifest = run_ingest("bidmc", str(tmp_path / "raw"), output, _config())
    assert manifest["duplicates"] == [{"record": "dup/bidmc_01", "same_as": "bidmc_csv/bidmc_01"}]
    assert "dup/bidmc_01 has the same content as bidmc_csv/bidmc_01" in caplog.text
    assert manifest["n_records_ok"] == 2
    ids = _rows(output, ["window_id"]).column("window_id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(manifest["n_windows"].values())


@pytest.mark.real_data
def test_wfdb_recording_in_two_folders_is_one_subject(ray_local, tmp_path):
    # PTB's s0010_re: the `wfdb` reader knows no patient id here, so each key would be a subject of its own.
    source = require_data("wfdb_samples")
    for folder in ("ward_a", "ward_b"):
        (tmp_path / "raw" / folder).mkdir(parents=True)
        for suffix in (".hea", ".dat", ".xyz"):
            shutil.copy(source / f"s0010_re{suffix}", tmp_path / "raw" / folder / f"s0010_re{suffix}")
    output = str(tmp_path / "out")
    manifest = run_ingest("wfdb", str(tmp_path / "raw"), output, _config())
    assert manifest["duplicates"] == [{"record": "ward_b/s0010_re", "same_as": "ward_a/s0010_re"}]
    assert manifest["n_records_ok"] == 1 and sum(manifest["n_subjects"].values()) == 1
    rows = _rows(output, ["subject_id", "window_id"])
    assert set(rows.column("subject_id").to_pylist()) == {"ward_a/s0010_re"}
    assert len(rows) == sum(manifest["n_windows"].values()) > 0
