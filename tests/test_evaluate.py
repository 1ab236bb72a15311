"""`p2es evaluate` on a tiny shard of real BIDMC windows: split filter, schema, figures, baselines, --condition."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA_ROOT, NO_DATA_REASON, bidmc_windows_table

from p2es_dist.config import load_config
from p2es_dist.errors import UserError
from p2es_dist.evaluate.figures import plot_twelve_lead
from p2es_dist.evaluate.schema import validate_metrics
from p2es_dist.evaluate.windows import iter_batches, read_eval_windows, to_torch
from p2es_dist.jobs.evaluate import main as evaluate_main
from p2es_dist.jobs.evaluate import parse_baselines
from p2es_dist.models.registry import build_model

pytestmark = [pytest.mark.real_data, pytest.mark.skipif(not DATA_ROOT.exists(), reason=NO_DATA_REASON)]

# Per record: (split, labels). Labels are assigned here only to exercise the diagnostic path (BIDMC has none).
RECORDS = {"bidmc_01": ("test", ["NORM"]), "bidmc_02": ("test", ["MI"]), "bidmc_03": ("train", ["MI"])}
PER_RECORD = 4


def _write_shard(folder: Path, table: pa.Table) -> Path:
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    manifest = {"schema_version": 1, "source": "bidmc", "fs": 125, "window": 1024, "n_windows": {},
                "shards": [{"path": "part-00000.parquet", "rows": len(table), "sha256": ""}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _save_checkpoint(folder: Path, model_section: dict, *, seed: int = 0, prepare=None) -> str:
    from p2es_dist.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model(model_section)
    if prepare is not None:
        prepare(model)
    save_checkpoint(model, model_section, folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    table = bidmc_windows_table(PER_RECORD * len(RECORDS), records=tuple(RECORDS), all_leads=True)
    keys = table.column("record").to_pylist()
    table = table.set_column(table.schema.get_field_index("split"), "split",
                             pa.array([RECORDS[k][0] for k in keys], pa.string()))
    labels = [list(RECORDS[k][1]) for k in keys]
    labels[0] = []  # one unknown window among the test ones
    table = table.set_column(table.schema.get_field_index("labels"), "labels",
                             pa.array(labels, table.schema.field("labels").type))
    shards = str(_write_shard(root / "shards", table))

    def perturb(model):  # an untrained P2Es outputs exactly zero (zero-initialised projection): make it not
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))

    def fit_on_train(model):  # the DCT baseline, fitted in closed form on the train split only
        train = read_eval_windows([shards], split="train")
        model.fit_closed_form(to_torch(batch) for _, batch in iter_batches(train, batch_size=8))

    return {
        "table": table,
        "shards": shards,
        "p2es": _save_checkpoint(root / "p2es", load_config("smoke")["model"], prepare=perturb),
        "dct": _save_checkpoint(root / "dct", {"name": "dct", "in_coeffs": 64, "out_coeffs": 64},
                                prepare=fit_on_train),
        "encoder": _save_checkpoint(root / "encoder", {"name": "encoder", "size": "tiny"}),
        "classifier": _save_checkpoint(root / "clf", {"name": "classifier", "stem_channels": 8,
                                                      "stage_channels": [8, 16]}),
        "root": root,
    }


def test_split_filter_and_deterministic_subset(setup):
    table = setup["table"]
    by_split = {s: {w for w, x in zip(table.column("window_id").to_pylist(), table.column("split").to_pylist(),
                                      strict=True) if x == s} for s in ("train", "test")}
    test = read_eval_windows([setup["shards"]], split="test")
    ids = test.column("window_id").to_pylist()
    assert set(ids) == by_split["test"] and set(test.column("split").to_pylist()) == {"test"}
    assert ids == sorted(ids)
    assert set(read_eval_windows([setup["shards"]], split="train").column("window_id").to_pylist()) == by_split["train"]
    assert len(read_eval_windows([setup["shards"]], split="all")) == len(table)
    small = read_eval_windows([setup["shards"]], split="test", max_windows=3).column("window_id").to_pylist()
    larger = read_eval_windows([setup["shards"]], split="test", max_windows=5).column("window_id").to_pylist()
    assert len(small) == 3 and set(small) <= set(larger) <= by_split["test"]
    assert small == read_eval_windows([setup["shards"]], split="test", max_windows=3).column("window_id").to_pylist()
    with pytest.raises(UserError, match="no windows in split 'val'"):
        read_eval_windows([setup["shards"]], split="val")


def test_parse_baselines_and_user_errors(setup, tmp_path):
    assert parse_baselines("dct=runs/dct, li=s3://b/p") == {"dct": "runs/dct", "li": "s3://b/p"}
    with pytest.raises(UserError, match="name=URI"):
        parse_baselines("dct")
    with pytest.raises(UserError, match="--condition"):
        evaluate_main(["--model", setup["dct"], "--data", setup["shards"], "--out", str(tmp_path),
                       "--condition", "X9"])
    with pytest.raises(UserError, match="probe not available|--probe needs"):
        evaluate_main(["--probe", "--out", str(tmp_path)])


def test_end_to_end_model_baseline_classifier(setup, capsys):
    out = setup["root"] / "eval"
    argv = ["--model", setup["p2es"], "--data", setup["shards"], "--out", str(out), "--baselines",
            f"dct={setup['dct']}", "--classifier", setup["classifier"], "--bootstrap", "50", "--batch-size", "4",
            "--steps", "2", "--seed", "3"]
    assert evaluate_main(argv) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads((out / "metrics.json").read_text())
    validate_metrics(doc)
    n_test = PER_RECORD * 2
    assert headline["n_windows"] == doc["data"]["n_windows"] == n_test
    assert doc["data"]["n_windows_per_split"] == {"test": n_test} and doc["data"]["n_subjects"] == 2
    # Baselines are scored on the very same windows, and the same leads.
    base = doc["baselines"]["dct"]
    assert base["spaces"]["window"]["overall"]["n"] == doc["spaces"]["window"]["overall"]["n"] == n_test
    assert set(base["spaces"]["minmax"]["leads"]) == set(doc["spaces"]["minmax"]["leads"]) >= {"II"}
    assert base["hr"]["n_windows"] + base["hr"]["n_excluded"] == n_test
    assert doc["generation"] == {"stochastic": True, "sampler": "ddim", "steps": 2, "seed": 3, "n_samples": 1}
    assert base["generation"]["stochastic"] is False
    for section in (doc, base):
        overall = section["spaces"]["window"]["overall"]
        low, high = overall["ci95"]["mse"]
        assert overall["mse"] > 0 and low <= overall["mse"] <= high
        assert 0 <= overall["dtw"] <= overall["mae"]  # the diagonal path bounds DTW by MAE, per window
        assert section["timing"]["windows_per_s"] > 0
    assert doc["spaces"]["window"]["overall"]["mse"] != base["spaces"]["window"]["overall"]["mse"]
    assert base["spaces"]["window"]["overall"]["pearson"] is not None  # a fitted DCT is not constant
    # No --encoder: fd on the classifier's pooled features, and said so.
    assert doc["fd"] is not None and doc["fd"] >= 0 and doc["fd_features"] == "classifier"
    assert doc["fd_info"]["dim"] == 2 * 16
    # Diagnostic: 7 labelled test windows (one unknown), NORM and MI have positives; recorded, generated and
    # input-only (a PPG model: nothing unmasked, the chance floor). The classifier has no thresholds.json:
    # threshold-free figures only.
    assert doc["diagnostic_info"]["n_labelled"] == n_test - 1
    assert doc["diagnostic_info"]["threshold"]["source"] is None
    assert set(doc["diagnostic"]["recorded"]) == set(doc["diagnostic"]["generated"]) == {"NORM", "MI"}
    assert doc["diagnostic"]["recorded"]["MI"]["n"] == n_test - 1
    assert doc["diagnostic"]["input_only"]["MI"]["auroc"] == 0.5 and doc["diagnostic"]["generated"]["MI"]["f1"] is None
    assert set(doc["breakdown"]["sex"]) and doc["worst_subjects"][0]["mse"] >= doc["worst_subjects"][-1]["mse"]
    report = (out / "report.md").read_text()
    assert "dct" in report and "What fd is" in report and "Diagnostic value" in report
    assert "input-only" in report and "No validation thresholds" in report
    for name in ("window_best", "window_median", "window_worst", "per_lead_window", "hr_bland_altman", "models"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in report


def test_schema_rejects_a_broken_document(setup):
    doc = json.loads((setup["root"] / "eval" / "metrics.json").read_text())
    validate_metrics(doc)
    for breakage in (lambda d: d.pop("spaces"), lambda d: d["spaces"]["window"]["overall"].update(pearson=1.5),
                     lambda d: d["data"].update(split="holdout"),
                     lambda d: d["baselines"]["dct"]["spaces"]["window"]["leads"].update(X1={})):
        broken = copy.deepcopy(doc)
        breakage(broken)
        with pytest.raises(ValueError, match="metrics.schema.json"):
            validate_metrics(broken)


def test_condition_scores_only_leads_not_given(setup):
    out = setup["root"] / "eval_cond"
    assert evaluate_main(["--model", setup["p2es"], "--data", setup["shards"], "--out", str(out), "--condition",
                          "II", "--max-windows", "3", "--bootstrap", "20", "--steps", "1", "--no-figures",
                          "--no-dtw", "--encoder", setup["encoder"]]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["condition"] == ["II"] and doc["data"]["n_windows"] == 3
    assert "II" not in doc["spaces"]["window"]["leads"] and doc["spaces"]["window"]["leads"]  # aVR etc. remain
    assert doc["spaces"]["window"]["overall"]["dtw"] is None and doc["dtw"]["computed"] is False
    assert "model input" in doc["hr_method"]["note"]
    # fd on encoder features (3 windows < 64 features: the regularised fit), finite and non-negative.
    assert doc["fd"] is not None and doc["fd"] >= 0 and doc["fd_info"]["dim"] == 64 and doc["fd_info"]["n"] == 3
    with pytest.raises(UserError, match="no recorded lead is left"):
        evaluate_main(["--model", setup["p2es"], "--data", setup["shards"], "--out", str(out), "--condition",
                       "II,aVR", "--max-windows", "2", "--no-figures", "--no-dtw"])


def test_stochastic_generation_repeats_per_batch_and_worst_window_is_picked(setup):
    from p2es_dist.evaluate.pipeline import pick_windows
    from p2es_dist.evaluate.runner import ModelRun, generate, generation_settings
    from p2es_dist.models.base import GenerationOptions
    from p2es_dist.models.checkpoint import load_model

    model = load_model(setup["p2es"]).model
    options, settings = generation_settings(model, GenerationOptions(seed=5, steps=1))
    assert settings == {"stochastic": True, "sampler": "ddim", "steps": 1, "seed": 5, "n_samples": 1}  # default
    _, batch = next(iter_batches(read_eval_windows([setup["shards"]], split="test"), batch_size=2))
    first = generate(model, batch, first_row=4, options=options)
    again = generate(model, batch, first_row=4, options=options)
    other = generate(model, batch, first_row=6, options=options)
    assert np.array_equal(first, again) and not np.allclose(first, other)

    mse = np.full((4, 12), np.nan)
    mse[:, 1] = [0.5, 0.1, np.nan, 0.9]
    run = ModelRun(name="m", loaded=None, per_window={"window": {"mse": mse}}, hr=np.zeros(4), generation={},
                   seconds=1.0)
    assert pick_windows(run) == {"best": 1, "median": 0, "worst": 3}


def test_twelve_lead_plot_checks_shapes(tmp_path):
    x = np.zeros((12, 256))
    path = plot_twelve_lead(tmp_path / "a.png", traces={"recorded": x, "generated": x + 0.1}, title="t",
                            lead_mask=[True] + [False] * 11)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="expected"):
        plot_twelve_lead(tmp_path / "b.png", traces={"recorded": np.zeros((11, 256))})
