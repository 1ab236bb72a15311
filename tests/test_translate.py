"""`p2es translate`: windowing/overlap-add invariants, WFDB and CSV inputs end to end, clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from test_export import TINY_LI2021, save_checkpoint

from p2es_dist.cli import main as cli_main
from p2es_dist.constants import LEADS
from p2es_dist.errors import UserError
from p2es_dist.translate.run import TranslateConfig, repair_gaps, translate_file
from p2es_dist.translate.stitch import cut_windows, overlap_add, overlap_weights, window_starts

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
A103L = DATA_ROOT / "wfdb_samples" / "a103l"
BIDMC_01 = DATA_ROOT / "bidmc" / "bidmc_csv" / "bidmc_01_Signals.csv.gz"
needs_a103l = pytest.mark.skipif(not Path(f"{A103L}.hea").exists(), reason=f"{A103L}.hea not found (../shared/data)")
needs_bidmc = pytest.mark.skipif(not BIDMC_01.exists(), reason=f"{BIDMC_01} not found (../shared/data)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "ckpt", TINY_LI2021)


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> Path:
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def pulses(n: int, fs: float, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / fs
    return np.sin(2 * np.pi * 1.2 * t) + 0.1 * np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize(("n", "hop"), [(1024, 512), (1500, 512), (5000, 512), (5000, 300), (4096, 1024), (3001, 1)])
def test_overlap_weights_sum_to_one_and_constant_survives(n: int, hop: int) -> None:
    starts = window_starts(n, 1024, hop)
    assert starts[0] == 0 and starts[-1] + 1024 == n  # the whole signal is covered, the end included
    weights = overlap_weights(starts, 1024, n)
    total = np.zeros(n)
    for weight, start in zip(weights, starts, strict=True):
        total[start:start + 1024] += weight
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    windows = np.full((len(starts), 12, 1024), 0.37)
    np.testing.assert_allclose(overlap_add(windows, starts, n), 0.37, rtol=0, atol=1e-12)


def test_stitching_cut_windows_gives_back_the_signal() -> None:
    signal = np.random.default_rng(0).standard_normal((12, 4321))
    starts = window_starts(4321, 1024, 400)
    windows = cut_windows(signal, starts, 1024)
    assert windows.shape == (len(starts), 12, 1024)
    np.testing.assert_allclose(overlap_add(windows, starts, 4321), signal, rtol=0, atol=1e-12)


def test_window_starts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shorter than one window"):
        window_starts(1000, 1024, 512)
    with pytest.raises(ValueError, match="hop"):
        window_starts(5000, 1024, 2000)


def test_repair_gaps_interpolates_short_runs_and_names_long_ones() -> None:
    x = np.arange(1000, dtype=float)
    x[100:110] = np.nan  # 0.08 s at 125 Hz: interpolated
    np.testing.assert_allclose(repair_gaps(x, 125.0, max_gap_s=0.5, source="f"), np.arange(1000))
    x[500:700] = np.nan  # 1.6 s: too long
    with pytest.raises(UserError, match=r"1 NaN gap.*0.5 s interpolation limit, at 4.00-5.60 s"):
        repair_gaps(x, 125.0, max_gap_s=0.5, source="f")


def read_output(prefix: Path) -> wfdb.Record:
    record = wfdb.rdrecord(str(prefix))
    assert record.sig_name == list(LEADS) and record.units == ["mV"] * 12 and record.fs == 125
    assert np.all(np.isfinite(record.p_signal))
    return record


@needs_a103l
def test_translate_wfdb_record_250hz(tmp_path: Path, checkpoint: Path, capsys) -> None:
    code = cli_main(["translate", "--model", str(checkpoint), "--input", f"{A103L}.hea",
                     "--out", str(tmp_path / "out" / "a103l_ecg"), "--sex", "M", "--age", "61"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["channel"] == "PLETH" and summary["input_fs"] == 250.0
    record = read_output(tmp_path / "out" / "a103l_ecg")
    header = wfdb.rdheader(str(A103L))
    assert record.sig_len == header.sig_len * 125 // 250 == 41250  # 330 s in, 330 s out
    assert np.ptp(record.p_signal, axis=0).min() > 0  # every lead carries a signal
    assert any("NOT calibrated" in line for line in record.comments)
    assert {"Age: 61", "Sex: M"} <= set(record.comments)


@needs_bidmc
def test_translate_bidmc_csv_with_spaced_column_names(tmp_path: Path, checkpoint: Path) -> None:
    with gzip.open(BIDMC_01, "rt") as handle:
        table = pd.read_csv(handle, nrows=3000)  # 24 s; the header keeps BIDMC's leading spaces
    assert " PLETH" in table.columns
    csv = tmp_path / "bidmc_01.csv"
    table.to_csv(csv, index=False)
    summary = translate_file(model=str(checkpoint), input=str(csv), out=str(tmp_path / "bidmc_01_ecg"),
                             column="PLETH", fs=125.0)
    assert summary["channel"] == "PLETH" and summary["n_windows"] == 5  # 0, 512, 1024, 1536, and the end
    record = read_output(tmp_path / "bidmc_01_ecg")
    assert record.sig_len == 3000
    # The whole gzipped record works as well (columns found after stripping spaces, any case).
    translate_file(model=str(checkpoint), input=str(BIDMC_01), out=str(tmp_path / "full"), column="pleth",
                   fs=125.0)
    assert read_output(tmp_path / "full").sig_len == 60001


@pytest.mark.parametrize(("n", "fs", "expected"), [(1001, 100.0, 1252), (2500, 250.0, 1250), (1300, 125.0, 1300)])
def test_output_length_is_input_duration_at_125_hz(tmp_path: Path, checkpoint: Path, n: int, fs: float,
                                                   expected: int) -> None:
    """ceil(n x 125 / fs): resample_poly's length for a rate that is a simple ratio of 125 Hz."""
    csv = write_csv(tmp_path / "in.csv", {"ppg": pulses(n, fs)})
    translate_file(model=str(checkpoint), input=str(csv), out=str(tmp_path / "rec"), column="ppg", fs=fs)
    assert read_output(tmp_path / "rec").sig_len == expected == int(np.ceil(n * 125 / fs))


def test_scale_seed_and_stochastic_bundle(tmp_path: Path) -> None:
    """A diffusion teacher's bundle: same seed -> same record, another seed -> another; --ecg-scale-mv scales."""
    from p2es_dist.config import load_config
    from p2es_dist.export.bundle import write_bundle

    model = load_config("smoke")["model"]
    bundle = tmp_path / "bundle"
    write_bundle(str(save_checkpoint(tmp_path / "ckpt", model)), str(bundle), no_metrics=True,
                 preprocessing_from_defaults=True)
    csv = write_csv(tmp_path / "in.csv", {"PPG": pulses(1100, 125.0)})

    def run(name: str, **config) -> np.ndarray:
        summary = translate_file(model=str(bundle), input=str(csv), out=str(tmp_path / name), fs=125.0,
                                 config=TranslateConfig(**config))
        assert summary["generation"] == {"sampler": "ddim", "steps": model["sample_steps"], "n_samples": 1}
        return read_output(tmp_path / name).p_signal

    first, again, other = run("a", seed=1), run("b", seed=1), run("c", seed=2)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    doubled = run("d", seed=1, ecg_scale_mv=2.0)
    np.testing.assert_allclose(doubled, 2 * first, atol=1e-3 * np.abs(first).max())


def test_png(tmp_path: Path, checkpoint: Path) -> None:
    pytest.importorskip("p2es_dist.evaluate.figures", reason="evaluate.figures (plot_twelve_lead) not installed")
    csv = write_csv(tmp_path / "in.csv", {"PLETH": pulses(2000, 125.0)})
    summary = translate_file(model=str(checkpoint), input=str(csv), out=str(tmp_path / "rec"), fs=125.0,
                             png=str(tmp_path / "rec.png"))
    assert Path(summary["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_cli_error(args: list[str], capsys) -> str:
    assert cli_main(["translate", *args]) == 2
    return capsys.readouterr().err


def test_errors_are_one_clear_line(tmp_path: Path, checkpoint: Path, capsys) -> None:
    model = ["--model", str(checkpoint), "--out", str(tmp_path / "rec")]
    csv = write_csv(tmp_path / "in.csv", {"Time [s]": np.arange(2000) / 125, " PLETH": pulses(2000, 125.0)})
    err = run_cli_error([*model, "--input", str(csv), "--column", "PPG2", "--fs", "125"], capsys)
    assert "--column 'PPG2': not a column" in err and "'Time [s]', 'PLETH'" in err
    err = run_cli_error([*model, "--input", str(csv), "--column", "PLETH"], capsys)
    assert "--fs: required for CSV input" in err
    short = write_csv(tmp_path / "short.csv", {"PLETH": pulses(500, 125.0)})
    err = run_cli_error([*model, "--input", str(short), "--fs", "125"], capsys)
    assert "500 samples at 125 Hz (4.00 s) are shorter than one window: 1024 samples at 125 Hz" in err
    gappy = pulses(3000, 125.0)
    gappy[1250:1500] = np.nan  # 2 s
    gap_csv = write_csv(tmp_path / "gap.csv", {"PLETH": gappy})
    err = run_cli_error([*model, "--input", str(gap_csv), "--fs", "125"], capsys)
    assert "NaN gap(s) in the PPG longer than the 0.5 s interpolation limit, at 10.00-12.00 s" in err
    err = run_cli_error([*model, "--input", str(tmp_path / "missing")], capsys)
    assert "no WFDB header" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_wfdb_without_ppg_lists_its_channels(tmp_path: Path, checkpoint: Path, capsys) -> None:
    t = np.arange(3000) / 250
    wfdb.wrsamp("ecgonly", fs=250, units=["mV", "mV"], sig_name=["MLII", "V5"],
                p_signal=np.stack([np.sin(t), np.cos(t)], axis=1), fmt=["16", "16"], write_dir=str(tmp_path))
    err = run_cli_error(["--model", str(checkpoint), "--input", str(tmp_path / "ecgonly"),
                         "--out", str(tmp_path / "rec")], capsys)
    assert "no PPG channel (PLETH/PPG) among its channels (MLII, V5)" in err
    err = run_cli_error(["--model", str(checkpoint), "--input", str(tmp_path / "ecgonly.hea"), "--fs", "250",
                         "--out", str(tmp_path / "rec")], capsys)
    assert "--fs: only for CSV input" in err
