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
from p2es_dist.evaluate.probe import LogisticProbe, auroc, run_probe, window_batches
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
    assert abs(float(probe.weight[0])) > 5 * float(probe.weight[1:].abs().max())
    proba = probe.predict_proba(x[test])
    assert ((proba > 0.5) == y[test].astype(bool)).mean() > 0.93  # Bayes accuracy ~0.977
    # The fit is the regularised optimum: the objective's gradient vanishes there.
    xs = (torch.as_tensor(x[train]) - probe.mean) / probe.std
    w, b = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    target = torch.as_tensor(y[train], dtype=torch.float64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, target)
    (loss + 0.5 * 1e-2 * w.square().sum()).backward()
    assert float(w.grad.abs().max()) < 1e-5 and abs(float(b.grad)) < 1e-5


# --- on real BIDMC windows, relabelled so the probe has two classes -------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 BIDMC windows of two subjects: even rows train, odd rows test; bidmc_01 labelled MI, bidmc_02 NORM."""
    table = bidmc_windows_table(32)
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
    # MI and NORM are complements here: the probes' scores mirror, so their AUROCs agree.
    assert metrics["probe"]["MI"]["auroc"] == pytest.approx(metrics["probe"]["NORM"]["auroc"], abs=0.05)
    recon = metrics["reconstruction"]
    assert recon["given"] == ["II"] and recon["n_windows"] == 16 and set(recon["leads"]) == {"aVR"}


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
