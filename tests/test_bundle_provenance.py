"""A bundle states the preprocessing and labels of the data its model was trained on (the training folders'
manifest.json and shards), and `p2es translate` applies that preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_export import TINY_LI2021, save_checkpoint, shard_folder, trained_checkpoint

from p2es_dist.cli import main as cli_main
from p2es_dist.constants import LABELS
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.errors import UserError
from p2es_dist.export.bundle import write_bundle
from p2es_dist.models.checkpoint import load_model
from p2es_dist.translate.run import preprocess_config, translate_file

# Ingested otherwise than ingest's defaults (0.5-8 Hz, order 3, 0.5 s), so a bundle stating defaults is caught.
PPG_SETTINGS = {"ppg_band_hz": (0.7, 6.0), "filter_order": 4, "max_gap_s": 0.25}


@pytest.fixture
def paired_and_ecg_only(tmp_path: Path) -> list[str]:
    paired = shard_folder(tmp_path / "bidmc", source="bidmc", labels=[["MI"], ["MI", "NORM"], [], ["AF"]],
                          splits=["train", "train", "train", "val"], **PPG_SETTINGS)
    # ECG-only: its (default) PPG band never filtered any PPG, so it does not disagree with the paired folder's.
    ecg_only = shard_folder(tmp_path / "ptbxl", source="ptbxl", labels=[["LBBB"], ["PACE"]],
                            splits=["train", "test"], ppg=False, filter_order=4, max_gap_s=0.25)
    return [paired, ecg_only]


def test_bundle_states_the_training_preprocessing_and_translate_applies_it(
        tmp_path: Path, paired_and_ecg_only: list[str]) -> None:
    run = trained_checkpoint(tmp_path / "train_out", TINY_LI2021, uris=paired_and_ecg_only)
    summary = write_bundle(str(run), str(tmp_path / "bundle"), no_metrics=True)
    metadata = load_model(str(tmp_path / "bundle")).metadata
    stated = metadata["preprocessing"]
    assert stated["ppg_band_hz"] == [0.7, 6.0] and stated["filter_order"] == 4 and stated["max_gap_s"] == 0.25
    assert summary["preprocessing_from"] == stated["from"] == "training data manifests"
    assert stated["fs"] == 125 and stated["window"] == 1024 and stated["ecg_scale_mv"] == 1.0
    config = preprocess_config(metadata)
    assert (config.ppg_band_hz, config.filter_order, config.max_gap_s) == ((0.7, 6.0), 4, 0.25)
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "band-pass 0.7-6 Hz (Butterworth order 4" in card and "each folder's manifest.json" in card

    # translate refuses a 0.4 s gap: over the training data's 0.25 s limit, though under ingest's default 0.5 s.
    values = np.sin(2 * np.pi * 1.2 * np.arange(3000) / 125.0)
    values[1000:1050] = np.nan
    csv = tmp_path / "in.csv"
    pd.DataFrame({"ppg": values}).to_csv(csv, index=False)
    with pytest.raises(UserError, match="longer than the 0.25 s interpolation limit"):
        translate_file(model=str(tmp_path / "bundle"), input=str(csv), out=str(tmp_path / "rec"), fs=125.0)


def test_bundle_records_the_labels_of_the_training_split(tmp_path: Path, paired_and_ecg_only: list[str]) -> None:
    run = trained_checkpoint(tmp_path / "train_out", TINY_LI2021, uris=paired_and_ecg_only)
    write_bundle(str(run), str(tmp_path / "bundle"), no_metrics=True)
    labels = json.loads((tmp_path / "bundle" / "config.json").read_text())["labels"]
    assert labels["vocabulary"] == list(LABELS)
    # Train windows only (AF is in val, PACE in test), in the vocabulary's order.
    assert labels["train_windows"] == {"NORM": 1, "MI": 2, "LBBB": 1}
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "## Diagnostic labels" in card and "| MI | 2 |" in card and "| LBBB | 1 |" in card
    assert "NORM, MI, STTC" in card


def test_folders_ingested_with_other_bands_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    first = shard_folder(tmp_path / "bidmc", source="bidmc", labels=[[]], splits=["train"], **PPG_SETTINGS)
    second = shard_folder(tmp_path / "cinc", source="cinc", labels=[[]], splits=["train"], filter_order=4,
                          max_gap_s=0.25)  # the default 0.5-8 Hz PPG band
    run = trained_checkpoint(tmp_path / "train_out", TINY_LI2021, uris=[first, second])
    with pytest.raises(UserError, match=r"disagree on ppg_band_hz") as error:
        write_bundle(str(run), str(tmp_path / "bundle"), no_metrics=True)
    message = str(error.value)
    assert "\n" not in message and f"{first}: [0.7, 6.0]" in message and f"{second}: [0.5, 8.0]" in message
    assert not (tmp_path / "bundle").exists()
    # The fallback is for unreadable data, never for data that disagrees; the CLI says it on one line.
    assert cli_main(["export", "--checkpoint", str(run), "--no-metrics", "--preprocessing-from-defaults",
                     "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "disagree on ppg_band_hz" in err and err.strip().count("\n") == 0


def test_unknown_or_unreachable_training_data_is_refused_unless_defaults_are_asked(tmp_path: Path) -> None:
    bare = save_checkpoint(tmp_path / "bare", TINY_LI2021)  # no result.json: the training data is unknown
    with pytest.raises(UserError, match="--train-result.*--preprocessing-from-defaults"):
        write_bundle(str(bare), str(tmp_path / "bundle"), no_metrics=True)
    gone = trained_checkpoint(tmp_path / "train_out", TINY_LI2021, uris=[str(tmp_path / "moved_away")])
    with pytest.raises(UserError, match="moved_away: no manifest.json there"):
        write_bundle(str(gone), str(tmp_path / "bundle"), no_metrics=True)
    assert not (tmp_path / "bundle").exists()

    summary = write_bundle(str(bare), str(tmp_path / "bundle"), no_metrics=True, preprocessing_from_defaults=True)
    assert summary["preprocessing_from"].startswith("ingest defaults")
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    defaults = PreprocessConfig()
    assert config["preprocessing"]["ppg_band_hz"] == list(defaults.ppg_band_hz)
    assert config["labels"]["train_windows"] is None and "unknown" in config["labels"]["note"]
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "**Not read from the training data" in card


def test_unreadable_shards_keep_the_manifests_preprocessing_with_the_fallback(tmp_path: Path) -> None:
    broken = shard_folder(tmp_path / "bidmc", source="bidmc", labels=[["MI"]], **PPG_SETTINGS)
    (Path(broken) / "part-00000.parquet").unlink()  # the manifest still lists it
    run = trained_checkpoint(tmp_path / "train_out", TINY_LI2021, uris=[broken])
    with pytest.raises(UserError, match="training data shards.*--preprocessing-from-defaults"):
        write_bundle(str(run), str(tmp_path / "bundle"), no_metrics=True)
    write_bundle(str(run), str(tmp_path / "bundle"), no_metrics=True, preprocessing_from_defaults=True)
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["preprocessing"]["ppg_band_hz"] == [0.7, 6.0]  # the readable manifest still wins
    assert config["labels"]["train_windows"] is None and "shards could not be read" in config["labels"]["note"]
    assert "Labels in the training data: unknown" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
