"""BIDMC reader on the real files, and on corrupted copies of them."""

import gzip
import shutil

import numpy as np
import pytest
from conftest import require_data

from p2es_dist.constants import SEX_FEMALE, SEX_MALE, SEX_UNKNOWN
from p2es_dist.data.record import RecordError
from p2es_dist.data.sources import bidmc
from p2es_dist.errors import UserError

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def root():
    return require_data("bidmc")


def test_lists_every_record(root):
    keys = bidmc.list_records(root)
    assert len(keys) == 43 and keys[0] == "bidmc_csv/bidmc_01" and keys == sorted(keys)


def test_reads_by_column_name_whatever_the_order(root):
    # bidmc_01 is "RESP, PLETH, V, AVR, II"; bidmc_05 is "RESP, PLETH, II, V, AVR".
    first, fifth = bidmc.read_record(root, "bidmc_csv/bidmc_01"), bidmc.read_record(root, "bidmc_csv/bidmc_05")
    for record in (first, fifth):
        assert set(record.ecg) == {"II", "aVR"} and record.fs == 125.0
        assert len(record.ppg) == len(record.ecg["II"]) == 60001
    with gzip.open(root / "bidmc_csv/bidmc_01_Signals.csv.gz", "rt") as f:
        raw = np.loadtxt(f, delimiter=",", skiprows=1, max_rows=5)
    np.testing.assert_allclose(first.ppg[:5], raw[:, 2])  # PLETH is the third column there
    np.testing.assert_allclose(first.ecg["II"][:5], raw[:, 5])


def test_demographics_and_subjects(root):
    records = {key: bidmc.read_record(root, key) for key in bidmc.list_records(root)}
    ages = {r.age for r in records.values()}
    assert 90.0 in ages and None in ages  # "90+" is top-coded, "NaN" is unknown
    sexes = [r.sex for r in records.values()]
    assert sexes.count(SEX_FEMALE) == 28 and sexes.count(SEX_MALE) == 14 and sexes.count(SEX_UNKNOWN) == 1
    # bidmc06-09 are one patient: one subject, so they can never straddle splits.
    assert len({records[f"bidmc_csv/bidmc_0{i}"].subject_id for i in range(6, 10)}) == 1
    assert len({r.subject_id for r in records.values()}) == 36


def _copy(root, tmp_path, name="bidmc_01"):
    folder = tmp_path / "bidmc_csv"
    folder.mkdir(exist_ok=True)
    for suffix in ("_Signals.csv.gz", "_Fix.txt"):
        shutil.copy(root / "bidmc_csv" / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder


def test_truncated_gzip_is_a_record_error(root, tmp_path):
    folder = _copy(root, tmp_path)
    path = folder / "bidmc_01_Signals.csv.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RecordError, match="truncated or corrupt"):
        bidmc.read_record(tmp_path, "bidmc_csv/bidmc_01")


def test_record_without_pleth_is_a_record_error(root, tmp_path):
    folder = _copy(root, tmp_path)
    path = folder / "bidmc_01_Signals.csv.gz"
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    with gzip.open(path, "wt") as f:
        f.write("\n".join(line.replace("PLETH", "PPGX") for line in lines))
    with pytest.raises(RecordError, match="no PLETH column"):
        bidmc.read_record(tmp_path, "bidmc_csv/bidmc_01")


def test_missing_fix_file_refuses_to_guess_the_subject(root, tmp_path):
    folder = _copy(root, tmp_path)
    (folder / "bidmc_01_Fix.txt").unlink()
    with pytest.raises(RecordError, match="subject unknown"):
        bidmc.read_record(tmp_path, "bidmc_csv/bidmc_01")


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no BIDMC"):
        bidmc.list_records(tmp_path)
