"""A student built with `use_template` (calibration templates, issue 13): its ONNX / TorchScript / int8 files
take the template, and pruning scores and keeps the template input.

Every comparison is against the PyTorch student's own path (`generate`, with or without a calibration
profile, `GenerationOptions(calibration=...)`), on windows whose upstrokes the real detector found: a
calibrated window, a zero-shot one (the population's beat at its upstrokes) and one without upstrokes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2es_dist.constants import LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.calibration import CalibrationProfile, population_json
from p2es_dist.distill.prune import prune_student, select_channels, significance
from p2es_dist.export import template_graph as tg
from p2es_dist.export.mobile import export_torchscript
from p2es_dist.export.onnx_io import example_ppg, export_onnx, onnx_max_abs_diff, onnx_session
from p2es_dist.export.quantize import quantize_int8
from p2es_dist.models.base import GenerationOptions, with_calibration
from p2es_dist.models.student import Student, StudentConfig

TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

def profile(pat_s: float, leads: tuple[str, ...], *, width: float, seed: int) -> CalibrationProfile:
    """A calibration profile with a QRS + T beat of `width` samples on `leads`."""
    rng = np.random.default_rng(seed)
    k = np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE
    qrs, tail = np.exp(-0.5 * (k / width) ** 2), np.exp(-0.5 * ((k - 35) / 8.0) ** 2)
    beat = {lead: (rng.uniform(0.3, 1.0) * qrs + rng.uniform(0.1, 0.3) * tail).astype(np.float32) for lead in leads}
    return CalibrationProfile(pat_s=pat_s, pat_iqr_s=0.06, n_beats=40, beat=beat, seconds=60.0)


POPULATION = population_json(profile(0.7, ("I", "II", "V1", "V5"), width=2.0, seed=0))
PATIENT = profile(0.5, ("II", "aVR", "V2"), width=1.5, seed=1)


def template_student(*, population: bool = True, seed: int = 0) -> Student:
    """A small template student whose zero-initialised layers (the generator) got random weights, so its
    output depends on every input and not only on the residual template."""
    torch.manual_seed(seed)
    config = StudentConfig(channels=8, c1_channels=5, module_dilation=2, attention_hidden=4, use_template=True,
                           template_dropout=0.0, population=POPULATION if population else {})
    model = Student(config=config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.all(parameter == 0):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def ppg_windows(n: int = 3, seed: int = 7) -> dict[str, torch.Tensor]:
    """A Batch of PPG windows with the upstrokes `timing.ppg_upstrokes` finds, padded as the loader pads."""
    ppg = example_ppg(n, seed=seed)
    found = [timing.ppg_upstrokes(row.numpy()) for row in ppg]
    upstrokes = np.full((n, max(len(f) for f in found)), timing.UPSTROKE_PAD, dtype=np.int32)
    for i, row in enumerate(found):
        upstrokes[i, : len(row)] = row
    assert all(len(f) >= 5 for f in found)  # 60-100 bpm over 8 s
    return {"ppg": ppg, "ppg_mask": torch.ones(n, dtype=torch.bool), "ecg": torch.zeros(n, N_LEADS, WINDOW),
            "ecg_mask": torch.zeros(n, N_LEADS, dtype=torch.bool), "upstrokes": torch.from_numpy(upstrokes)}


def feeds(model: Student, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The exported graph's inputs for three modes of the same windows, by name."""
    calibrated = with_calibration(batch, GenerationOptions(calibration=PATIENT))
    n = len(batch["ppg"])
    empty = {"template": torch.zeros(n, N_LEADS, WINDOW), "template_mask": torch.zeros(n, N_LEADS, dtype=torch.bool)}
    modes = {"calibrated": {"ppg": batch["ppg"], "template": calibrated["template"],
                            "template_mask": calibrated["template_mask"], "upstrokes": batch["upstrokes"]},
             "zero_shot": {"ppg": batch["ppg"], **empty, "upstrokes": batch["upstrokes"]},
             "no_upstrokes": {"ppg": batch["ppg"], **empty,
                              "upstrokes": torch.full((n, 1), timing.UPSTROKE_PAD, dtype=torch.int32)}}
    names = tg.input_names(model)
    return {mode: {name: value for name, value in inputs.items() if name in names} for mode, inputs in modes.items()}


def references(model: Student, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The PyTorch student's answers for the modes of `feeds`."""
    without_upstrokes = {key: value for key, value in batch.items() if key != "upstrokes"}
    return {"calibrated": model.generate(batch, GenerationOptions(calibration=PATIENT)).numpy(),
            "zero_shot": model.generate(batch).numpy(), "no_upstrokes": model.generate(without_upstrokes).numpy()}


@pytest.fixture(scope="module")
def student() -> Student:
    return template_student()


@pytest.fixture(scope="module")
def onnx_file(student: Student, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(student, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnx_inputs_are_named_and_typed(student: Student, onnx_file: Path) -> None:
    session = onnx_session(onnx_file)
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert list(inputs) == ["ppg", "template", "template_mask", "upstrokes"] == tg.input_names(student)
    assert inputs["ppg"] == ("tensor(float)", ["batch", WINDOW])
    assert inputs["template"] == ("tensor(float)", ["batch", N_LEADS, WINDOW])
    assert inputs["template_mask"] == ("tensor(bool)", ["batch", N_LEADS])
    assert inputs["upstrokes"] == ("tensor(int32)", ["batch", "upstrokes"])
    assert [o.name for o in session.get_outputs()] == ["ecg"]
    assert [spec["name"] for spec in tg.input_spec(student)] == list(inputs)


def test_onnx_matches_pytorch_with_and_without_template(student: Student, onnx_file: Path) -> None:
    batch = ppg_windows(3)  # exported with 2 windows: the batch axis is free
    session = onnx_session(onnx_file)
    expected = references(student, batch)
    outputs = {mode: session.run(["ecg"], tg.as_feed(inputs))[0] for mode, inputs in feeds(student, batch).items()}
    for mode, output in outputs.items():
        assert output.shape == (3, N_LEADS, WINDOW)
        assert np.abs(output - expected[mode]).max() <= TOLERANCE, mode
    # Each input acts: the patient's template against the population's, and the population against none.
    assert np.abs(outputs["calibrated"] - outputs["zero_shot"]).max() > 0.05
    assert np.abs(outputs["zero_shot"] - outputs["no_upstrokes"]).max() > 0.05


def test_onnx_mixed_windows_and_masked_out_leads(student: Student, onnx_file: Path) -> None:
    """Calibrated, zero-shot and upstroke-less windows in one call; values in leads the mask leaves out
    are ignored, as `template_input` ignores them."""
    inputs = tg.example_inputs(student, 5, seed=3)
    outside = ~inputs["template_mask"][0]
    assert outside.any() and inputs["template"][0][outside].abs().max() > 0
    assert onnx_max_abs_diff(student, onnx_file, tg.reference_batch(inputs)) <= TOLERANCE
    # A bare PPG tensor: every window uncalibrated and without upstrokes.
    assert onnx_max_abs_diff(student, onnx_file, inputs["ppg"]) <= TOLERANCE


def test_torchscript_matches_pytorch_with_and_without_template(student: Student, tmp_path: Path) -> None:
    assert export_torchscript(student, tmp_path / "model.pt") <= TOLERANCE
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    batch = ppg_windows(3, seed=11)
    expected = references(student, batch)
    with torch.no_grad():
        for mode, inputs in feeds(student, batch).items():
            output = scripted(*(inputs[name] for name in tg.input_names(student))).numpy()
            assert np.abs(output - expected[mode]).max() <= TOLERANCE, mode


def test_student_without_population_exports_without_upstrokes(tmp_path: Path) -> None:
    """Trained on data without calibration, the student has no population: zero-shot is the empty template."""
    model = template_student(population=False, seed=2)
    path = export_onnx(model, tmp_path / "model.onnx")
    assert [i.name for i in onnx_session(path).get_inputs()] == ["ppg", "template", "template_mask"]
    batch = ppg_windows(2, seed=3)
    expected = references(model, batch)
    np.testing.assert_array_equal(expected["zero_shot"], expected["no_upstrokes"])
    session = onnx_session(path)
    modes = feeds(model, batch)
    for mode in ("calibrated", "zero_shot"):
        output = session.run(["ecg"], tg.as_feed(modes[mode]))[0]
        assert np.abs(output - expected[mode]).max() <= TOLERANCE, mode
    assert np.abs(expected["calibrated"] - expected["zero_shot"]).max() > 0.05
    assert export_torchscript(model, tmp_path / "model.pt") <= TOLERANCE


def test_int8_keeps_the_population_beat_and_stays_close(student: Student, onnx_file: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    int8 = quantize_int8(onnx_file, tmp_path / "model.int8.onnx")
    beats = {path: {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
             for path in (onnx_file, int8)}
    beat = f"{tg.CONSTANT_PREFIX}beat"
    np.testing.assert_array_equal(beats[int8][beat], beats[onnx_file][beat])  # fp32, untouched
    assert any(value.dtype == np.int8 for value in beats[int8].values())  # while the weights are int8
    batch = ppg_windows(3)
    expected = references(student, batch)
    session = onnx_session(int8)
    for mode, inputs in feeds(student, batch).items():
        diff = np.abs(session.run(["ecg"], tg.as_feed(inputs))[0] - expected[mode]).max()
        assert 0 < diff < 0.05 * np.abs(expected[mode]).max(), mode


def test_bundle_of_a_template_student_states_its_inputs(tmp_path: Path) -> None:
    from test_export import trained_checkpoint

    from p2es_dist.export.bundle import write_bundle

    section = {"name": "student", "channels": 8, "c1_channels": 4, "attention_hidden": 4, "use_template": True,
               "population": POPULATION}
    summary = write_bundle(str(trained_checkpoint(tmp_path / "ckpt", section)), str(tmp_path / "bundle"),
                           no_metrics=True)
    assert summary["onnx_max_abs_diff"] <= TOLERANCE and summary["torchscript_max_abs_diff"] <= TOLERANCE
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    for name in ("onnx", "torchscript"):
        assert [i["name"] for i in config["mobile"][name]["inputs"]] == ["ppg", "template", "template_mask",
                                                                           "upstrokes"]
        assert "population" in config["mobile"][name]["zero_shot"]
    session = onnx_session(tmp_path / "bundle" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["ppg", "template", "template_mask", "upstrokes"]
    card = (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert "`template_mask` (batch, 12) bool" in card and "Zero-shot (no calibration)" in card


# --- pruning ---------------------------------------------------------------------------------------------


def calibrated_batch(n: int = 4, seed: int = 5) -> dict[str, torch.Tensor]:
    """Windows with the patient's template in all but the last (hidden: zero-shot, the population's)."""
    batch = with_calibration(ppg_windows(n, seed=seed), GenerationOptions(calibration=PATIENT))
    batch["template_mask"][-1] = False
    return batch


def test_significance_is_taken_with_the_template(student: Student) -> None:
    batch = calibrated_batch()
    with_template = significance(student, [batch])
    stripped = {key: value for key, value in batch.items() if key not in ("template", "template_mask", "upstrokes")}
    without = significance(student, [stripped])
    # F1 of the template student, as training computes it: the filled, masked template beside PPG.
    with torch.no_grad():
        first = student.features(batch["ppg"], student.calibration_template(batch)).first
    torch.testing.assert_close(with_template.first_energy, first.square().mean(dim=-1).mean(dim=0))
    assert not torch.allclose(with_template.first_energy, without.first_energy, rtol=0.05)


def test_pruned_template_student_still_uses_the_template(student: Student, tmp_path: Path) -> None:
    batch = calibrated_batch()
    kept = select_channels(significance(student, [batch]).score(), c1_channels=5, fraction=0.5)
    pruned, config = prune_student(student, kept)
    assert config.use_template and config.population == student.config.population and config.channels == len(kept)
    # Only output channels are pruned: every template input channel stays.
    assert pruned.first[0].weight.shape[1] == 1 + 2 * N_LEADS
    torch.testing.assert_close(pruned.first[0].weight, student.first[0].weight[kept])
    calibrated = pruned.generate(batch)
    other = {**batch, "template": batch["template"].roll(40, dims=-1)}  # the same beats 0.32 s later
    assert (calibrated - pruned.generate(other))[:-1].abs().max() > 0.05
    torch.testing.assert_close((calibrated - pruned.generate(other))[-1], torch.zeros(N_LEADS, WINDOW))  # hidden
    zero_shot = pruned.generate({**batch, "template_mask": torch.zeros_like(batch["template_mask"])})
    assert (calibrated - zero_shot)[:-1].abs().max() > 0.05
    # And it exports with the template like the full one.
    assert onnx_max_abs_diff(pruned, export_onnx(pruned, tmp_path / "pruned.onnx"), batch) <= TOLERANCE


def test_cached_teacher_outputs_carry_templates_and_the_hidden_choice(student: Student, tmp_path: Path) -> None:
    """What pruning scores on: the cache's windows with their templates, hidden where distillation hid them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_timing import _paired_table

    from p2es_dist.distill.teacher_outputs import HIDDEN_COLUMN, cache_columns, cached_batches, predict_table

    table = _paired_table(40)
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["train"] * len(table)))
    # The template student stands in for the teacher: any model with `generate` does.
    cached = predict_table(student, table, options=GenerationOptions(seed=0), template_dropout=0.5)
    folder = tmp_path / "cache"
    folder.mkdir()
    pq.write_table(cached, folder / "part-00000.parquet")
    (folder / "manifest.json").write_text(json.dumps({
        "schema_version": 2, "kind": "teacher_outputs", "fs": 125, "window": WINDOW,
        "shards": [{"path": "part-00000.parquet", "rows": len(cached), "sha256": ""}]}))
    assert HIDDEN_COLUMN in cache_columns(str(folder)) and "calib_beat" in cache_columns(str(folder))

    batches = list(cached_batches(str(folder), windows=len(cached), batch_size=16))
    mask = torch.cat([b["template_mask"] for b in batches])
    hidden = torch.from_numpy(cached.column(HIDDEN_COLUMN).to_numpy(zero_copy_only=False))
    after_calibration = torch.from_numpy(cached.column("start").to_numpy() >= 60 * 125)
    assert len(mask) == len(cached) and 0 < int(hidden.sum()) < len(hidden)
    assert not mask[hidden].any()  # the distillation's choice, not a new draw
    ii = LEAD_INDEX["II"]
    assert mask[~hidden & after_calibration, ii].all() and (~hidden & after_calibration).any()
    assert {"teacher_ecg", "upstrokes", "source"} <= set(batches[0])
    scores = significance(student, batches)
    assert scores.windows == len(cached)
    plain = significance(student, [{k: v for k, v in b.items() if k not in ("template", "template_mask")}
                                   for b in batches])
    assert not torch.allclose(scores.first_energy, plain.first_energy, rtol=0.02)


def test_distill_config_leaves_template_hiding_to_the_data() -> None:
    from p2es_dist.distill.config import parse_distill_config
    from p2es_dist.errors import ConfigError

    def config(**model: object) -> dict:
        return {"distill": {"teacher": "t"}, "model": {"name": "student", **model},
                "data": {"uris": ["d"], "augment": {"enabled": False}}}

    assert parse_distill_config(config(use_template=True)).model["template_dropout"] == 0.0
    assert "template_dropout" not in parse_distill_config(config()).model
    with pytest.raises(ConfigError, match="template_dropout: must be 0"):
        parse_distill_config(config(use_template=True, template_dropout=0.5))
