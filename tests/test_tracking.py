"""Experiment tracking: the TensorBoard tracker (train/tracking.py), `p2es runs`, and a real run's curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.util import tensor_util

from p2es_dist.config import load_config
from p2es_dist.errors import ConfigError, UserError
from p2es_dist.storage import uri
from p2es_dist.train.config import parse_job_config
from p2es_dist.train.tracking import CONFIG_TAG, TEXT_SUFFIX, Tracker, events_uri


def accumulate(folder: str | Path) -> ea.EventAccumulator:
    accumulator = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def text(accumulator: ea.EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(event.step, tensor_util.make_ndarray(event.tensor_proto).reshape(-1)[0].decode())
            for event in accumulator.Tensors(tag + TEXT_SUFFIX)]


def fake_run(root: Path, name: str, *, lr: float, losses: list[float], val: float) -> None:
    """A run as the training loop logs it: config, a loss per step, a validation and a checkpoint at the end."""
    tracker = Tracker.for_run(str(root / name))
    tracker.log_config({"model": {"name": "p2es", "dilation_depth": 3},
                        "train": {"lr": lr, "seed": 0, "run_name": name, "use_gpu": False}})
    for step, loss in enumerate(losses, start=1):
        tracker.log_metrics({"train_loss": loss, "lr": lr}, step)
    tracker.log_metrics({"step": len(losses), "val_x0_mse": val, "val_loss": val * 2}, len(losses))
    tracker.log_artifact("checkpoint", str(root / name / f"step-{len(losses):08d}"), len(losses))
    tracker.close()


# --- the tracker ---------------------------------------------------------------------------------------------


def test_the_tracker_writes_exactly_the_scalars_config_and_artifacts_it_was_given(tmp_path):
    run = tmp_path / "runs" / "p2es-abc"
    tracker = Tracker.for_run(str(run))
    assert tracker.enabled and tracker.destination == str(run / "tensorboard")
    config = {"model": {"name": "p2es", "population": {"beat": list(range(300))}},
              "train": {"lr": 0.001, "use_gpu": False, "run_name": None, "deepspeed": {"zero_stage": 2}}}
    tracker.log_config(config)
    # Values exact in float32, as event files store them.
    for step, loss in ((1, 0.5), (2, 0.25), (3, 0.125)):
        tracker.log_metrics({"train_loss": loss, "lr": 0.0625}, step)
    tracker.log_metrics({"step": 3, "val_x0_mse": 0.75, "bf16": True, "restored_from_step": None, "note": "x"}, 3)
    tracker.log_artifact("checkpoint", "s3://b/runs/p2es-abc/step-00000003", 3)
    tracker.close()

    read = accumulate(run / "tensorboard")
    assert sorted(read.Tags()[ea.SCALARS]) == ["bf16", "lr", "train_loss", "val_x0_mse"]  # no step, None, text
    assert scalars(read, "train_loss") == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert scalars(read, "lr") == [(1, 0.0625), (2, 0.0625), (3, 0.0625)]
    assert scalars(read, "val_x0_mse") == [(3, 0.75)] and scalars(read, "bf16") == [(3, 1.0)]
    assert text(read, "p2es/artifacts/checkpoint") == [(3, "s3://b/runs/p2es-abc/step-00000003")]
    [(step, yaml_text)] = text(read, CONFIG_TAG)
    assert step == 0 and "    lr: 0.001" in yaml_text and "zero_stage: 2" in yaml_text
    assert "<" in yaml_text and "characters, elided>" in yaml_text  # the population's beat is not spelled out
    content = read.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.lr"].number_value == 0.001 and hparams["model.name"].string_value == "p2es"
    assert hparams["train.use_gpu"].string_value == "false" and hparams["train.run_name"].string_value == "null"
    assert hparams["train.deepspeed.zero_stage"].number_value == 2
    assert "_hparams_/session_end_info" in read.PluginTagToContent("hparams")


def test_a_resumed_run_replaces_the_steps_the_failed_attempt_logged_after_its_checkpoint(tmp_path):
    first = Tracker.for_run(str(tmp_path / "run"))
    for step in range(1, 6):  # checkpoint at 3, crash after 5
        first.log_metrics({"train_loss": float(step)}, step)
    first.close()
    second = Tracker.for_run(str(tmp_path / "run"), purge_step=4)  # what the loop passes resuming from 3
    for step in range(4, 7):
        second.log_metrics({"train_loss": 10.0 * step}, step)
    second.close()
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert scalars(accumulate(tmp_path / "run" / "tensorboard"), "train_loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_tracking_none_and_other_ranks_write_nothing(tmp_path):
    off, other_rank = Tracker.for_run(str(tmp_path / "off"), tracking="none"), Tracker.for_run(str(tmp_path), rank=1)
    for tracker in (off, other_rank):
        assert not tracker.enabled
        tracker.log_config({"train": {"lr": 1.0}})
        tracker.log_metrics({"train_loss": 1.0}, 1)
        tracker.log_artifact("checkpoint", "x", 1)
        tracker.sync()
        tracker.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="train.tracking: expected one of tensorboard, none, got 'wandb'"):
        Tracker.for_run(str(tmp_path), tracking="wandb")


def test_the_switch_is_a_checked_train_key_and_tracking_dir_gathers_runs_by_name():
    job = parse_job_config(load_config("smoke", ["train.tracking=none", "train.tracking_dir=s3://tb/all"]))
    assert job.train.tracking == "none" and job.train.tracking_dir == "s3://tb/all"
    assert parse_job_config(load_config("smoke")).train.tracking == "tensorboard"
    with pytest.raises(ConfigError, match="train.tracking: expected one of 'tensorboard', 'none'"):
        parse_job_config(load_config("smoke", ["train.tracking=wandb"]))
    assert events_uri("s3://b/runs/p2es-1") == "s3://b/runs/p2es-1/tensorboard"
    assert events_uri("s3://b/runs/p2es-1", "s3://tb/all") == "s3://tb/all/p2es-1"
    assert events_uri("/r/exp/train-abc_00001", "/tb") == "/tb/train-abc_00001"


def test_a_distillation_logs_its_numbers_and_artifacts_beside_its_stages(tmp_path):
    from p2es_dist.distill.config import DistillJob, DistillSection
    from p2es_dist.distill.run import track_distillation

    job = DistillJob(distill=DistillSection(teacher="t"), model={"name": "student"}, data={"uris": ["d"]},
                     train={"storage_path": str(tmp_path)}, source="test")
    summary = {"distill_steps": 4, "finetune_steps": 3, "val": {"val_loss": 0.5, "val_x0_mse": 0.25},
               "val_before_pruning": {"val_x0_mse": 0.125}, "params": 1000, "bytes": 4096,
               "pruning": {"channels_before": 8, "channels_after": 4, "checkpoint": "p/pruned"},
               "checkpoint": "p/ft/step-3", "weights": "p/ft/step-3/model.safetensors", "cache_uri": "c",
               "runs": ["p/tiny-distill", "p/tiny-finetune"], "onnx": {"uri": "p/onnx/model.onnx", "bytes": 2048,
                                                                        "max_abs_diff": 0.0},
               "config": {"distill": {"teacher": "t"}, "train": {"lr": 0.001}}}
    track_distillation(job, str(tmp_path / "tiny"), summary)
    read = accumulate(tmp_path / "tiny" / "tensorboard")
    assert scalars(read, "val_x0_mse") == [(7, 0.25)] and scalars(read, "before_pruning/val_x0_mse") == [(7, 0.125)]
    assert scalars(read, "pruning/channels_after") == [(7, 4.0)] and scalars(read, "onnx/bytes") == [(7, 2048.0)]
    assert text(read, "p2es/artifacts/onnx") == [(7, "p/onnx/model.onnx")]
    assert text(read, "p2es/artifacts/stage_run_1") == [(7, "p/tiny-finetune")]
    assert "teacher: t" in text(read, CONFIG_TAG)[0][1]


# --- p2es runs -----------------------------------------------------------------------------------------------


def test_runs_compares_two_runs_by_their_metrics_and_differing_config(tmp_path, capsys):
    from p2es_dist.jobs.runs import main

    root = tmp_path / "runs"
    fake_run(root, "slow", lr=0.001, losses=[1.0, 0.5, 0.75], val=0.5)
    fake_run(root, "fast", lr=0.004, losses=[1.0, 0.25, 0.125], val=0.375)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(root / "_train_driver_00000")) as foreign:  # as Ray Tune's own logger leaves
        foreign.add_scalar("ray/tune/val_x0_mse", 1.0, 1)

    assert main([str(root), "--plot", str(tmp_path / "curves.png"), "--out", str(tmp_path / "cmp")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "steps"] and "train.lr" in lines[0]
    assert "train.seed" not in lines[0] and "train.run_name" not in lines[0]  # equal everywhere / the run column
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["fast"][1] == "3" and rows["slow"][1] == "3"
    # final then best: train_loss, val_x0_mse; then the differing key
    assert rows["slow"][2:7] == ["0.75", "0.5", "0.5", "0.5", "0.001"]
    assert rows["fast"][2:7] == ["0.125", "0.125", "0.375", "0.375", "0.004"]
    assert any("1 event folder(s) not written by p2es" in line for line in lines)
    assert lines[-1] == f"TensorBoard: tensorboard --logdir {root}"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    records = {r["run"]: r for r in json.loads((tmp_path / "cmp" / "runs.json").read_text())}
    assert records["fast"]["artifacts"]["checkpoint"] == str(root / "fast" / "step-00000003")
    assert records["slow"]["config"]["model.dilation_depth"] == 3


def test_runs_says_when_there_is_nothing_to_compare(tmp_path):
    from p2es_dist.jobs.runs import main

    with pytest.raises(UserError, match="no such folder"):
        main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tracked runs under .*train.tracking=none"):
        main([str(tmp_path / "empty")])


def test_s3_events_reach_the_bucket_at_each_sync_and_runs_reads_them_there(s3_bucket, tmp_path, capsys):
    from p2es_dist.jobs.runs import main

    run = f"{s3_bucket}/runs/p2es-s3"
    tracker = Tracker.for_run(run)
    tracker.log_config({"train": {"lr": 0.001}})
    tracker.log_metrics({"train_loss": 0.5}, 1)
    tracker.sync()  # what the loop does at a checkpoint: a node lost after this keeps step 1
    [uploaded] = uri.ls(f"{run}/tensorboard")
    local = tmp_path / "copy"
    local.mkdir()
    (local / uploaded.rsplit("/", 1)[-1]).write_bytes(uri.read_bytes(uploaded))
    assert scalars(accumulate(local), "train_loss") == [(1, 0.5)]
    tracker.log_metrics({"train_loss": 0.25}, 2)
    tracker.close()
    assert uri.ls(f"{run}/tensorboard") == [uploaded]  # the same file, grown; the staging folder is gone
    assert main([f"{s3_bucket}/runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:4] == ["p2es-s3", "2", "0.25", "0.25"]
    assert out[-1].endswith(f"tensorboard --logdir {s3_bucket}/runs") and "S3_ENDPOINT=" in out[-1]


# --- a real run ----------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_a_tiny_training_run_leaves_its_curves_and_checkpoints_in_storage(ray_local, s3_bucket, tmp_path, capsys):
    """Smoke config, 4 steps, storage on S3: the events (uploaded by rank 0) hold every step's loss and lr,
    the validations Ray Train reported, the config and the checkpoint URIs; `p2es runs` reads them there."""
    from p2es_dist.data.ingest import run_ingest
    from p2es_dist.jobs.runs import main
    from p2es_dist.train.trainer import run_training

    shards = str(tmp_path / "syn")
    run_ingest("synthetic", None, shards, {"ingest": {"shard_rows": 256}, "synthetic": {"n_windows": 160, "seed": 3}})
    config = load_config("smoke", [f"data.uris=[{shards}]", f"train.storage_path={s3_bucket}/runs",
                                   "train.run_name=tracked", "train.max_steps=4", "train.eval_every=2",
                                   "train.checkpoint_every=2", "train.val_batches=1"])
    summary = run_training(config)

    events = f"{s3_bucket}/runs/tracked/tensorboard"
    local = tmp_path / "events"
    local.mkdir()
    for file in uri.ls(events):
        (local / file.rsplit("/", 1)[-1]).write_bytes(uri.read_bytes(file))
    read = accumulate(local)
    assert [step for step, _ in scalars(read, "train_loss")] == [1, 2, 3, 4]
    assert [step for step, _ in scalars(read, "lr")] == [1, 2, 3, 4]
    assert scalars(read, "train_loss")[-1][1] == pytest.approx(summary["train_loss"], rel=1e-6)
    assert [step for step, _ in scalars(read, "val_x0_mse")] == [2, 4]
    assert scalars(read, "val_x0_mse")[-1][1] == pytest.approx(summary["val"]["val_x0_mse"], rel=1e-6)
    checkpoints = [uri_ for _, uri_ in text(read, "p2es/artifacts/checkpoint")]
    assert checkpoints == [f"{s3_bucket}/runs/tracked/step-00000002", f"{s3_bucket}/runs/tracked/step-00000004"]
    assert summary["checkpoint"] in checkpoints
    assert "max_steps: 4" in text(read, CONFIG_TAG)[0][1]

    capsys.readouterr()  # what training printed
    assert main([f"{s3_bucket}/runs"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == ["tracked", "4"]
