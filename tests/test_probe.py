"""Linear probes and masked-lead reconstruction on frozen encoder features."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import bidmc_windows_table
from safetensors.torch import save_file

from p2es_dist.constants import LEAD_INDEX
from p2es_dist.errors import UserError
from p2es_dist.evaluate.probe import (
    DEFAULT_L2,
    L2_GRID,
    LogisticProbe,
    auroc,
    bootstrap_intervals,
    run_probe,
    select_l2,
    subject_folds,
    window_batches,
)
from p2es_dist.evaluate.reconstruction import run_reconstruction
from p2es_dist.models.registry import build_model

TINY = {"name": "encoder", "size": "tiny"}


# --- AUROC and the logistic regression -----------------------------------------------------------------
def test_auroc_known_answers() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.full(6, 0.3), np.array([0, 1, 0, 1, 0, 1])) == 0.5  # ties count half
    assert auroc(np.array([0.2, 0.5, 0.5, 0.7]), np.array([0, 1, 0, 1])) == 0.875
    assert auroc(np.array([0.2, 0.5]), np.array([1, 1])) is None


def test_logistic_probe_separates_a_toy_problem_and_reaches_the_optimum() -> None:
    rng = np.random.default_rng(0)
    n, d = 400, 8
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) * np.array([1.0, 5.0, 0.1, 1, 1, 1, 1, 1])
    x[:, 0] += 4.0 * y  # only feature 0 separates the classes, on a different scale from the others
    x[:, 2] = 3.0  # a constant feature must not break the standardisation
    train, test = slice(0, 300), slice(300, None)
    probe = LogisticProbe(l2=1e-2).fit(x[train], y[train])
    assert auroc(probe.decision_function(x[test]), y[test]) > 0.99
    scaler, regression = probe.model_[0], probe.model_[-1]
    weight = regression.coef_[0]
    assert abs(weight[0]) > 5 * np.abs(weight[1:]).max()
    proba = probe.predict_proba(x[test])
    assert ((proba > 0.5) == y[test].astype(bool)).mean() > 0.93  # Bayes accuracy ~0.977
    # The fit is the optimum of the documented objective, mean cross-entropy + l2 / 2 * ||w||^2 on the
    # standardised features (the check of C = 1 / (l2 * n)): its gradient vanishes there.
    xs = (torch.as_tensor(x[train]) - torch.as_tensor(scaler.mean_)) / torch.as_tensor(scaler.scale_)
    w = torch.tensor(weight, requires_grad=True)
    b = torch.tensor(regression.intercept_[0], requires_grad=True)
    target = torch.as_tensor(y[train], dtype=torch.float64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, target)
    (loss + 0.5 * 1e-2 * w.square().sum()).backward()
    assert float(w.grad.abs().max()) < 1e-5 and abs(float(b.grad)) < 1e-5


def test_logistic_probe_l2_does_not_depend_on_the_number_of_windows() -> None:
    # The loss is a mean: every window twice is the same objective, so the same fit (C = 1 / l2 would halve
    # the penalty's weight here).
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    x = rng.normal(size=(100, 4)) + y[:, None]
    once = LogisticProbe(l2=0.1).fit(x, y).model_[-1]
    twice = LogisticProbe(l2=0.1).fit(np.repeat(x, 2, axis=0), np.repeat(y, 2)).model_[-1]
    np.testing.assert_allclose(twice.coef_, once.coef_, rtol=1e-5)
    np.testing.assert_allclose(twice.intercept_, once.intercept_, rtol=1e-5, atol=1e-8)


def test_auroc_equals_the_rank_formula_on_random_data() -> None:
    # The hand-written Mann-Whitney formula the library call replaced, with average ranks for ties.
    from scipy.stats import rankdata

    rng = np.random.default_rng(5)
    for trial in range(50):
        n = int(rng.integers(2, 300))
        targets = rng.random(n) < rng.uniform(0.05, 0.95)
        if targets.all() or not targets.any():
            continue
        scores = rng.normal(size=n) if trial % 2 else rng.integers(0, 5, n).astype(float)  # odd: many ties
        n_pos, n_neg = int(targets.sum()), int((~targets).sum())
        rank_formula = (rankdata(scores)[targets].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        assert auroc(scores, targets) == pytest.approx(rank_formula, abs=1e-12)


# --- regularisation by grouped CV, and subject-level intervals -------------------------------------------
def test_subject_folds_keep_a_subjects_windows_together() -> None:
    subjects = np.repeat(np.arange(40), 3)[np.random.default_rng(1).permutation(120)]
    folds = subject_folds(subjects, 5, seed=0)
    assert set(folds) == set(range(5))
    for subject in range(40):
        assert len(set(folds[subjects == subject])) == 1
    assert np.bincount(folds).tolist() == [24] * 5  # 8 subjects of 3 windows per fold
    assert np.array_equal(folds, subject_folds(subjects, 5, seed=0))


def test_select_l2_follows_the_cross_validated_auroc() -> None:
    # The class shows only in the difference of two strongly correlated features: a strongly regularised
    # probe points along the mean difference (feature 0 alone, swamped by the shared part), so CV must
    # pick the weakest penalty of the grid.
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    shared = 10 * rng.normal(size=n)
    x = np.column_stack([shared + y + 0.2 * rng.normal(size=n), shared + 0.2 * rng.normal(size=n),
                         rng.normal(size=(n, 3))])
    l2, cv_auroc = select_l2(x, y, np.arange(n))
    assert l2 == min(L2_GRID) and cv_auroc > 0.85
    strong = LogisticProbe(l2=max(L2_GRID)).fit(x[:150], y[:150])
    assert auroc(strong.decision_function(x[150:]), y[150:]) < 0.7
    # Fewer subjects than folds, or a fold whose training part holds one class: the default, no CV figure.
    assert select_l2(x, y, np.arange(n) % 3) == (DEFAULT_L2, None)
    one_positive_subject = np.where(y == 1, 0, np.arange(n) + 1)
    assert select_l2(x, y, one_positive_subject) == (DEFAULT_L2, None)


@pytest.mark.slow
def test_bootstrap_resamples_subjects_not_windows() -> None:
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 3 == 0
    scores = y + rng.normal(size=n)
    floor = rng.normal(size=n)
    once = bootstrap_intervals(scores, floor, y, np.arange(n))
    lo, hi = once["auroc_ci95"]
    assert lo < auroc(scores, y) < hi and hi - lo > 0.1
    assert once["auroc_gain_ci95"][0] > 0  # a real signal against a random scorer
    # Every window twice, under the same subject: same subjects drawn, same AUROCs, the same intervals
    # (a window-level bootstrap would narrow them as if there were twice the data).
    twice = bootstrap_intervals(np.repeat(scores, 2), np.repeat(floor, 2), np.repeat(y, 2), np.repeat(np.arange(n), 2))
    for key in once:
        np.testing.assert_allclose(twice[key], once[key])
    assert bootstrap_intervals(scores, scores, y, np.arange(n))["auroc_gain_ci95"] == [0.0, 0.0]
    # Every positive from one subject: resampling subjects cannot say how another would score.
    one_positive_subject = np.where(y, 0, np.arange(n) + 1)
    assert bootstrap_intervals(scores, floor, y, one_positive_subject) == {
        "auroc_ci95": None, "auroc_random_init_ci95": None, "auroc_gain_ci95": None}


# --- on real BIDMC windows, relabelled so the probe has two classes -------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 BIDMC windows of two subjects: even rows train, odd rows test; bidmc_01 labelled MI, bidmc_02 NORM."""
    table = bidmc_windows_table(32, all_leads=True)  # II and aVR: reconstruction of aVR from II is scored
    folder = tmp_path_factory.mktemp("probe_shards")
    records = table.column("record").to_pylist()
    first = records[0]
    labels = pa.array([["MI"] if r == first else ["NORM"] for r in records], type=pa.list_(pa.string()))
    splits = pa.array(["train" if i % 2 == 0 else "test" for i in range(len(records))])
    table = table.set_column(table.schema.get_field_index("labels"), "labels", labels)
    table = table.set_column(table.schema.get_field_index("split"), "split", splits)
    (folder / "shards").mkdir()
    pq.write_table(table, folder / "shards" / "part-0.parquet")
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"path": "shards/part-0.parquet",
                                                                   "rows": table.num_rows}]}))
    return str(folder)


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(7)
    model = build_model(TINY)
    folder = tmp_path_factory.mktemp("encoder")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(TINY))
    return str(folder)


def test_run_probe_writes_the_probe_block(shards, encoder_checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    (out).mkdir()
    (out / "metrics.json").write_text(json.dumps({"fd": 1.5}))  # another job's key survives
    result = run_probe(encoder_uri=encoder_checkpoint, train_data=[shards], data=[shards], labels=["MI", "NORM"],
                       out=str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fd"] == 1.5 and metrics["probe"] == result["probe"]
    for label in ("MI", "NORM"):
        block = metrics["probe"][label]
        assert block["n"] == 16 and block["n_pos"] == 8 and block["n_train"] == 16
        assert 0.0 <= block["auroc"] <= 1.0 and 0.0 <= block["auroc_random_init"] <= 1.0
        # Two subjects cannot be cross-validated in 5 folds: the default l2, and no CV figure claimed.
        assert block["l2"] == block["l2_random_init"] == DEFAULT_L2 and block["cv_auroc"] is None
        assert {"auroc_ci95", "auroc_random_init_ci95", "auroc_gain_ci95"} <= set(block)
    assert metrics["probe_data"]["features"] == "channels (Encoder.channel_embed)"
    # MI and NORM are complements here: the probes' scores mirror, so their AUROCs agree.
    assert metrics["probe"]["MI"]["auroc"] == pytest.approx(metrics["probe"]["NORM"]["auroc"], abs=0.05)
    recon = metrics["reconstruction"]
    assert recon["given"] == ["II"] and recon["n_windows"] == 16 and set(recon["leads"]) == {"aVR"}


def test_probe_features_can_be_the_single_mean_embedding(shards, encoder_checkpoint, tmp_path) -> None:
    channels = run_probe(encoder_uri=encoder_checkpoint, train_data=[shards], data=[shards], labels=["MI"],
                         out=str(tmp_path / "channels"))
    mean = run_probe(encoder_uri=encoder_checkpoint, train_data=[shards], data=[shards], labels=["MI"],
                     out=str(tmp_path / "mean"), features="mean")
    assert mean["probe_data"]["features"] == "mean (Encoder.embed)"
    assert mean["probe"]["MI"]["n"] == channels["probe"]["MI"]["n"] == 16
    with pytest.raises(UserError, match="--probe-features"):
        run_probe(encoder_uri=encoder_checkpoint, train_data=[shards], data=[shards], labels=["MI"],
                  out=str(tmp_path), features="max")


def test_run_probe_errors(shards, encoder_checkpoint, tmp_path) -> None:
    with pytest.raises(UserError, match="no windows in split 'val'"):
        run_probe(encoder_uri=encoder_checkpoint, train_data=[shards], data=[shards], labels=["MI"],
                  out=str(tmp_path), split="val")
    with pytest.raises(UserError, match="--labels"):
        run_probe(encoder_uri=encoder_checkpoint, train_data=[shards], data=[shards], labels=["XYZ"],
                  out=str(tmp_path))


def test_reconstruction_baseline_is_the_training_lead_mean(shards, encoder_checkpoint, tmp_path) -> None:
    result = run_reconstruction(encoder_uri=encoder_checkpoint, data=[shards], split="test", out=str(tmp_path))
    block = result["reconstruction"]
    assert json.loads((tmp_path / "metrics.json").read_text())["reconstruction"] == block
    avr = LEAD_INDEX["aVR"]
    train = torch.cat([b["ecg"][:, avr] for b in window_batches([shards], "train")]).double()
    test = torch.cat([b["ecg"][:, avr] for b in window_batches([shards], "test")]).double()
    expected = float((test - train.mean()).square().mean(dim=-1).mean())
    assert block["leads"]["aVR"]["mse_baseline"] == pytest.approx(expected, rel=1e-5)
    assert block["leads"]["aVR"]["n"] == 16 and block["overall"]["mse"] > 0
    with pytest.raises(UserError, match="records all of V1"):
        run_reconstruction(encoder_uri=encoder_checkpoint, data=[shards], split="test", out=str(tmp_path),
                           given=("V1",))
