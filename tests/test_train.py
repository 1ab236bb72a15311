"""Training: config errors name the key, every shipped config parses, and a killed worker resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from p2es_dist.config import load_config, packaged_config_path
from p2es_dist.errors import ConfigError
from p2es_dist.train.config import TrainSection, parse_job_config
from p2es_dist.train.engine import STALE_BUILD_LOCK_S, clear_stale_build_locks, lr_scheduler

SHIPPED = ["smoke", "p2es_bidmc", "unet_bidmc", "dct_bidmc", "li2021_bidmc", "p2es_lead2", "p2es_anysubset",
           "unet_anysubset", "classifier"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_training_config_parses(name):
    assert packaged_config_path(name).exists()
    job = parse_job_config(load_config(name))
    assert job.data.uris and job.train.max_steps >= 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_stepz=3", "train.max_stepz: unknown key"),
        ("train.deepspeed.zero_stage=5", "zero_stage must be 0, 1, 2 or 3"),
        ("model.name=transformer", "model.name: expected one of"),
        ("model.dilation_depth=deep", "model.dilation_depth: expected an integer"),
        ("fault.kill_rank=3", "fault.kill_rank: 3 but train.num_workers is 1"),
        ("trian.lr=1", "trian: unknown section"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_job_config(load_config("smoke", [override]))


def test_cli_config_error_is_one_line_without_traceback():
    done = subprocess.run([sys.executable, "-m", "p2es_dist.cli", "train", "--config", "smoke",
                           "--set", "train.max_stepz=3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "smoke: train.max_stepz: unknown key" in lines[0] and "Traceback" not in done.stderr


def test_lr_schedule_warms_up_then_decays():
    train = TrainSection(max_steps=100, warmup_steps=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = lr_scheduler(optimizer, train)
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"] / train.lr)
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False)) and factors[-1] >= 0.1


@pytest.fixture(scope="module")
def smoke_shards(ray_local, tmp_path_factory):
    from p2es_dist.data.ingest import run_ingest

    output = str(tmp_path_factory.mktemp("train") / "syn")
    run_ingest("synthetic", None, output, {"ingest": {"shard_rows": 512}, "synthetic": {"n_windows": 600, "seed": 2}})
    return output


def test_the_checkpoint_with_the_lowest_val_x0_mse_is_selected():
    from p2es_dist.train.trainer import select_checkpoint

    kept = [("a", {"step": 3, "val_x0_mse": 0.4, "val_loss": 0.1}),
            ("b", {"step": 6, "val_x0_mse": 0.2, "val_loss": 0.9}),
            ("c", {"step": 9, "val_x0_mse": float("nan")}),
            ("d", {"step": 12, "val_x0_mse": 0.2})]
    assert select_checkpoint(kept, "latest", {"step": 12})[0] == "d"  # a tie goes to the later step
    assert select_checkpoint(kept[:3], "latest", {"step": 12}) == ("b", kept[1][1])  # not the lowest val_loss
    assert select_checkpoint([("c", {"step": 9})], "latest", {"step": 9}) == ("latest", {"step": 9})
    assert select_checkpoint(None, "latest", None) == ("latest", {})


@pytest.mark.ray
def test_killed_worker_resumes_from_its_checkpoint(smoke_shards, tmp_path):
    """One worker, ZeRO-1: the worker kills itself at step 5, Ray Train restarts it from step 3."""
    from p2es_dist.models import build_model
    from p2es_dist.train.trainer import run_training

    config = load_config("smoke", [
        f"data.uris=[{smoke_shards}]", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=resume",
        "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=3", "train.deepspeed.zero_stage=1",
        "fault.kill_rank=0", "fault.at_step=5",
    ])
    summary = run_training(config, out=str(tmp_path / "out"))
    assert summary["steps"] == 6 and summary["failures"] == 1 and summary["restored_from_step"] == 3
    assert summary["val"]["val_loss"] == summary["val"]["val_loss"]  # a number, not NaN
    # Checkpoints are ranked by the validation x0 error (P2Es' `x0_mse` part), not the total loss.
    assert summary["val"]["val_x0_mse"] == summary["val"]["val_x0_mse"]
    assert summary["selected"]["metric"] == "val_x0_mse" and summary["selected"]["step"] in (3, 6)
    assert Path(summary["checkpoint"]).name == f"step-{summary['selected']['step']:08d}"
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["checkpoint"] == summary["checkpoint"] and Path(written["checkpoint"]).is_dir()
    # The consolidated fp32 weights load into a fresh model with every key and no pickle.
    state = load_file(summary["weights"])
    model = build_model(config["model"])
    assert set(state) == set(model.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model.load_state_dict(state)


def test_config_is_parsed_once_typed_and_handed_to_the_workers(monkeypatch):
    """The model section is typed by the registry without building a model, and the trainer hands the
    driver's JobConfig to the workers instead of a dict they would parse again."""
    from p2es_dist.models import registry
    from p2es_dist.models.unet import UNetConfig
    from p2es_dist.train import trainer

    built = []
    monkeypatch.setattr(registry, "build_model", lambda *a, **k: built.append(a))
    job = parse_job_config(load_config("unet_bidmc", ["model.use_template=false"]))
    assert built == [] and isinstance(job.model.config, UNetConfig) and job.model.name == "unet"
    assert job.model["name"] == "unet" and {**job.model}["kernel_size"] == job.model.config.kernel_size
    assert parse_job_config(job) is job

    parses = []
    monkeypatch.setattr(registry, "parse_model", lambda section: parses.append(section) or section)
    monkeypatch.setattr("p2es_dist.data.loader.training_datasets", lambda data: {})
    built_trainer = trainer.build_torch_trainer(job, name="once")
    assert parses == [] and built_trainer.train_loop_config["job"] is job


def test_a_build_lock_left_by_a_killed_op_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, caplog):
    """torch waits for ever on an extension's `lock`; one older than any build is removed (DeepSpeed's CPU op
    then rebuilds), one a build may still hold is left alone."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    old = stale.stat().st_mtime - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"kept")

    with caplog.at_level("WARNING", logger="p2es.train"):
        assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and live.exists()
    assert (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
    assert "stale build lock" in caplog.text
    assert clear_stale_build_locks() == []
