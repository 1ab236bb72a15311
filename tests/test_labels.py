"""The canonical label table (`p2es_dist/data/labels.py`, `constants.LABELS`): one test per source on real codes,
plus its invariants."""

from __future__ import annotations

import ast
import csv

import pandas as pd
import pytest
import wfdb
from conftest import require_data

from p2es_dist.constants import LABEL_INDEX, LABELS
from p2es_dist.data.labels import (
    LABEL_TABLE,
    SUPERCLASSES,
    labels_from_code15,
    labels_from_ludb_text,
    labels_from_scp,
    labels_from_snomed,
)


def test_table_uses_only_the_canonical_vocabulary_and_has_no_duplicate_codes():
    assert {label for rule in LABEL_TABLE for label in rule.labels} <= set(LABELS)
    keys = [(rule.source, rule.code) for rule in LABEL_TABLE]
    assert len(keys) == len(set(keys))
    assert {rule.source for rule in LABEL_TABLE} == {"scp", "snomed", "ludb", "code15"}


def test_outputs_are_sorted_deduplicated_and_ignore_unknown_codes():
    labels = labels_from_scp({"CRBBB": 100.0, "IRBBB": 100.0, "IMI": 50.0, "NOT_A_CODE": 100.0})
    assert labels == ["MI", "CD", "RBBB"]
    assert labels == sorted(set(labels), key=LABEL_INDEX.__getitem__)
    assert labels_from_snomed(["999999999", "Unknown", ""]) == []
    assert labels_from_ludb_text([]) == []


# --- PTB-XL -----------------------------------------------------------------------------------------

def _ptbxl_rows() -> dict[int, dict[str, float]]:
    path = require_data("ptbxl", "ptbxl_database.csv")
    with open(path) as handle:
        return {int(row["ecg_id"]): ast.literal_eval(row["scp_codes"]) for row in csv.DictReader(handle)}


@pytest.mark.real_data
def test_ptbxl_real_rows():
    rows = _ptbxl_rows()
    expected = {
        1: ["NORM"],  # {'NORM': 100, 'LVOLT': 0, 'SR': 0}
        2: ["NORM", "SB"],  # {'NORM': 80, 'SBRAD': 0}
        102: ["STTC", "CD", "1AVB"],  # {'ISCAL': 50, '1AVB': 100, 'SR': 0}
        108: ["NORM", "ST"],  # {'NORM': 80, 'STACH': 0}
        256: ["CD", "LBBB", "PVC"],  # {'CLBBB': 100, 'PVC': 100, 'SR': 0}
        269: ["MI", "CD", "RBBB"],  # {'IMI': 100, 'CRBBB': 100, 'PAC': 0, 'LPR': 0, 'QWAVE': 0, 'SR': 0}
        282: ["MI", "STTC", "HYP", "CD", "LBBB", "AF", "PVC"],  # ASMI ILBBB LVH ISC_ PVC AFIB
        351: ["STTC", "AF"],  # {'AFIB': 100, 'NST_': 0}
        385: ["PACE"],  # {'PACE': 100}
    }
    for ecg_id, labels in expected.items():
        assert labels_from_scp(rows[ecg_id]) == labels, (ecg_id, rows[ecg_id])


@pytest.mark.real_data
def test_ptbxl_min_likelihood_filters_diagnostic_statements_only():
    rows = _ptbxl_rows()
    assert rows[103] == {"IMI": 15.0, "LAFB": 100.0, "ABQRS": 0.0, "STACH": 0.0}
    assert labels_from_scp(rows[103]) == ["MI", "CD", "ST"]
    # IMI at 15 % drops; STACH (rhythm, likelihood 0 = not graded) stays.
    assert labels_from_scp(rows[103], min_likelihood=50) == ["CD", "ST"]


@pytest.mark.real_data
def test_scp_rows_agree_with_scp_statements_csv():
    path = require_data("ptbxl", "scp_statements.csv")
    statements = pd.read_csv(path, index_col=0)
    # This copy of the CSV spells 1AVB/2AVB/3AVB as 1.0AVB...; scp_codes in the database use 1AVB.
    statements.index = [code.replace(".0AVB", "AVB") for code in statements.index]
    diagnostic = statements[statements["diagnostic"] == 1]["diagnostic_class"].to_dict()
    scp_rules = {rule.code: rule for rule in LABEL_TABLE if rule.source == "scp"}
    assert set(diagnostic) <= set(scp_rules), set(diagnostic) - set(scp_rules)
    for code, rule in scp_rules.items():
        assert code in statements.index, code
        superclasses = set(rule.labels) & SUPERCLASSES
        assert superclasses == ({diagnostic[code]} if code in diagnostic else set()), code


# --- CinC 2021 (SNOMED-CT) --------------------------------------------------------------------------

def _dx(record: str) -> list[str]:
    header = wfdb.rdheader(str(require_data("cinc2021", f"{record}.hea"))[:-4])
    dx = next(line for line in header.comments if line.startswith("Dx:"))
    return dx.partition(":")[2].strip().split(",")


@pytest.mark.real_data
def test_cinc_real_headers():
    expected = {
        "E07506": ["NORM"],  # 426783006 sinus rhythm alone
        "HR06003": ["NORM", "ST"],  # sinus rhythm + sinus tachycardia
        "HR06000": ["STTC"],  # T wave abnormal rules NORM out
        "E07509": ["CD", "RBBB", "SB"],  # 59118001 RBBB + sinus bradycardia
        "HR06002": ["CD", "RBBB", "SB"],  # incomplete RBBB with sinus brady and sinus rhythm
        "E07500": ["HYP", "SB"],  # left atrial enlargement + sinus bradycardia
        "E07514": ["STTC", "ST"],  # sinus tachy + anterior ischemia + T inversion
        # PAC (outside the vocabulary), sinus tachy, LV high voltage (no class), T abnormal, PVC
        "JS20003": ["STTC", "PVC", "ST"],
        "JS20008": [],  # PAC + sinus arrhythmia: abnormal but nothing canonical
    }
    for record, labels in expected.items():
        assert labels_from_snomed(_dx(record)) == labels, (record, _dx(record))


def test_snomed_named_codes():
    assert labels_from_snomed(["164889003"]) == ["AF"]
    assert labels_from_snomed([164890007]) == ["AF"]  # ints as well as strings
    assert labels_from_snomed(["164909002"]) == ["CD", "LBBB"]
    assert labels_from_snomed(["270492004", "426783006"]) == ["CD", "1AVB"]
    assert labels_from_snomed(["164865005"]) == ["MI"]
    assert labels_from_snomed(["10370003"]) == ["PACE"]
    assert labels_from_snomed(["427172004"]) == labels_from_snomed(["17338001"]) == ["PVC"]
    assert labels_from_snomed(["426783006", "39732003"]) == ["NORM"]  # axis deviation is neutral
    assert labels_from_snomed(["426783006", "123456789"]) == []  # an unknown code rules NORM out


# --- LUDB -------------------------------------------------------------------------------------------

def _ludb_comments(record: str) -> list[str]:
    path = require_data("ludb", "data", f"{record}.hea")
    return wfdb.rdheader(str(path)[:-4]).comments


@pytest.mark.real_data
def test_ludb_real_diagnosis_text():
    expected = {
        "1": ["STTC", "HYP", "SB"],  # sinus brady, LAD (ignored), LVH, LV overload, repolarisation
        "4": ["MI", "STTC", "HYP", "CD", "RBBB"],  # incomplete RBBB, LAH, LVH, ischemia, scar
        "8": ["STTC", "AF", "PACE"],  # atrial fibrillation, ischemia/scar/NSTEMI, ventricular pacing
        "24": ["MI", "HYP", "CD", "LBBB", "SB"],  # complete LBBB, STEMI
        "119": ["NORM"],  # sinus rhythm and an axis statement only
        "140": [],  # sinus rhythm, wandering atrial pacemaker (not PACE), early repolarisation
    }
    for record, labels in expected.items():
        assert labels_from_ludb_text(_ludb_comments(record)) == labels, (record, _ludb_comments(record))


@pytest.mark.real_data
def test_ludb_header_comments_and_ludb_csv_agree_for_every_record():
    path = require_data("ludb", "ludb.csv")
    text_columns = ["Rhythms", "Electric axis of the heart", "Conduction abnormalities", "Extrasystolies",
                    "Hypertrophies", "Cardiac pacing", "Ischemia", "Non-specific repolarization abnormalities",
                    "Other states"]
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 180
    for row in rows:
        lines = [line for column in text_columns for line in row[column].splitlines()]
        assert labels_from_ludb_text(lines) == labels_from_ludb_text(_ludb_comments(row["ID"])), row["ID"]


# --- CODE-15% ---------------------------------------------------------------------------------------

CODE15_ROW = {  # one exams.csv row, in the real column layout
    "exam_id": 1169160, "age": 38, "is_male": True, "nn_predicted_age": 40.16, "1dAVb": False, "RBBB": True,
    "LBBB": False, "SB": False, "ST": True, "AF": False, "patient_id": 523632, "death": False,
    "timey": 2.09, "normal_ecg": False, "trace_file": "exams_part13.hdf5",
}


def test_code15_row():
    assert labels_from_code15(CODE15_ROW) == ["CD", "RBBB", "ST"]
    as_csv_text = {key: str(value) for key, value in CODE15_ROW.items()}  # "True"/"False" as read raw
    assert labels_from_code15(as_csv_text) == ["CD", "RBBB", "ST"]
    assert labels_from_code15(pd.Series(CODE15_ROW)) == ["CD", "RBBB", "ST"]
    row = {**CODE15_ROW, "RBBB": False, "ST": False, "1dAVb": 1, "AF": float("nan"), "normal_ecg": True}
    assert labels_from_code15(row) == ["NORM", "CD", "1AVB"]
