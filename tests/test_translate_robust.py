"""`p2es translate` robustness: non-finite samples, flat PPG, `--fs` checks, and chunked streaming that
gives the whole-signal output (translate/stream.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from conftest import require_data
from test_calibrate import TINY_P2ES
from test_export import TINY_LI2021, save_checkpoint

from p2es_dist.cli import main as cli_main
from p2es_dist.constants import LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile
from p2es_dist.data.normalize import ppg_to_model_space
from p2es_dist.data.preprocess import PreprocessConfig, bandpass, resample
from p2es_dist.models.checkpoint import load_model
from p2es_dist.translate.io import EcgRecordWriter, open_ppg, read_ppg
from p2es_dist.translate.run import (
    TranslateConfig,
    calibration_templates,
    generate_windows,
    translate_file,
    translate_signal,
    translate_stream,
    window_upstrokes,
)
from p2es_dist.translate.stitch import cut_windows, overlap_add, window_starts
from p2es_dist.translate.stream import StreamConfig, condition, fill_gaps, find_upstrokes

SMALL = StreamConfig(chunk=4096, margin_s=30.0, group_windows=4)  # 33 s chunks, 4-window groups
WHOLE = StreamConfig(chunk=10**9, group_windows=10**9)  # one chunk, one group: the whole-signal computation


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "ckpt", TINY_LI2021)


def pulses(n: int, fs: float, seed: int = 0) -> np.ndarray:
    """A PPG-like signal: ~72 bpm with a drifting rate and amplitude, an offset, and noise."""
    t = np.arange(n) / fs
    phase = 2 * np.pi * np.cumsum(1.2 + 0.2 * np.sin(2 * np.pi * t / 41)) / fs
    shape = np.sin(phase) + 0.4 * np.sin(2 * phase + 1.0)
    return 900 + 40 * shape * (1 + 0.4 * np.sin(2 * np.pi * t / 77)) + np.random.default_rng(seed).standard_normal(n)


def write_csv(path: Path, values: np.ndarray) -> Path:
    pd.DataFrame({"PLETH": values}).to_csv(path, index=False)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(["translate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record(prefix: Path) -> np.ndarray:
    return wfdb.rdrecord(str(prefix)).p_signal


def test_one_inf_sample_is_repaired_and_the_ppg_used(tmp_path: Path, checkpoint: Path, capsys) -> None:
    """Before: one inf spread through the filters, every window became zeros, and the output was the
    zero-PPG output. Now the sample is interpolated, said so, and the PPG is translated."""
    values = pulses(3000, 125.0)
    broken = values.copy()
    broken[1500] = np.inf
    model = ["--model", str(checkpoint), "--fs", "125"]
    code, out, err = run_cli([*model, "--input", str(write_csv(tmp_path / "inf.csv", broken)),
                              "--out", str(tmp_path / "inf")], capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["repaired_samples"] == 1 and summary["repaired_gaps"] == 1
    assert "repaired: 1 non-finite sample(s) (NaN/inf) in 1 gap(s)" in err and err.count("\n") == 1
    header = wfdb.rdheader(str(tmp_path / "inf"))
    assert any(line.startswith("PPG repaired: 1 non-finite") for line in header.comments)

    repaired = values.copy()
    repaired[1500] = np.interp(1500, [1499, 1501], values[[1499, 1501]])  # what the repair puts there
    assert run_cli([*model, "--input", str(write_csv(tmp_path / "fixed.csv", repaired)),
                    "--out", str(tmp_path / "fixed")], capsys)[0] == 0
    np.testing.assert_array_equal(record(tmp_path / "inf"), record(tmp_path / "fixed"))

    # What the model makes of all-zero windows (an all-zero PPG is refused now, so generated directly).
    loaded = load_model(str(checkpoint))
    starts = window_starts(3000, WINDOW, 512)
    zero = overlap_add(generate_windows(loaded, np.zeros((len(starts), WINDOW), np.float32),
                                        config=TranslateConfig(), age=None, sex=-1), starts, 3000)
    ecg = record(tmp_path / "inf").T
    assert np.abs(ecg - zero).max() > 0.1 * np.abs(zero).max()


def test_long_non_finite_runs_are_refused(tmp_path: Path, checkpoint: Path, capsys) -> None:
    model = ["--model", str(checkpoint), "--fs", "125", "--out", str(tmp_path / "rec")]
    values = pulses(3000, 125.0)
    values[1000:1075] = np.inf  # 0.6 s of inf: over the 0.5 s limit (before: passed on, exit 0)
    code, _, err = run_cli([*model, "--input", str(write_csv(tmp_path / "inf.csv", values))], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "1 NaN gap(s) in the PPG longer than the 0.5 s interpolation limit, at 8.00-8.60 s" in err
    assert "inf counts as NaN" in err
    values = pulses(3000, 125.0)
    values[2000:2190] = np.nan  # 1.52 s
    values[100:130] = -np.inf  # 0.24 s: would be repaired
    code, _, err = run_cli([*model, "--input", str(write_csv(tmp_path / "nan.csv", values))], capsys)
    assert code == 2 and err.count("\n") == 1 and "1 NaN gap(s)" in err and "16.00-17.52 s" in err
    assert not (tmp_path / "rec.hea").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("level", [0.0, 512.0])
def test_flat_ppg_is_refused(tmp_path: Path, checkpoint: Path, capsys, level: float) -> None:
    """Before: an all-zero (or constant) PPG gave a confident ECG, exit 0."""
    csv = write_csv(tmp_path / "flat.csv", np.full(3000, level))
    code, _, err = run_cli(["--model", str(checkpoint), "--fs", "125", "--out", str(tmp_path / "rec"),
                            "--input", str(csv)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "the PPG is flat (one value for 1 s or longer) over 100% of its 24.00 s, at 0.00-24.00 s" in err
    # Mostly flat is refused too; a short flat stretch is translated and reported.
    values = pulses(3000, 125.0)
    values[500:2500] = level
    code, _, err = run_cli(["--model", str(checkpoint), "--fs", "125", "--out", str(tmp_path / "rec"),
                            "--input", str(write_csv(tmp_path / "most.csv", values))], capsys)
    assert code == 2 and "over 67% of its 24.00 s" in err
    values = pulses(3000, 125.0)
    values[500:750] = level  # 2 s
    code, out, err = run_cli(["--model", str(checkpoint), "--fs", "125", "--out", str(tmp_path / "rec"),
                              "--input", str(write_csv(tmp_path / "some.csv", values))], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["flat_runs_s"] == [[4.0, 6.0]]
    assert "PPG flat (one value for 1 s or longer) at 4.00-6.00 s" in err


@pytest.mark.parametrize("fs", ["inf", "0", "-1", "nan", "1e6", "5"])
def test_bad_fs_is_one_line(tmp_path: Path, checkpoint: Path, capsys, fs: str) -> None:
    csv = write_csv(tmp_path / "in.csv", pulses(3000, 125.0))
    code, _, err = run_cli(["--model", str(checkpoint), "--input", str(csv), "--fs", fs,
                            "--out", str(tmp_path / "rec")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--fs: expected a sampling rate between 10 and 10000 Hz, got" in err


def test_wfdb_header_rate_is_checked(tmp_path: Path, checkpoint: Path, capsys) -> None:
    wfdb.wrsamp("slow", fs=2, units=["NU"], sig_name=["PLETH"], p_signal=pulses(3000, 2.0)[:, None], fmt=["16"],
                write_dir=str(tmp_path))
    code, _, err = run_cli(["--model", str(checkpoint), "--input", str(tmp_path / "slow"),
                            "--out", str(tmp_path / "rec")], capsys)
    assert code == 2 and "channel PLETH's rate: expected a sampling rate between 10 and 10000 Hz, got 2.0" in err


def whole_signal_reference(loaded, values: np.ndarray, fs: float, config: TranslateConfig,
                           profile: CalibrationProfile) -> np.ndarray:
    """The translation computed on the whole signal at once, as translate did before streaming."""
    preprocess = PreprocessConfig()
    ppg = bandpass(resample(fill_gaps(values), fs), preprocess.ppg_band_hz, preprocess.filter_order)
    starts = window_starts(len(ppg), WINDOW, config.hop)
    upstrokes = timing.ppg_upstrokes(ppg)
    full, mask = profile.template(upstrokes, len(ppg))
    templates = timing.normalise_template(cut_windows(full, starts, WINDOW), np.broadcast_to(mask, (len(starts), 12)))
    generated = generate_windows(loaded, ppg_to_model_space(cut_windows(ppg, starts, WINDOW)), config=config,
                                 age=None, sex=-1, templates=(templates, mask),
                                 upstrokes=window_upstrokes(upstrokes, starts))
    return overlap_add(generated, starts, len(ppg)) * float(np.abs(profile.beat["II"]).max())


def test_chunked_equals_whole_signal(tmp_path: Path) -> None:
    """A 2.5-min 250 Hz PPG with short gaps, through a stochastic template model with a calibration:
    33 s chunks (5 of them) and 4-window groups give what the whole signal at once gives, upstrokes,
    templates and per-batch seeds included."""
    values = pulses(37_500, 250.0, seed=3)
    values[[1000, 20_000, 20_001]] = [np.nan, np.inf, -np.inf]
    values[30_000:30_100] = np.nan  # 0.4 s
    beat = np.sin(np.linspace(0, np.pi, timing.BEAT_SAMPLES)) ** 8
    profile = CalibrationProfile(pat_s=0.3, pat_iqr_s=0.01, n_beats=50, seconds=60.0,
                                 beat={"II": 1.5 * beat, "V2": -0.8 * beat}, units="mV")
    loaded = load_model(str(save_checkpoint(tmp_path / "ckpt", TINY_P2ES)))
    config = TranslateConfig(batch_size=2, seed=7)
    signal = read_ppg(write_csv(tmp_path / "in.csv", values), fs=250.0)

    blocks: list[np.ndarray] = []
    info = translate_stream(loaded, signal, config=config, write=blocks.append, scratch=tmp_path, calibration=profile,
                            stream=SMALL)
    chunked = np.concatenate(blocks, axis=1)
    reference = whole_signal_reference(loaded, signal.values, 250.0, config, profile)
    assert info["n_samples"] == 18_750 and info["n_windows"] == 36 and info["repaired_samples"] == 103
    # Output really was handed on in pieces: one group of 4 windows (hop 512) at a time.
    assert len(blocks) == 9 and max(block.shape[1] for block in blocks) <= 4 * 512 + WINDOW
    peak = np.abs(reference).max()
    assert peak > 0.1
    np.testing.assert_allclose(chunked, reference, rtol=0, atol=1e-5 * peak)
    # And the streaming code with one chunk and one group is that whole-signal computation too.
    whole, _ = translate_signal(loaded, signal, config=config, calibration=profile, stream=WHOLE)
    np.testing.assert_allclose(whole, reference, rtol=0, atol=1e-5 * peak)


def test_chunked_conditioning_and_upstrokes_on_real_records(tmp_path: Path) -> None:
    """Real PPG (BIDMC 01, 8 min): 4096-sample chunks give the whole signal's conditioned samples and
    exactly its upstrokes (with a chunk-local Elgendi threshold, one upstroke here differs)."""
    signal = read_ppg(require_data("bidmc", "bidmc_csv", "bidmc_01_Signals.csv.gz"), column="PLETH", fs=125.0)
    preprocess = PreprocessConfig()
    conditioned = condition(signal, preprocess, tmp_path / "ppg.f64", SMALL)
    whole = bandpass(resample(fill_gaps(signal.values), 125.0), preprocess.ppg_band_hz, preprocess.filter_order)
    assert conditioned.n == len(whole) == 60_001
    np.testing.assert_allclose(conditioned.read(0, conditioned.n), whole, rtol=0, atol=1e-12 * np.abs(whole).max())
    np.testing.assert_array_equal(find_upstrokes(conditioned, SMALL), timing.ppg_upstrokes(whole))


def test_calibration_templates_over_a_span_equal_the_whole_render() -> None:
    upstrokes = np.sort(np.random.default_rng(0).choice(np.arange(30, 20_000), 150, replace=False))
    beat = np.cos(np.linspace(0, 6, timing.BEAT_SAMPLES))
    profile = CalibrationProfile(pat_s=1.4, pat_iqr_s=0.0, n_beats=20, seconds=60.0, beat={"I": beat})
    full, mask = profile.template(upstrokes, 20_000)
    starts = np.array([5_000, 5_512, 6_024, 6_300])
    expected = timing.normalise_template(cut_windows(full, starts, WINDOW), np.broadcast_to(mask, (4, 12)))
    np.testing.assert_array_equal(calibration_templates(profile, upstrokes, starts)[0], expected)


def test_record_written_in_pieces_equals_wfdb_wrsamp(tmp_path: Path) -> None:
    ecg = (np.random.default_rng(0).standard_normal((12, 10_007)) * np.linspace(0.1, 3, 12)[:, None])
    ecg[5] = 0.0  # a flat lead
    ecg = ecg.astype(np.float32).astype(np.float64)
    wfdb.wrsamp("whole", fs=125, units=["mV"] * 12, sig_name=list(LEADS), p_signal=ecg.T.copy(), fmt=["16"] * 12,
                comments=["a comment"], write_dir=str(tmp_path))
    with EcgRecordWriter(tmp_path / "pieces", fs=125, piece=999) as writer:
        for first in range(0, 10_007, 3001):
            writer.append(ecg[:, first:first + 3001])
        writer.finish(["a comment"])
    assert (tmp_path / "pieces.dat").read_bytes() == (tmp_path / "whole.dat").read_bytes()
    assert (tmp_path / "pieces.hea").read_text() == (tmp_path / "whole.hea").read_text().replace("whole", "pieces")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the scratch folder is gone


def test_wfdb_input_read_in_pieces_equals_the_whole_read() -> None:
    a103l = require_data("wfdb_samples", "a103l.hea")
    stream = open_ppg(a103l)
    assert stream.channel == "PLETH" and stream.fs == 250.0 and "II" in stream.columns
    pieces = list(stream.chunks(10_000))
    assert len(pieces) == 9
    from p2es_dist.data.sources.wfdb_common import channels, read_wfdb

    expected = next(c for c in channels(read_wfdb(a103l.with_suffix(""))) if c.name == "PLETH").values
    np.testing.assert_array_equal(np.concatenate(pieces), expected.astype(np.float64))


def test_translate_file_streams_the_same_record(tmp_path: Path, checkpoint: Path) -> None:
    """The CLI path: small chunks and the default give the same record."""
    csv = write_csv(tmp_path / "in.csv", pulses(20_000, 125.0, seed=5))
    config = TranslateConfig(batch_size=4)
    small = translate_file(model=str(checkpoint), input=str(csv), out=str(tmp_path / "small"), fs=125.0,
                           config=config, stream=SMALL)
    default = translate_file(model=str(checkpoint), input=str(csv), out=str(tmp_path / "default"), fs=125.0,
                             config=config)
    assert small["n_windows"] == default["n_windows"] == 39
    a, b = record(tmp_path / "small"), record(tmp_path / "default")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
