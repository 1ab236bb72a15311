"""`p2es calibrate` and `p2es translate --calibration` on a real paired record (CinC 2015 a103l)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_data

from p2es_dist.data.calibration import CalibrationProfile
from p2es_dist.errors import UserError
from p2es_dist.models import build_model
from p2es_dist.models.checkpoint import save_checkpoint

TINY_P2ES = {"name": "p2es", "timesteps": 20, "hidden_channels": 16, "embed_dim": 32, "dilation_depth": 2,
             "cascades": 1, "affinity": False, "sample_steps": 4, "ppg_dilations": [1, 4, 16, 32],
             "use_template": True, "template_residual": True}


@pytest.fixture(scope="module")
def a103l() -> Path:
    return require_data("wfdb_samples", "a103l.hea").with_suffix("")


@pytest.fixture(scope="module")
def profile_path(a103l, tmp_path_factory) -> Path:
    from p2es_dist.jobs.calibrate import main

    path = tmp_path_factory.mktemp("calibrate") / "a103l.json"
    assert main(["--input", str(a103l), "--seconds", "60", "--out", str(path)]) == 0
    return path


def test_calibrate_writes_a_readable_profile(profile_path: Path) -> None:
    data = json.loads(profile_path.read_text())
    assert data["format"] == "p2es-calibration" and data["version"] == 1
    assert set(data["beat"]) == {"II"}  # a103l: II, V (no chest position), PLETH
    # The ICU monitor's PLETH lags: ~1 s from R-peak to upstroke, steady (IQR of a few samples).
    assert 0.8 < data["pat_s"] < 1.2 and data["pat_iqr_s"] < 0.05
    assert data["n_beats"] >= 60 and data["extra"] == {"start_s": 0.0, "end_s": 60.0}
    beat = np.asarray(data["beat"]["II"])
    assert np.argmax(np.abs(beat)) == pytest.approx(38, abs=3)  # the QRS sits at the R-peak sample


def test_calibrate_refuses_records_without_ppg_or_too_short(tmp_path: Path) -> None:
    from p2es_dist.translate.calibrate import calibrate, read_paired

    with pytest.raises(UserError, match="no PPG channel"):
        read_paired(require_data("wfdb_samples", "100.hea").with_suffix(""))
    paired = read_paired(require_data("wfdb_samples", "a103l.hea").with_suffix(""))
    with pytest.raises(UserError, match="need"):
        calibrate(paired, seconds=400.0)


def _tiny_checkpoint(folder: Path) -> str:
    torch.manual_seed(0)
    model = build_model(TINY_P2ES)
    save_checkpoint(model, TINY_P2ES, folder)
    return str(folder)


def test_translate_with_calibration_places_the_patients_qrs(a103l: Path, profile_path: Path, tmp_path: Path):
    """An untrained residual model answers with the template: calibrated, its lead II follows the
    recorded one after the calibration segment; zero-shot it has nothing to place beats with."""
    from p2es_dist.translate.run import translate_file

    model = _tiny_checkpoint(tmp_path / "model")
    calibrated = translate_file(model=model, input=str(a103l), out=str(tmp_path / "cal"),
                                calibration=str(profile_path), png=str(tmp_path / "cal.png"))
    zero_shot = translate_file(model=model, input=str(a103l), out=str(tmp_path / "zs"), score_from_s=60.0)
    assert calibrated["calibration"]["template_used"] and calibrated["calibration"]["leads"] == ["II"]
    assert calibrated["recorded"]["scored"] == "after the calibration segment"
    assert calibrated["recorded"]["from_s"] == 60.0 and zero_shot["recorded"]["from_s"] == 60.0
    assert calibrated["recorded"]["pearson"] > 0.35  # the template alone; the record ends in an alarm
    # Zero-shot, the untrained model's correction is zero and there is no template: a flat lead, no Pearson.
    assert zero_shot["recorded"]["pearson"] is None
    assert calibrated["units"].startswith("mV (scaled to the calibration beat)")
    assert (tmp_path / "cal.png").stat().st_size > 10_000
    header = (tmp_path / "cal.hea").read_text()
    assert "Calibration:" in header and "PAT" in header


def test_profile_from_another_record_is_scored_on_the_whole_input(profile_path: Path, tmp_path: Path):
    from p2es_dist.translate.recorded import calibration_end_s

    profile = CalibrationProfile.load(profile_path)
    assert calibration_end_s(profile, str(tmp_path / "other")) is None
    assert calibration_end_s(profile, profile.source) == 60.0
