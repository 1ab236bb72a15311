"""Diagnostic value with known answers: the input-only floor, paired subject bootstraps, validation-only
thresholds, lead dropout and fd on classifier features. Tiny classifier, synthetic windows, no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p2es_dist.constants import LABELS, LEAD_INDEX, LEADS, N_LEADS, WINDOW
from p2es_dist.errors import UserError
from p2es_dist.evaluate import diagnostic, thresholds
from p2es_dist.evaluate.runner import EvalConfig, compute_reference, run_model, summarise
from p2es_dist.evaluate.windows import read_eval_windows
from p2es_dist.models.base import TranslationModel
from p2es_dist.models.classifier import ClassifierConfig, drop_leads
from p2es_dist.models.registry import build_model

TINY = {"name": "classifier", "stem_channels": 4, "stage_channels": [4, 8], "lead_dropout": 0.5}
N_SUBJECTS, PER_SUBJECT = 10, 3
VAL_SUBJECTS = range(6, 10)  # s6..s9 validation, s0..s5 test


def _table(n_subjects: int = N_SUBJECTS, per_subject: int = PER_SUBJECT):
    from p2es_dist.data.schema import build_table

    rng = np.random.default_rng(0)
    n = n_subjects * per_subject
    subject = [f"s{i // per_subject}" for i in range(n)]
    mi = np.array([(i // per_subject) % 2 == 1 for i in range(n)])
    t = np.arange(WINDOW) / 125.0
    ecg = 0.1 * rng.normal(size=(n, N_LEADS, WINDOW)) + np.sin(2 * np.pi * 1.2 * t)  # beats at 72 bpm
    ecg[mi, LEAD_INDEX["V2"]] += 0.5  # MI windows differ in one lead: not needed to be learnable, just different
    return build_table(source="synth", record=subject, subject_id=subject,
                       split=["val" if int(s[1:]) in VAL_SUBJECTS else "test" for s in subject],
                       start=np.arange(n) * WINDOW, ecg=ecg.astype(np.float32), ecg_mask=np.ones((n, N_LEADS), bool),
                       ppg=rng.normal(size=(n, WINDOW)).astype(np.float32), age=np.full(n, 50.0),
                       sex=np.zeros(n), labels=[["MI"] if m else ["NORM"] for m in mi], quality=np.ones(n))


def _write_shards(folder: Path, table: pa.Table) -> str:
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")
    (folder / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "source": "synth", "fs": 125, "window": WINDOW,
        "shards": [{"path": "part-00000.parquet", "rows": len(table), "sha256": ""}]}))
    return str(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return _write_shards(tmp_path_factory.mktemp("floor") / "shards", _table())


def tiny_classifier(seed: int = 0, *, blind_to_mask: bool = False):
    torch.manual_seed(seed)
    model = build_model(dict(TINY)).eval()
    if blind_to_mask:  # output depends on the zero-filled signal only, not on which leads are flagged present
        with torch.no_grad():
            model.head.weight[:, -N_LEADS:] = 0.0
    return model


class Recorded(TranslationModel):
    """A 'generator' that returns the recorded ECG."""

    name = "recorded_copy"

    def generate(self, batch, options=None):
        return batch["ecg"].float().clone()


class InputOnly(TranslationModel):
    """A 'generator' that returns its condition leads and zeros elsewhere: it adds nothing."""

    name = "input_copy"

    def generate(self, batch, options=None):
        keep = batch["cond_leads"].bool()[:, :, None]
        return torch.where(keep, batch["ecg"].float(), torch.zeros_like(batch["ecg"].float()))


def _loaded(model) -> SimpleNamespace:
    return SimpleNamespace(model=model, name=model.name, uri="memory", kind="checkpoint", digest="0")


def _evaluate(shards: str, generator, classifier, *, condition=("II",), thresholds_by_label=None) -> tuple:
    config = EvalConfig(data=[shards], split="test", batch_size=8, condition=list(condition), n_boot=200,
                        with_dtw=False, progress=False, thresholds=thresholds_by_label)
    table = read_eval_windows(config.data, split="test")
    reference = compute_reference(table, config, classifier=classifier)
    run = run_model("m", _loaded(generator), table, reference, config, classifier=classifier)
    return summarise(run, reference, config), reference, run


def test_recorded_generator_scores_exactly_as_recorded(shards):
    section, reference, run = _evaluate(shards, Recorded(), tiny_classifier(), thresholds_by_label={"MI": 0.5})
    diag = section["diagnostic"]
    assert np.array_equal(run.probabilities, reference.probabilities)
    assert set(diag["recorded"]) == {"NORM", "MI"} and diag["generated"] == diag["recorded"]
    for label in ("NORM", "MI"):
        same = diag["differences"][label]["generated_minus_recorded"]
        assert same["auroc"] == 0.0 and same["ci95"] == [0.0, 0.0]
        low, high = diag["recorded"][label]["auroc_ci95"]
        assert low <= diag["recorded"][label]["auroc"] <= high
    # The stored threshold is used where there is one; threshold-dependent figures are None elsewhere.
    assert diag["recorded"]["MI"]["threshold"] == 0.5 and diag["recorded"]["MI"]["sensitivity"] is not None
    assert diag["recorded"]["NORM"]["threshold"] is None and diag["recorded"]["NORM"]["f1"] is None
    assert diag["recorded"]["NORM"]["auprc"] is not None
    # fd on the classifier's features (no encoder): identical ECGs, identical features, distance 0.
    assert section["fd_features"] == "classifier" and section["fd"] == pytest.approx(0.0, abs=1e-3)
    assert section["fd_info"]["dim"] == 2 * TINY["stage_channels"][-1]


def test_input_copying_generator_scores_as_input_only(shards):
    blind = tiny_classifier(blind_to_mask=True)
    section, reference, run = _evaluate(shards, InputOnly(), blind)
    np.testing.assert_allclose(run.probabilities, reference.input_probabilities, rtol=0, atol=1e-6)
    diag = section["diagnostic"]
    for label in ("NORM", "MI"):
        assert diag["generated"][label]["auroc"] == pytest.approx(diag["input_only"][label]["auroc"], abs=1e-9)
        gain = diag["differences"][label]["generated_minus_input_only"]
        assert gain["auroc"] == pytest.approx(0.0, abs=1e-9) and diagnostic.verdict(gain) == "indistinguishable"
    # Input-only really is lead II alone: the same classifier on lead II (others zeroed) by hand.
    table = read_eval_windows([shards], split="test")
    from p2es_dist.data.loader import convert_block

    batch = convert_block(table)  # what the evaluation converts with (float16 signals)
    only_ii = np.zeros(batch["ecg"].shape, np.float32)
    only_ii[:, LEAD_INDEX["II"]] = batch["ecg"][:, LEAD_INDEX["II"]]
    mask = np.zeros((len(only_ii), N_LEADS), bool)
    mask[:, LEAD_INDEX["II"]] = True
    by_hand = diagnostic.classify(blind, only_ii.astype(np.float32), mask)
    np.testing.assert_allclose(reference.input_probabilities, by_hand, atol=1e-5)
    assert not np.allclose(reference.input_probabilities, reference.probabilities, atol=1e-4)


def test_ppg_model_input_only_is_the_chance_floor(shards):
    section, reference, _ = _evaluate(shards, Recorded(), tiny_classifier(), condition=())
    assert np.ptp(reference.input_probabilities, axis=0).max() == 0.0  # nothing unmasked: one constant
    for label in ("NORM", "MI"):
        assert section["diagnostic"]["input_only"][label]["auroc"] == 0.5


def test_paired_bootstrap_matches_the_probe_bootstrap_and_sklearn():
    from sklearn.metrics import roc_auc_score

    from p2es_dist.evaluate.probe import bootstrap_intervals

    rng = np.random.default_rng(3)
    y = rng.random(240) < 0.3
    subjects = np.repeat(np.arange(48), 5)
    a, b = np.round(rng.random(240) + 0.3 * y, 1), rng.random(240)  # rounded: ties count one half
    ours = diagnostic.paired_auroc_intervals({"generated": a, "input_only": b}, y, subjects, n_boot=150, seed=7)
    reference = bootstrap_intervals(a, b, y, subjects, resamples=150, seed=7)
    np.testing.assert_allclose(ours["generated"], reference["auroc_ci95"], atol=1e-12)
    np.testing.assert_allclose(ours["input_only"], reference["auroc_random_init_ci95"], atol=1e-12)
    np.testing.assert_allclose(ours["generated_minus_input_only"], reference["auroc_gain_ci95"], atol=1e-12)
    weights = rng.integers(0, 3, size=(4, 240)).astype(float)
    for row in weights:
        expected = roc_auc_score(np.repeat(y, row.astype(int)), np.repeat(a, row.astype(int)))
        assert diagnostic.weighted_auroc(a, y, row[None])[0] == pytest.approx(expected, abs=1e-12)
    one_subject = diagnostic.paired_auroc_intervals({"generated": a}, y, np.where(y, 0, subjects), n_boot=20)
    assert one_subject == {"generated": None}  # positives from one subject: no interval


def test_youden_threshold_hand_made():
    scores = np.array([0.1, 0.3, 0.35, 0.4, 0.6, 0.8, 0.9])
    targets = np.array([0, 0, 1, 0, 1, 1, 1], bool)
    # J = TPR - FPR at ">= t": 0.9 -> .25, 0.8 -> .5, 0.6 -> .75, 0.4 -> .417, 0.35 -> .667, 0.3 -> .333
    threshold, j = thresholds.youden_threshold(scores, targets)
    assert threshold == 0.6 and j == pytest.approx(0.75)
    assert thresholds.youden_threshold(scores, np.ones(7, bool)) is None
    labels = np.zeros((8, len(LABELS)))
    labels[:7, LABELS.index("MI")] = targets
    labels[:7, LABELS.index("NORM")] = ~targets
    probabilities = np.zeros((8, len(LABELS)))
    probabilities[:7, LABELS.index("MI")] = scores
    probabilities[7, LABELS.index("MI")] = 0.95  # unlabelled window: unknown, not negative, so it is left out
    fitted = thresholds.fit_thresholds(probabilities, labels)
    assert fitted["MI"] == {"threshold": 0.6, "youden_j": pytest.approx(0.75), "n_pos": 4, "n": 7}


def _save_classifier(folder: Path) -> str:
    from p2es_dist.models.checkpoint import save_checkpoint

    save_checkpoint(tiny_classifier(seed=1), TINY, folder)
    return str(folder)


def test_thresholds_come_from_validation_and_evaluate_uses_only_stored_ones(shards, tmp_path, capsys):
    from p2es_dist.evaluate.pipeline import run_evaluation
    from p2es_dist.jobs.thresholds import main as thresholds_main
    from p2es_dist.models.checkpoint import load_model, save_checkpoint

    clf = _save_classifier(tmp_path / "clf")
    model_dir = tmp_path / "dct"
    torch.manual_seed(0)
    dct = {"name": "dct", "in_coeffs": 16, "out_coeffs": 16}
    save_checkpoint(build_model(dct), dct, model_dir)
    with pytest.raises(UserError, match="give --data"):
        thresholds_main(["--classifier", clf])
    with pytest.raises(UserError, match="never on 'test'"):
        thresholds.fit_classifier_thresholds(clf, [shards], split="test")
    (tmp_path / "result.json").write_text(json.dumps({"checkpoint": clf, "config": {"data": {"uris": [shards]}}}))
    assert thresholds.run_data_uris(str(tmp_path)) == [shards]
    assert thresholds_main(["--classifier", clf, "--data", shards]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads((Path(clf) / thresholds.THRESHOLDS_FILE).read_text())
    assert printed["thresholds"].endswith(thresholds.THRESHOLDS_FILE) and stored["split"] == "val"
    assert stored["n_windows"] == len(VAL_SUBJECTS) * PER_SUBJECT and set(stored["labels"]) == {"NORM", "MI"}
    assert stored["classifier_digest"] == load_model(clf).digest
    # The same classifier's Youden thresholds on the evaluated (test) windows would be others.
    classifier = load_model(clf).model.eval()
    test_probabilities, test_labels, _ = thresholds.classifier_probabilities(classifier, [shards], split="test")
    on_test = thresholds.fit_thresholds(test_probabilities, test_labels)
    assert any(on_test[k]["threshold"] != stored["labels"][k]["threshold"] for k in stored["labels"])
    # A bundle of the classifier carries them, checksummed and keyed to the bundle's own weights.
    from p2es_dist.export.bundle import write_bundle
    from p2es_dist.models.checkpoint import read_sums

    write_bundle(clf, str(tmp_path / "bundle"), no_metrics=True, preprocessing_from_defaults=True)
    assert thresholds.THRESHOLDS_FILE in read_sums(str(tmp_path / "bundle"))
    in_bundle, _ = thresholds.load_thresholds(load_model(str(tmp_path / "bundle")))
    assert in_bundle is not None and in_bundle["labels"] == stored["labels"]

    def evaluate(out: str) -> dict:
        return run_evaluation(model_uri=str(model_dir), classifier_uri=clf, out=tmp_path / out, with_figures=False,
                              config=EvalConfig(data=[shards], split="test", n_boot=50, with_dtw=False,
                                                progress=False, condition=["II"]))

    doc = evaluate("eval")
    used = {k: v["threshold"] for k, v in stored["labels"].items()}
    assert doc["diagnostic_info"]["threshold"]["source"] == "validation"
    assert doc["diagnostic_info"]["threshold"]["values"] == used
    for variant in ("recorded", "generated", "input_only"):
        for label, row in doc["diagnostic"][variant].items():
            assert row["threshold"] == used[label] and row["sensitivity"] is not None
    assert "Youden's J on the classifier's validation windows" in (tmp_path / "eval" / "report.md").read_text()

    # Thresholds of other weights are refused; without stored ones only threshold-free figures remain.
    (Path(clf) / thresholds.THRESHOLDS_FILE).write_text(json.dumps({**stored, "classifier_digest": "other"}))
    assert evaluate("eval_other")["diagnostic_info"]["threshold"]["source"] is None
    (Path(clf) / thresholds.THRESHOLDS_FILE).unlink()
    doc = evaluate("eval_none")
    info = doc["diagnostic_info"]["threshold"]
    assert info["source"] is None and info["values"] == {} and "no thresholds.json" in info["note"]
    for row in doc["diagnostic"]["generated"].values():
        assert row["threshold"] is None and row["sensitivity"] is None and row["f1"] is None
        assert row["auroc"] is not None and row["auprc"] is not None
    report = (tmp_path / "eval_none" / "report.md").read_text()
    assert "No validation thresholds" in report and "input-only" in report
    # Stored thresholds fitted on the very split being evaluated are not used either.
    assert thresholds.split_conflict({"data": [shards], "split": "val"}, [shards], "val")
    assert thresholds.split_conflict({"data": [shards], "split": "val"}, [shards], "test") is None


def test_lead_dropout_changes_the_mask_in_training_only():
    recorded = torch.ones(4000, N_LEADS, dtype=torch.bool)
    dropped = drop_leads(recorded, 1.0, generator=torch.Generator().manual_seed(0))
    assert (dropped & ~recorded).sum() == 0 and dropped.any(dim=1).all()
    subsets = {tuple(LEADS[j] for j in np.nonzero(row)[0]) for row in dropped.numpy()}
    for subset in (("II",), ("I", "II"), ("II", "V1", "V5")):
        assert subset in subsets
        share = (dropped == torch.tensor([lead in subset for lead in LEADS])).all(dim=1).float().mean().item()
        assert 0.15 < share < 0.3, (subset, share)
    single = (dropped.sum(dim=1) == 1).float().mean().item()
    assert 0.35 < single < 0.45  # fixed {II} (1/5) plus one random lead (1/5)
    assert len({row.nonzero()[0].item() for row in dropped if row.sum() == 1}) == N_LEADS  # every lead alone
    half = drop_leads(recorded, 0.5, generator=torch.Generator().manual_seed(1))
    assert 0.45 < (half == recorded).all(dim=1).float().mean().item() < 0.55
    bidmc = torch.zeros(500, N_LEADS, dtype=torch.bool)
    bidmc[:, [LEAD_INDEX["II"], LEAD_INDEX["aVR"]]] = True
    reduced = drop_leads(bidmc, 1.0, generator=torch.Generator().manual_seed(2))
    assert (reduced & ~bidmc).sum() == 0 and reduced.any(dim=1).all() and not torch.equal(reduced, bidmc)

    model = build_model({**TINY, "lead_dropout": 1.0})
    seen: list[torch.Tensor] = []
    forward = model.forward
    model.forward = lambda ecg, mask: (seen.append(mask.clone()), forward(ecg, mask))[1]
    labels = torch.zeros(16, len(LABELS))
    labels[:, 0] = 1.0
    batch = {"ecg": torch.randn(16, N_LEADS, WINDOW), "ecg_mask": torch.ones(16, N_LEADS, dtype=torch.bool),
             "labels": labels}
    torch.manual_seed(0)
    model.train().loss(batch)
    assert not torch.equal(seen[-1], batch["ecg_mask"]) and (seen[-1].sum(dim=1) < N_LEADS).all()
    model.eval().loss(batch)
    assert torch.equal(seen[-1], batch["ecg_mask"])
    with pytest.raises(ValueError, match="lead_dropout"):
        ClassifierConfig(lead_dropout=1.5)


def test_train_hook_fits_thresholds_and_survives_data_without_validation(shards, tmp_path, capsys):
    from p2es_dist.jobs.train import classifier_thresholds

    clf = _save_classifier(tmp_path / "clf")
    written = classifier_thresholds(clf, [shards])
    assert written == str(Path(clf) / thresholds.THRESHOLDS_FILE) and Path(written).exists()
    table = _table(2, 2)
    no_val = _write_shards(tmp_path / "no_val", table.set_column(
        table.schema.get_field_index("split"), "split", pa.array(["train"] * len(table))))
    other = _save_classifier(tmp_path / "clf2")
    assert classifier_thresholds(other, [no_val]) is None  # the trained run is kept, the user is told
    assert "no windows in split 'val'" in capsys.readouterr().err
    assert not (Path(other) / thresholds.THRESHOLDS_FILE).exists()
