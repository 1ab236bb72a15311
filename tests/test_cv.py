"""Subject-grouped cross-validation: folds as shard folders, pooling, and `p2es evaluate --cv-folds` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA_ROOT, NO_DATA_REASON, bidmc_windows_table

from p2es_dist.data.folds import fold_groups, fold_split, write_fold_shards
from p2es_dist.errors import UserError
from p2es_dist.evaluate.cv import pool_folds
from p2es_dist.evaluate.metrics import subject_bootstrap

RECORDS = ("bidmc_01", "bidmc_02", "bidmc_03", "bidmc_04", "bidmc_05", "bidmc_06")


def test_fold_groups_are_balanced_deterministic_and_seeded():
    subjects = [f"s{i}" for i in range(35)]
    groups = fold_groups(subjects * 3, 5, seed=0)  # repeated windows of a subject: one group per subject
    assert sorted(np.bincount(list(groups.values()))) == [7, 7, 7, 7, 7]
    assert groups == fold_groups(list(reversed(subjects)), 5, seed=0)
    assert groups != fold_groups(subjects, 5, seed=1)
    for fold in range(5):
        splits = [fold_split(g, fold, 5) for g in range(5)]
        assert splits.count("test") == 1 and splits.count("val") == 1 and splits.count("train") == 3


def _write_lead_ii(folder: Path, subjects: list[str], pearson: list[float], template: list[float]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "lead_ii_windows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["window_id", "subject_id", "p2es.pearson", "template_population.pearson"])
        for i, (s, p, t) in enumerate(zip(subjects, pearson, template, strict=True)):
            writer.writerow([f"{s}-{i}", s, p, t])
    return folder


def test_pool_folds_is_one_evaluation_of_the_pooled_windows(tmp_path):
    a = _write_lead_ii(tmp_path / "a", ["x", "x", "y"], [0.5, 0.7, 0.1], [0.2, 0.2, 0.2])
    b = _write_lead_ii(tmp_path / "b", ["z", "w"], [0.3, 0.4], [0.5, 0.1])
    pooled = pool_folds([a, b], protocol="zero-shot", n_boot=200, seed=3)
    point, low, high = subject_bootstrap(np.array([0.5, 0.7, 0.1, 0.3, 0.4]), ["x", "x", "y", "z", "w"],
                                         n_boot=200, seed=3)
    assert pooled["models"]["p2es"]["pearson"] == pytest.approx(point[0])
    assert pooled["models"]["p2es"]["ci95"]["pearson"] == [pytest.approx(low[0]), pytest.approx(high[0])]
    assert pooled["n_subjects"] == 4 and [f["n_windows"] for f in pooled["folds"]] == [3, 2]
    assert pooled["verdict"]["beats_template"] is True

    overlapping = _write_lead_ii(tmp_path / "c", ["y"], [0.0], [0.0])
    with pytest.raises(UserError, match="overlap"):
        pool_folds([a, overlapping], protocol="zero-shot")


@pytest.fixture(scope="module")
def six_subject_shards(tmp_path_factory) -> str:
    if not DATA_ROOT.exists():
        pytest.skip(NO_DATA_REASON)
    folder = tmp_path_factory.mktemp("cv") / "bidmc"
    (folder / "shards").mkdir(parents=True)
    table = bidmc_windows_table(6 * len(RECORDS), records=RECORDS)
    pq.write_table(table, folder / "shards" / "part.parquet")
    manifest = {"schema_version": 2, "source": "bidmc", "fs": 125, "window": 1024,
                "config": {"preprocess": {"calibration_s": 60.0}},
                "shards": [{"path": "shards/part.parquet", "rows": len(table)}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_fold_shards_test_every_subject_once(six_subject_shards, tmp_path):
    original = pq.read_table(Path(six_subject_shards) / "shards" / "part.parquet")
    folders = write_fold_shards(six_subject_shards, str(tmp_path / "folds"), folds=3, seed=0)
    tested = []
    for fold, folder in enumerate(folders):
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        table = pq.read_table(Path(folder) / manifest["shards"][0]["path"])
        assert manifest["cv"]["fold"] == fold and sum(manifest["n_windows"].values()) == len(original)
        assert table.drop(["split"]).equals(original.drop(["split"]))  # only the split column changes
        by_split = {s: set(table.filter(pa.compute.equal(table["split"], s))["subject_id"].to_pylist())
                    for s in ("train", "val", "test")}
        assert by_split["test"] and by_split["val"] and by_split["train"]
        assert not (by_split["test"] & by_split["val"]) and not (by_split["test"] & by_split["train"])
        assert sorted(by_split["test"]) == manifest["cv"]["test_subjects"]
        tested += sorted(by_split["test"])
    assert sorted(tested) == sorted(set(original["subject_id"].to_pylist()))
    with pytest.raises(UserError, match="--cv-folds 7"):
        write_fold_shards(six_subject_shards, str(tmp_path / "too_many"), folds=7)


def test_evaluate_cv_folds_end_to_end(six_subject_shards, tmp_path, ray_local, capsys):
    """Three folds of a seconds-long training config: one model per fold, each fold scored on its own
    test subjects only, pooled over all six subjects with the templates beside it."""
    from p2es_dist.jobs.evaluate import main as evaluate_main

    out = tmp_path / "cv"
    code = evaluate_main(["--cv-folds", "3", "--data", six_subject_shards, "--train-config", "smoke",
                          "--train-set", f"data.uris=[{six_subject_shards}]", "--train-set", "train.max_steps=2",
                          "--train-set", "train.eval_every=2", "--train-set", "train.checkpoint_every=2",
                          "--train-set", "model.use_template=true", "--protocol", "zero-shot",
                          "--bootstrap", "50", "--no-dtw", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "cv.json").read_text())["pooled"]["zero-shot"]
    assert summary["n_subjects"] == len(RECORDS)
    assert set(summary["models"]) == {"p2es", "template_population", "template_population_hedged"}
    for fold in range(3):
        trained = json.loads((out / f"fold_{fold}" / "model" / "result.json").read_text())
        assert trained["config"]["data"]["uris"] == [str(out / "folds" / f"fold_{fold}")]
        metrics = json.loads((out / f"fold_{fold}" / "zero-shot" / "metrics.json").read_text())
        assert metrics["data"]["n_subjects"] == summary["folds"][fold]["n_subjects"] == 2
    assert "| p2es |" in capsys.readouterr().out
