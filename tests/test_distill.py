"""Distillation: the student's size and loss, significance pruning, ONNX parity, int8 size, the teacher-output
cache, and one end-to-end `run_distill` on tiny synthetic shards with an untrained smoke teacher."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p2es_dist.config import load_config
from p2es_dist.constants import N_LEADS, WINDOW
from p2es_dist.distill.config import DistillSection, parse_distill_config
from p2es_dist.distill.prune import combine_scores, prune_student, select_channels, significance
from p2es_dist.distill.teacher_outputs import TEACHER_COLUMN, ensure_teacher_outputs, predict_table
from p2es_dist.errors import ConfigError
from p2es_dist.export.onnx_io import example_ppg, export_onnx, onnx_max_abs_diff
from p2es_dist.export.quantize import quantize_int8
from p2es_dist.models import build_model
from p2es_dist.models.base import GenerationOptions, count_parameters
from p2es_dist.models.checkpoint import load_model, save_checkpoint
from p2es_dist.models.student import Student, StudentConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

def trained_looking(config: StudentConfig | None = None, seed: int = 0) -> Student:
    """A student with a non-zero generation layer (a fresh one outputs exactly zero)."""
    torch.manual_seed(seed)
    model = Student(config=config or StudentConfig())
    torch.nn.init.normal_(model.generator.weight, std=0.05)
    return model.eval()


def ppg_only(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"ppg": example_ppg(n, seed=seed), "ppg_mask": torch.ones(n, dtype=torch.bool)}


def test_default_student_is_small_and_maps_ppg_to_twelve_leads():
    model = build_model(load_config("models/student")["model"])
    assert isinstance(model, Student) and count_parameters(model) < 40_000
    batch = {**ppg_only(3), "ecg": torch.randn(3, N_LEADS, WINDOW), "ecg_mask": torch.ones(3, N_LEADS, dtype=bool)}
    assert model.generate(batch).shape == (3, N_LEADS, WINDOW)
    assert not model.stochastic and model.generation_options(GenerationOptions(seed=4, sampler="ddim")) == \
        GenerationOptions(seed=4, n_samples=1)  # one pass: no sampler to record
    assert model.forward_ppg(batch["ppg"]).shape == (3, N_LEADS, WINDOW)


def test_student_learns_from_teacher_and_recorded_leads():
    torch.manual_seed(0)
    model = Student(config=StudentConfig(channels=8, c1_channels=5))
    length = 256  # the student takes any length; short keeps the test quick
    teacher = torch.full((2, N_LEADS, length), 0.5)  # a level the generation layer's bias can learn fast
    batch = {"ppg": example_ppg(2, length), "ppg_mask": torch.ones(2, dtype=torch.bool), "ecg": teacher.clone(),
             "ecg_mask": torch.zeros(2, N_LEADS, dtype=bool),
             "teacher_ecg": teacher}
    batch["ecg_mask"][:, 1] = True  # lead II recorded
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss, parts = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(parts["mse_teacher"]))
    assert set(parts) == {"mse", "sparsity", "mse_teacher"}
    assert losses[-1] < 0.5 * losses[0]
    # Without teacher outputs the loss is the recorded-lead MSE (plus sparsity) alone.
    _, parts = model.loss({k: v for k, v in batch.items() if k != "teacher_ecg"})
    assert "mse_teacher" not in parts


def test_combined_score_ranks_by_both_criteria():
    first = torch.tensor([1.0, 0.0, 1.0, 0.0])
    fusion = torch.tensor([1.0, 1.0, 1.0, 1.0])
    fused = torch.tensor([2.0, 0.1, 0.1, 2.0])
    weight = torch.tensor([0.9, 0.1, 0.5, 0.5])
    score = combine_scores(first, fusion, fused, weight, lambda_w=1.0)
    assert torch.argmax(score) == 0 and torch.argmin(score) == 1
    # n(first) + n(fusion) + n(fused) + n(weight): 6.70, 1.30, 4.10, 3.90.
    assert select_channels(score, c1_channels=2, fraction=0.5) == [0, 2]
    # Both halves of [C1, C2] survive even when one half scores worst.
    assert select_channels(torch.tensor([5.0, 4.0, 0.1, 0.2]), c1_channels=2, fraction=0.5) == [0, 3]


def silenced_student(dropped: list[int]) -> Student:
    """A student whose `dropped` trunk channels are dead in F1 and F_T and gated off by w."""
    model = trained_looking(StudentConfig(channels=8, c1_channels=5))
    config = model.config
    with torch.no_grad():
        model.first[1].weight[dropped] = 0  # F1[d] = ReLU(0 * norm + 0) = 0
        model.first[1].bias[dropped] = 0
        module = model.decoder.module
        for i in dropped:  # F_T[d] = 0: the last FTM's output channel d is C1's i or C2's i - c1
            norm = module.c1[1] if i < config.c1_channels else module.c2[1]
            j = i if i < config.c1_channels else i - config.c1_channels
            norm.weight[j] = 0
            norm.bias[j] = 0
        model.attention.mlp[2].bias.fill_(20.0)
        model.attention.mlp[2].bias[dropped] = -20.0  # w[d] ~ 0, w[kept] ~ 1
    return model


def test_pruning_keeps_the_significant_kernels():
    dropped = [1, 3, 6, 7]
    model = silenced_student(dropped)
    scores = significance(model, [ppg_only(6, seed=1)])
    assert scores.windows == 6
    assert torch.all(scores.first_energy[dropped] == 0) and torch.all(scores.channel_weight[dropped] < 1e-6)
    kept = select_channels(scores.score(1.0), c1_channels=5, fraction=0.5)
    assert kept == [0, 2, 4, 5]


def test_pruned_student_is_the_sliced_full_one(tmp_path):
    model = trained_looking(StudentConfig(channels=8, c1_channels=5), seed=3)
    kept = [0, 2, 4, 5]
    pruned, config = prune_student(model, kept)
    assert (config.channels, config.c1_channels) == (4, 3)
    x = example_ppg(2, seed=4)[:, None, :]
    with torch.no_grad():
        # First layer: its kept kernels give exactly the full layer's kept channels.
        assert torch.equal(pruned.first[0](x), model.first[0](x)[:, kept])
        # A module's C1 on the kept channels = the full C1 with the pruned input channels zeroed.
        features = torch.randn(2, 8, 200)
        zeroed = features.clone()
        zeroed[:, [1, 3, 6, 7]] = 0
        full_c1 = model.encoder.module.c1[0](zeroed)[:, [0, 2, 4]]
        torch.testing.assert_close(pruned.encoder.module.c1[0](features[:, kept]), full_c1)
        full_t = model.decoder.module.c1[0](zeroed)[:, [0, 2, 4]]
        torch.testing.assert_close(pruned.decoder.module.c1[0](features[:, kept]), full_t)
        # Generation layer: the kept kernels' sum = the full layer fed only the kept channels.
        torch.testing.assert_close(pruned.generator(features[:, kept]), model.generator(zeroed))
        assert torch.equal(pruned.gate.theta, model.gate.theta[kept][:, kept])
    assert pruned.forward_ppg(x[:, 0]).shape == (2, N_LEADS, WINDOW)
    # The pruned checkpoint loads with the widths its model.json states.
    section = {"name": "student", **{k: v for k, v in vars(config).items() if k != "init_weights"}}
    save_checkpoint(pruned, section, str(tmp_path / "pruned"))
    loaded = load_model(str(tmp_path / "pruned"))
    assert loaded.model.config.channels == 4
    assert torch.equal(loaded.model.forward_ppg(x[:, 0]), pruned.forward_ppg(x[:, 0]))


def test_onnx_export_matches_torch_and_int8_is_smaller(tmp_path):
    model = trained_looking()
    path = export_onnx(model, tmp_path / "model.onnx")
    batch = ppg_only(8, seed=5)
    batch["ppg_mask"][3] = False  # absent PPG enters as zeros on both sides
    assert onnx_max_abs_diff(model, path, batch) <= 1e-4
    int8 = quantize_int8(path, tmp_path / "model.int8.onnx")
    assert int8.stat().st_size < 0.6 * path.stat().st_size
    diff = onnx_max_abs_diff(model, int8, batch)
    with torch.no_grad():
        scale = float(model.forward_ppg(batch["ppg"]).abs().max())
    assert 0 < diff < 0.05 * scale  # int8 weights change the output a little, not wholesale


def window_table(n: int, *, splits: tuple[str, ...] = ("train", "val"), missing_ppg: int | None = None) -> pa.Table:
    """Shard rows with the loader's columns (PPG sine, ECG lead II) for tests that need no data set."""
    rng = np.random.default_rng(0)
    t = np.arange(WINDOW) / 125.0
    ppg = np.sin(2 * np.pi * 1.2 * t[None] + rng.uniform(0, 6, (n, 1))).astype(np.float16)
    ecg = np.zeros((n, N_LEADS, WINDOW), np.float16)
    ecg[:, 1] = ppg
    ppg_array = pa.FixedSizeListArray.from_arrays(pa.array(ppg.reshape(-1)), WINDOW)
    if missing_ppg is not None:
        mask = np.zeros(n, bool)
        mask[missing_ppg] = True
        ppg_array = pa.FixedSizeListArray.from_arrays(pa.array(ppg.reshape(-1)), WINDOW, mask=pa.array(mask))
    ecg_mask = np.zeros((n, N_LEADS), bool)
    ecg_mask[:, 1] = True
    return pa.table({
        "window_id": [f"t:r:{i}" for i in range(n)], "split": [splits[i % len(splits)] for i in range(n)],
        "subject_id": [f"s{i % 3}" for i in range(n)], "ppg": ppg_array,
        "ecg": pa.FixedSizeListArray.from_arrays(pa.array(ecg.reshape(-1)), N_LEADS * WINDOW),
        "ecg_mask": pa.FixedSizeListArray.from_arrays(pa.array(ecg_mask.reshape(-1)), N_LEADS),
        "age": pa.array([50.0] * n, pa.float32()), "sex": pa.array([1] * n, pa.int8()),
        "labels": pa.array([[] for _ in range(n)], pa.list_(pa.string())), "quality": pa.array([1.0] * n, pa.float32()),
    })


def test_teacher_outputs_skip_windows_without_ppg_and_match_generate():
    teacher = build_model(load_config("smoke")["model"]).eval()
    table = window_table(5, missing_ppg=2)
    options = GenerationOptions(seed=3, steps=2, sampler="ddim")
    out = predict_table(teacher, table, options=options)
    assert len(out) == 4 and out.column(TEACHER_COLUMN).type == pa.list_(pa.float16(), N_LEADS * WINDOW)
    from p2es_dist.data.batches import table_to_batch

    batch = {k: torch.from_numpy(v) for k, v in table_to_batch(out).items()}
    assert batch["teacher_ecg"].shape == (4, N_LEADS, WINDOW)
    expected = teacher.generate(batch, options)
    torch.testing.assert_close(batch["teacher_ecg"], expected, atol=2e-3, rtol=2e-3)  # float16 storage


def test_teacher_outputs_are_computed_once_per_key(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"shards": [], "fingerprint": "abc"}))
    calls = []

    def fake_compute(*, teacher_uri, data_uris, distill, shard_folder):
        calls.append(distill.seed)
        table = window_table(6).append_column(TEACHER_COLUMN, window_table(6).column("ecg"))
        (tmp_path / shard_folder).mkdir(parents=True)
        pq.write_table(table, f"{shard_folder}/part-0.parquet")

    settings = DistillSection(teacher="t", cache_root=str(tmp_path / "cache"))
    kwargs = {"teacher_uri": "t", "teacher_digest": "d" * 64, "data_uris": [str(data)], "compute": fake_compute}
    first = ensure_teacher_outputs(distill=settings, **kwargs)
    again = ensure_teacher_outputs(distill=settings, **kwargs)
    assert calls == [0] and not first["reused"] and again["reused"] and again["uri"] == first["uri"]
    assert first["n_windows"] == {"train": 3, "val": 3} and first["shards"][0]["rows"] == 6
    other_seed = ensure_teacher_outputs(distill=DistillSection(teacher="t", seed=1, cache_root=settings.cache_root),
                                        **kwargs)
    assert calls == [0, 1] and other_seed["uri"] != first["uri"]
    # Another teacher (digest) is another key too.
    ensure_teacher_outputs(distill=settings, **{**kwargs, "teacher_digest": "e" * 64})
    assert calls == [0, 1, 0]


@pytest.mark.parametrize(("override", "message"), [
    ("distill.teacher=", "distill.teacher: expected"),
    ("distill.splits=[train, test]", "never test"),
    ("data.augment.enabled=true", "data.augment.enabled: must be false"),
    ("model.name=li2021", "model.name: expected 'student'"),
    ("distill.prune_fraction=1.5", "prune_fraction must be in"),
])
def test_distill_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_distill_config(load_config("distill", ["distill.teacher=runs/x", override]))


@pytest.mark.ray
def test_distill_end_to_end_on_tiny_data(ray_local, tmp_path):
    """Untrained smoke teacher -> teacher outputs (Ray Data actors) -> train -> prune -> fine-tune -> ONNX."""
    from p2es_dist.data.ingest import run_ingest
    from p2es_dist.distill.run import run_distill

    shards = str(tmp_path / "syn")
    run_ingest("synthetic", None, shards, {"ingest": {"shard_rows": 256}, "synthetic": {"n_windows": 160, "seed": 1}})
    teacher_model = build_model(load_config("smoke")["model"])
    save_checkpoint(teacher_model, load_config("smoke")["model"] | {}, str(tmp_path / "teacher"))
    config = load_config("distill", [
        f"distill.teacher={tmp_path / 'teacher'}", "distill.steps=2", "distill.teacher_batch_size=32",
        "distill.cpus_per_actor=0.5", f"distill.cache_root={tmp_path / 'cache'}", "distill.prune_windows=32",
        "distill.finetune_steps=3", f"data.uris=[{shards}]", "data.batch_size=8", "data.shuffle_buffer=16",
        "train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=4", "train.val_batches=1",
        "train.cpus_per_worker=0.5", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=tiny",
    ])
    config["model"]["channels"] = 8
    config["model"]["c1_channels"] = 5
    summary = run_distill(config, out=str(tmp_path / "out"))

    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["checkpoint"] == summary["checkpoint"] and result["steps"] == 3 and result["distill_steps"] == 4
    assert result["failures"] == 0 and np.isfinite(result["val"]["val_loss"])
    assert "val_mse_teacher" in result["val"]
    assert not result["teacher_outputs"]["reused"] and result["teacher_outputs"]["n_windows"]["train"] > 0
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.name == "student" and loaded.model.config.channels == 4 and loaded.model.config.init_weights is None
    assert result["params"] == count_parameters(loaded.model) and result["pruning"]["channels_after"] == 4
    assert result["onnx"]["max_abs_diff"] <= 1e-4 and result["int8"]["bytes"] < result["onnx"]["bytes"]
    assert result["teacher_digest"] == load_model(str(tmp_path / "teacher")).digest

    def must_not_run(**_):
        raise AssertionError("teacher outputs recomputed although cached")

    settings = parse_distill_config(config).distill
    cached = ensure_teacher_outputs(teacher_uri=str(tmp_path / "teacher"), teacher_digest=result["teacher_digest"],
                                    data_uris=[shards], distill=settings, compute=must_not_run)
    assert cached["reused"] and cached["uri"] == result["cache_uri"]
