"""`p2es export`: bundle layout, round trip through load_pretrained, tamper detection, mobile files, card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2es_dist.cli import main as cli_main
from p2es_dist.errors import UserError
from p2es_dist.export.bundle import write_bundle
from p2es_dist.models.base import GenerationOptions
from p2es_dist.models.checkpoint import load_model, load_pretrained, read_sums, sha256_bytes
from p2es_dist.translate.run import make_batch

TINY_LI2021 = {"name": "li2021", "condition_on_leads": False, "channels": 8, "c1_channels": 4, "diagnosis": False,
               "attention_hidden": 4}
TINY_STUDENT = {"name": "student", "channels": 8, "c1_channels": 4, "attention_hidden": 4}


def save_checkpoint(folder: Path, model_section: dict, *, seed: int = 0) -> Path:
    """A checkpoint as `p2es train` leaves it (model.safetensors + model.json), random non-zero weights."""
    from p2es_dist.models.checkpoint import save_checkpoint as write_checkpoint
    from p2es_dist.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(model_section)
    with torch.no_grad():  # output layers start at zero; random weights make every comparison meaningful
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    write_checkpoint(model, model_section, folder)
    return folder


def shard_folder(folder: Path, *, source: str, labels: list[list[str]] | None = None,
                 splits: list[str] | None = None, ppg: bool = True, **preprocess) -> str:
    """A shard folder as `p2es ingest` leaves it (one parquet shard, a manifest.json with ingest.write_manifest's
    keys), without running an ingest; `preprocess`: PreprocessConfig fields other than the defaults."""
    import pyarrow.parquet as pq

    from p2es_dist.config import to_dict
    from p2es_dist.data.preprocess import PreprocessConfig
    from p2es_dist.data.schema import build_table

    labels = [[]] if labels is None else labels
    n = len(labels)
    folder.mkdir(parents=True)
    table = build_table(source=source, record=[f"r{i}" for i in range(n)], subject_id=[f"s{i}" for i in range(n)],
                        split=splits or ["train"] * n, start=np.zeros(n), ecg=np.zeros((n, 12, 1024)),
                        ecg_mask=np.ones((n, 12), bool), ppg=np.zeros((n, 1024)) if ppg else None,
                        age=np.full(n, np.nan), sex=np.full(n, -1), labels=labels, quality=np.ones(n))
    pq.write_table(table, folder / "part-00000.parquet")
    config = PreprocessConfig(**preprocess)
    manifest = {"schema_version": 2, "source": source, "fs": 125, "window": 1024, "hop": config.hop,
                "units": {"ecg": "mV", "ppg": "NU" if ppg else None},
                "shards": [{"path": "part-00000.parquet", "rows": n, "sha256": ""}],
                "config": {"preprocess": to_dict(config), "ingest": {}, "input": {}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def trained_checkpoint(out: Path, model_section: dict, *, uris: list[str] | None = None, seed: int = 0) -> Path:
    """A job's --out folder as `p2es train` leaves it: the checkpoint, and result.json naming the training
    data (`uris`; by default one shard folder ingested with ingest's defaults, made beside `out`)."""
    if uris is None:
        uris = [shard_folder(out.with_name(f"{out.name}_data"), source="bidmc")]
    checkpoint = save_checkpoint(out / "ckpt", model_section, seed=seed)
    (out / "result.json").write_text(json.dumps({"checkpoint": str(checkpoint),
                                                 "config": {"data": {"uris": uris}, "model": model_section}}))
    return out


def ppg_batch(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    ppg = np.sin(np.linspace(0, 60, 1024))[None] + 0.3 * rng.standard_normal((n, 1024))
    return make_batch(np.clip(ppg, -1, 1), age=None, sex=-1)


def metrics_fixture(path: Path) -> Path:
    """A metrics.json in `p2es_dist/schemas/metrics.schema.json`'s layout, with distinctive numbers to find on
    the card."""
    row = {"mse": 0.0123, "mae": 0.0456, "rmse": 0.111, "rrmse": 0.789, "pearson": 0.6543, "dtw": 0.0321, "n": 40}
    metrics = {
        "model": {"name": "li2021", "params": 4788, "bytes": 19152},
        "data": {"uri": "s3://p2es/bidmc", "n_windows": 40, "n_subjects": 5, "split": "test"},
        "spaces": {"window": {"leads": {"II": row}, "overall": row},
                   "minmax": {"leads": {"II": {**row, "pearson": 0.6011}}, "overall": {**row, "pearson": 0.6011}}},
        "hr_mae_bpm": 7.25, "fd": 3.5,
        "diagnostic": {"recorded": {"MI": {"sensitivity": 0.5, "specificity": 0.9, "precision": 0.4, "f1": 0.44,
                                           "auroc": 0.812}},
                       "generated": {"MI": {"sensitivity": 0.3, "specificity": 0.8, "precision": 0.2, "f1": 0.24,
                                            "auroc": 0.634}}},
        "generation": {"sampler": "ddim", "steps": 4, "seed": 0, "n_samples": 1},
    }
    path.write_text(json.dumps(metrics))
    return path


@pytest.fixture
def li2021_checkpoint(tmp_path: Path) -> Path:
    return trained_checkpoint(tmp_path / "ckpt", TINY_LI2021)


def test_round_trip_gives_identical_outputs(tmp_path: Path, li2021_checkpoint: Path) -> None:
    metrics = metrics_fixture(tmp_path / "metrics.json")
    summary = write_bundle(str(li2021_checkpoint), str(tmp_path / "bundle"), metrics=str(metrics))
    assert summary["kind"] == "baseline" and summary["evaluated"]
    original = load_model(str(li2021_checkpoint)).model
    published = load_pretrained(tmp_path / "bundle")
    batch = ppg_batch()
    expected, actual = original.generate(batch), published.generate(batch)
    assert expected.abs().max() > 0.01  # a non-trivial output, so equality means something
    assert torch.equal(expected, actual)
    # Baselines publish without mobile files; metrics.json is the evaluation's file, byte for byte.
    names = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "metrics.json", "model.safetensors"]
    assert (tmp_path / "bundle" / "metrics.json").read_bytes() == metrics.read_bytes()
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["format"] == "p2es-dist-bundle" and config["model"] == TINY_LI2021
    assert config["preprocessing"]["leads"][:3] == ["I", "II", "III"] and config["preprocessing"]["fs"] == 125
    assert "generation" not in config  # a deterministic regressor has no sampler settings
    # No staging folder is left beside the bundle.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sums_list_every_file_and_match(tmp_path: Path, li2021_checkpoint: Path) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(str(li2021_checkpoint), str(bundle), no_metrics=True)
    sums = read_sums(str(bundle))
    assert set(sums) == {p.name for p in bundle.iterdir()} - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert sha256_bytes((bundle / name).read_bytes()) == digest
    lines = (bundle / "SHA256SUMS").read_text().splitlines()
    assert all(len(line.split("  ")[0]) == 64 for line in lines)  # `sha256sum -c` format


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_tampered_file_fails_clearly(tmp_path: Path, li2021_checkpoint: Path, victim: str) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(str(li2021_checkpoint), str(bundle), no_metrics=True)
    data = bytearray((bundle / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / victim).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{victim}: sha256 does not match SHA256SUMS"):
        load_pretrained(bundle)


def test_missing_listed_file_fails(tmp_path: Path, li2021_checkpoint: Path) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(str(li2021_checkpoint), str(bundle), no_metrics=True)
    (bundle / "MODEL_CARD.md").unlink()
    with pytest.raises(UserError, match="MODEL_CARD.md: listed in SHA256SUMS but missing"):
        load_pretrained(bundle)


def test_student_bundle_has_verified_onnx_and_torchscript(tmp_path: Path) -> None:
    import onnxruntime as ort

    checkpoint = trained_checkpoint(tmp_path / "ckpt", TINY_STUDENT)
    summary = write_bundle(str(checkpoint), str(tmp_path / "bundle"), no_metrics=True)
    assert summary["kind"] == "student"  # from the model's registered name
    bundle = tmp_path / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    for name in ("onnx", "torchscript"):
        assert config["mobile"][name]["max_abs_diff"] <= 1e-4
    assert {"model.onnx", "model.pt"} <= set(read_sums(str(bundle)))
    # Check the files independently, on other windows and another batch size than export used.
    model = load_pretrained(bundle)
    batch = ppg_batch(n=5, seed=7)
    expected = model.generate(batch).numpy()
    assert np.abs(expected).max() > 0.01
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"ppg": batch["ppg"].numpy()})[0]
    scripted = torch.jit.load(str(bundle / "model.pt"))
    with torch.no_grad():
        script_out = scripted(batch["ppg"]).numpy()
    assert onnx_out.shape == script_out.shape == (5, 12, 1024)
    assert np.abs(onnx_out - expected).max() <= 1e-4
    assert np.abs(script_out - expected).max() <= 1e-4


def test_generic_ppg_model_exports_as_student(tmp_path: Path, li2021_checkpoint: Path) -> None:
    """--kind student on a model without forward_ppg goes through the Batch-building wrapper."""
    summary = write_bundle(str(li2021_checkpoint), str(tmp_path / "bundle"), no_metrics=True, kind="student")
    assert summary["onnx_max_abs_diff"] <= 1e-4 and summary["torchscript_max_abs_diff"] <= 1e-4


def test_model_card_has_metrics_and_licences(tmp_path: Path, li2021_checkpoint: Path) -> None:
    shards = shard_folder(tmp_path / "shards_a", source="bidmc")  # its manifest names its source
    # No manifest `source` here: the folder's name tells (ECG-only, so its PPG band is not compared).
    ptbxl = shard_folder(tmp_path / "ptbxl", source="", ppg=False)
    train_result = tmp_path / "result.json"
    train_result.write_text(json.dumps({"checkpoint": str(li2021_checkpoint),
                                        "config": {"data": {"uris": [shards, ptbxl]}}}))
    metrics = metrics_fixture(tmp_path / "metrics.json")
    write_bundle(str(li2021_checkpoint), str(tmp_path / "bundle"), metrics=str(metrics),
                 train_result=str(train_result))
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    for text in ("ODC-By 1.0", "CC BY 4.0", "s3://p2es/bidmc", "**test**", "0.6543", "0.6011", "7.25", "0.812",
                 "0.634", "Not a medical device", "II, aVR", "sampler ddim"):
        assert text in card, text
    assert "not evaluated" not in card
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert [row["source"] for row in config["training_data"]] == ["bidmc", "ptbxl"]


def test_training_data_found_beside_a_job_out_folder(tmp_path: Path, li2021_checkpoint: Path) -> None:
    job_out = tmp_path / "train_out"
    job_out.mkdir()
    synthetic = shard_folder(tmp_path / "synthetic", source="synthetic")
    (job_out / "result.json").write_text(json.dumps({"checkpoint": str(li2021_checkpoint / "ckpt"),
                                                     "config": {"data": {"uris": [synthetic]}}}))
    write_bundle(str(job_out), str(tmp_path / "bundle"), no_metrics=True)
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert f"`{synthetic}`" in card and "generated by p2es-dist" in card


def test_metrics_required_unless_no_metrics(tmp_path: Path, li2021_checkpoint: Path) -> None:
    with pytest.raises(UserError, match="--no-metrics"):
        write_bundle(str(li2021_checkpoint), str(tmp_path / "bundle"))
    assert not (tmp_path / "bundle").exists()
    write_bundle(str(li2021_checkpoint), str(tmp_path / "bundle"), no_metrics=True)
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "**This model was not evaluated" in card
    assert json.loads((tmp_path / "bundle" / "metrics.json").read_text()) == {"evaluated": False}


def test_existing_bundle_needs_overwrite(tmp_path: Path, li2021_checkpoint: Path) -> None:
    bundle = tmp_path / "bundle"
    write_bundle(str(li2021_checkpoint), str(bundle), no_metrics=True)
    with pytest.raises(UserError, match="--overwrite"):
        write_bundle(str(li2021_checkpoint), str(bundle), no_metrics=True)
    other = trained_checkpoint(tmp_path / "other", TINY_LI2021, seed=1)
    write_bundle(str(other), str(bundle), no_metrics=True, overwrite=True)
    assert load_model(str(bundle)).metadata["source_checkpoint"] == str(other / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "ckpt", "ckpt_data", "other", "other_data"]


def test_teacher_bundle_records_generation_and_reproduces(tmp_path: Path) -> None:
    from p2es_dist.config import load_config

    checkpoint = trained_checkpoint(tmp_path / "ckpt", load_config("smoke")["model"])
    metrics = metrics_fixture(tmp_path / "metrics.json")
    summary = write_bundle(str(checkpoint), str(tmp_path / "bundle"), metrics=str(metrics))
    assert summary["kind"] == "teacher"
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["generation"] == {"sampler": "ddim", "steps": 4, "seed": 0, "n_samples": 1}  # the evaluation's
    batch = ppg_batch(n=2)
    original, published = load_model(str(checkpoint)).model, load_pretrained(tmp_path / "bundle")
    assert torch.equal(original.generate(batch, GenerationOptions(seed=3, steps=2)),
                       published.generate(batch, GenerationOptions(seed=3, steps=2)))


def test_cli_export_and_errors(tmp_path: Path, li2021_checkpoint: Path, capsys) -> None:
    metrics = metrics_fixture(tmp_path / "metrics.json")
    code = cli_main(["export", "--checkpoint", str(li2021_checkpoint), "--metrics", str(metrics),
                     "--out", str(tmp_path / "bundle")])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "baseline"
    assert cli_main(["export", "--checkpoint", str(li2021_checkpoint), "--out", str(tmp_path / "b2")]) == 2
    assert "--no-metrics" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--no-metrics",
                     "--out", str(tmp_path / "b3")]) == 2
    assert "no model.safetensors there" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli_main(["export", "--checkpoint", str(li2021_checkpoint), "--metrics", str(bad),
                     "--out", str(tmp_path / "b4")]) == 2
    assert "expected the metrics.json of `p2es evaluate`" in capsys.readouterr().err


@pytest.mark.s3
def test_export_to_s3_and_load_back(tmp_path: Path, li2021_checkpoint: Path, s3_bucket: str) -> None:
    """No rename on S3: files go up with SHA256SUMS last, and the bundle loads from there."""
    bundle = f"{s3_bucket}/bundles/tiny"
    write_bundle(str(li2021_checkpoint), bundle, no_metrics=True)
    batch = ppg_batch()
    expected = load_model(str(li2021_checkpoint)).model.generate(batch)
    assert torch.equal(load_pretrained(bundle).generate(batch), expected)
    with pytest.raises(UserError, match="--overwrite"):
        write_bundle(str(li2021_checkpoint), bundle, no_metrics=True)


def test_encoder_bundle_carries_its_probe_evaluation(tmp_path: Path) -> None:
    checkpoint = trained_checkpoint(tmp_path / "encoder", {"name": "encoder", "size": "tiny"})
    probe = {"probe": {"MI": {"auroc": 0.6146, "auroc_random_init": 0.5799, "n": 44, "n_pos": 8,
                              "auroc_ci95": [0.3651, 0.8474], "auroc_gain_ci95": [-0.0571, 0.3529],
                              "cv_auroc": 0.7826},
                       "NORM": {"auroc": 0.7906, "auroc_random_init": 0.6175, "n": 44, "n_pos": 26}},
             "probe_data": {"train": {"uri": ["s3://p2es/ptbxl"], "split": "train", "n_windows": 456},
                            "eval": {"uri": ["s3://p2es/ptbxl"], "split": "test", "n_windows": 44},
                            "classifier": "L2 logistic regression on standardised embed features"},
             "reconstruction": {"given": ["II"], "split": "test", "n_windows": 44, "space": "window",
                                "metric": "mse on recorded leads that were not given", "baseline": "per-lead mean",
                                "leads": {"I": {"mse": 0.0061, "mse_baseline": 0.0063, "n": 44}},
                                "overall": {"mse": 0.01114, "mse_baseline": 0.01151}}}
    (tmp_path / "metrics.json").write_text(json.dumps(probe))
    summary = write_bundle(str(checkpoint), str(tmp_path / "bundle"), metrics=str(tmp_path / "metrics.json"))
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["kind"] == "encoder" and "model.onnx" not in summary.get("files", [])
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    for text in ("evaluate --probe", "**test**", "0.6146", "0.5799", "0.7906", "0.01114", "0.01151",
                 "0.6146 [0.3651, 0.8474]", "[-0.0571, 0.3529]", "0.7826"):
        assert text in card, text
    loaded = load_pretrained(str(tmp_path / "bundle"))
    assert loaded.__class__.__name__ == "Encoder"
    (tmp_path / "bad.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(UserError, match="'probe' for an encoder"):
        write_bundle(str(checkpoint), str(tmp_path / "bundle2"), metrics=str(tmp_path / "bad.json"))
