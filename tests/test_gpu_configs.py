"""The GPU configs (p2es_dist/configs/gpu/), checked on CPU: no GPU has run them (docs/GPU.md).

Each config goes through the path its command takes (`p2es train|pretrain --config gpu/<name>`, or for the
student `p2es distill`'s `stage_config`), then through `engine.build_engine` with `deepspeed.initialize`
intercepted: the dict it would have received is checked, and resolved by DeepSpeed's own `DeepSpeedConfig`
at the config's world size. `trainer.build_torch_trainer` gives the Ray ScalingConfig. Each model runs one
forward/backward on CPU in fp32 and one under CPU bf16 autocast; the ZeRO-2 + bf16 engine of gpu/smoke_1gpu
(what the GPU check trains) runs a few real steps on DeepSpeed's CPU accelerator. Last, the GPU check
itself, as far as a CPU goes.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from p2es_dist.config import load_config
from p2es_dist.models import build_model
from p2es_dist.models.base import count_parameters
from p2es_dist.train.config import JobConfig, parse_job_config

REPO = Path(__file__).resolve().parents[1]
GPU_DIR = Path(str(resources.files("p2es_dist") / "configs" / "gpu"))
CONFIGS = sorted(path.stem for path in GPU_DIR.glob("*.yaml"))
MODELS = ("p2es", "unet", "li2021", "dct", "classifier", "encoder", "student")
# The CPU config each GPU config scales up, and the model keys it may change (network size only).
CPU_TWIN = {"p2es": ("p2es_bidmc", {"hidden_channels", "embed_dim", "dilation_depth", "cascades"}),
            "unet": ("unet_bidmc", set()), "li2021": ("li2021_bidmc", set()), "dct": ("dct_bidmc", set()),
            "classifier": ("classifier", set()), "encoder": ("pretrain_tiny", {"size"}),
            "student": ("distill", set()), "smoke": ("smoke", set())}
DATA_KEYS_FOR_HARDWARE = {"batch_size", "shuffle_buffer", "prefetch_batches"}
ZERO2_MIN_PARAMETERS = 1_000_000  # the configs' rule: ZeRO-2 on 8 GPUs from 1 M parameters, else plain DP


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

def world_of(name: str) -> int:
    return 8 if name.endswith("_8gpu") else 1


def header(name: str) -> str:
    lines = (GPU_DIR / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def command_config(name: str) -> dict:
    """The config dict its command hands to `run_training` (and so to every worker)."""
    config = load_config(f"gpu/{name}")
    if "distill" in config:
        from p2es_dist.distill.config import parse_distill_config
        from p2es_dist.distill.run import stage_config

        job = parse_distill_config(load_config(f"gpu/{name}", ["distill.teacher=runs/teacher"]))
        return stage_config(job, model=job.model, data_uri="runs/teacher_outputs/key", run_name="student-distill")
    if config["model"]["name"] == "encoder":
        from p2es_dist.jobs.pretrain import check_encoder_config

        check_encoder_config(config)  # `p2es pretrain` refuses any other model
    return config


def synthetic_batch(n: int = 2, *, teacher: bool = False) -> dict[str, torch.Tensor]:
    """`n` synthetic windows converted as the loader converts them (templates, upstrokes and all)."""
    from p2es_dist.data.loader import convert_block
    from p2es_dist.data.sources.synthetic import SyntheticConfig, generate

    arrays = convert_block(generate(SyntheticConfig(n_windows=n, seed=3), chunk_index=0, chunk_size=n))
    batch = {key: torch.from_numpy(np.array(value)) for key, value in arrays.items()}
    batch = {key: value.float() if value.dtype == torch.float16 else value for key, value in batch.items()}
    if teacher:
        batch["teacher_ecg"] = batch["ecg"] * 0.9  # distillation shards carry the teacher's output
    return batch


def test_one_1gpu_and_one_8gpu_config_per_model():
    assert {f"{model}_{size}" for model in MODELS for size in ("1gpu", "8gpu")} | {"smoke_1gpu"} == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_deepspeed_config_is_bf16_with_the_stated_batch_and_zero_stage(name, monkeypatch):
    import deepspeed
    import deepspeed.runtime.config as ds_config

    from p2es_dist.train.engine import build_engine

    job = parse_job_config(command_config(name))
    world = world_of(name)
    assert job.train.use_gpu and job.train.precision == "bf16" and job.train.num_workers == world
    torch.manual_seed(0)
    model = build_model(job.model)
    seen = {}

    def initialize(*, model, optimizer, lr_scheduler, config):
        seen.update(config=config, optimizer=optimizer)
        return None, optimizer, None, lr_scheduler

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    build_engine(model, job.train, batch_size=job.data.batch_size)  # what train/loop.py calls on each worker
    config = seen["config"]
    assert isinstance(seen["optimizer"], torch.optim.AdamW)  # on DeepSpeed's ZeRO-supported list
    # bf16 by torch autocast; no DeepSpeed bf16/fp16 section, so master weights and optimizer state stay fp32.
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in config and "fp16" not in config
    assert config["train_micro_batch_size_per_gpu"] == job.data.batch_size
    assert config["gradient_accumulation_steps"] == job.train.grad_accum
    assert config["gradient_clipping"] == job.train.grad_clip == 1.0

    stage = config["zero_optimization"]["stage"]
    if name == "smoke_1gpu":
        expected_stage = 2  # the GPU check runs the ZeRO-2 code path on one GPU on purpose
    elif world == 1:
        expected_stage = 0
    else:
        expected_stage = 2 if count_parameters(model) >= ZERO2_MIN_PARAMETERS else 0
    assert stage == expected_stage == job.train.deepspeed.zero_stage
    assert f"ZeRO stage {stage}" in header(name)

    # DeepSpeed's own reading of the dict, on `world` ranks.
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *args, **kwargs: world)
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *args, **kwargs: 0)
    resolved = ds_config.DeepSpeedConfig(config)
    effective = job.data.batch_size * job.train.grad_accum * world
    assert resolved.world_size == world and resolved.train_batch_size == effective
    assert resolved.zero_optimization_stage == stage and resolved.gradient_clipping == 1.0
    assert resolved.torch_autocast_enabled and resolved.torch_autocast_dtype == torch.bfloat16
    assert not resolved.bfloat16_config.enabled and not resolved.float16_config.enabled
    stated = re.search(r"Effective batch: (\d+).*?micro batch (\d+) x grad_accum (\d+) x (\d+) worker", header(name),
                       re.S)
    assert stated and [int(g) for g in stated.groups()] == [effective, job.data.batch_size, job.train.grad_accum,
                                                             world]


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_scaling_config_asks_one_gpu_per_worker(name, monkeypatch, tmp_path):
    from ray.train.torch import TorchConfig

    import p2es_dist.data.calibration
    import p2es_dist.data.loader
    from p2es_dist.train.trainer import build_torch_trainer

    # No shards here: the datasets and the population template (read from data.uris) are left out.
    monkeypatch.setattr(p2es_dist.data.loader, "training_datasets", lambda config: {})
    monkeypatch.setattr(p2es_dist.data.calibration, "population_from_shards", lambda uris: None)
    config = command_config(name)
    config["train"]["storage_path"] = str(tmp_path)
    trainer = build_torch_trainer(config)  # built, not fitted: no GPU is asked of the cluster
    scaling = trainer.scaling_config
    world, cpus = world_of(name), config["train"]["cpus_per_worker"]
    assert scaling.num_workers == world and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": cpus, "GPU": 1}
    # Host CPUs left to Ray Data as the headers say: 4 of 8 on one GPU, 32 of 96 on 8 GPUs.
    assert world * cpus <= {1: 4, 8: 64}[world]
    assert isinstance(trainer.backend_config, TorchConfig) and trainer.backend_config.backend == "nccl"
    worker_job = trainer.train_loop_config["job"]  # the workers get the driver's parsed job, not a dict
    assert isinstance(worker_job, JobConfig) and worker_job.model.name == config["model"]["name"]
    assert worker_job.train.use_gpu and worker_job.train.precision == "bf16"


@pytest.mark.parametrize("model", MODELS)
def test_1gpu_and_8gpu_train_the_same_model_on_the_same_data(model):
    one, eight = (command_config(f"{model}_{size}") for size in ("1gpu", "8gpu"))
    assert one["model"] == eight["model"]
    assert {k: v for k, v in one["data"].items() if k not in DATA_KEYS_FOR_HARDWARE} == \
        {k: v for k, v in eight["data"].items() if k not in DATA_KEYS_FOR_HARDWARE}


@pytest.mark.parametrize("model", [*MODELS, "smoke"])
def test_gpu_config_keeps_its_cpu_twins_model_and_data(model):
    """A change to a CPU config's model or data fails here until its GPU configs follow."""
    twin, size_keys = CPU_TWIN[model]
    cpu, gpu = load_config(twin), load_config(f"gpu/{model}_1gpu")
    changed = {key for key in set(cpu["model"]) | set(gpu["model"]) if cpu["model"].get(key) != gpu["model"].get(key)}
    assert changed <= size_keys
    assert {k: v for k, v in cpu["data"].items() if k not in DATA_KEYS_FOR_HARDWARE} == \
        {k: v for k, v in gpu["data"].items() if k not in DATA_KEYS_FOR_HARDWARE}
    if "distill" in cpu:
        scaled = {"actors", "teacher_batch_size", "cpus_per_actor", "gpus_per_actor", "finetune_steps"}
        assert {k: v for k, v in cpu["distill"].items() if k not in scaled} == \
            {k: v for k, v in gpu["distill"].items() if k not in scaled}


def one_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, bf16: bool) -> set[torch.dtype]:
    """loss + backward (under CPU bf16 autocast when asked); checks it is finite, returns conv/linear output dtypes."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda module, args, out: seen.add(out.dtype)) for m in model.modules()
             if isinstance(m, torch.nn.Conv1d | torch.nn.Linear)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, parts = model.loss(batch)
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert math.isfinite(loss.item()) and all(math.isfinite(float(v)) for v in parts.values())
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.norm()) for g in grads) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return seen


SINGLE = [name for name in CONFIGS if not name.endswith("_8gpu")]  # the 8-GPU twins build the same models


@pytest.mark.parametrize("name", SINGLE)
def test_model_builds_and_trains_one_step_on_cpu_in_fp32(name):
    job = parse_job_config(command_config(name))
    torch.manual_seed(0)
    assert one_step(build_model(job.model), synthetic_batch(2, teacher=job.data.teacher_ecg), bf16=False) == \
        {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("name", SINGLE)
def test_every_op_of_the_model_takes_bf16_autocast(name):
    """What CPU autocast can say about bf16 (its op lists are close to CUDA's, not equal): no op refuses bf16
    inputs and the loss stays finite. At the CPU twin's network size (`CPU_TWIN`): the same ops, cheaper."""
    job = parse_job_config(command_config(name))
    twin, size_keys = CPU_TWIN[name.rsplit("_", 1)[0]]
    small = load_config(twin)["model"]
    torch.manual_seed(0)
    model = build_model({**job.model, **{key: small[key] for key in size_keys}})
    assert torch.bfloat16 in one_step(model, synthetic_batch(2, teacher=job.data.teacher_ecg), bf16=True)


ENGINE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import torch
    torch.set_num_threads(1)
    from test_gpu_configs import synthetic_batch
    from p2es_dist.config import load_config
    from p2es_dist.models import build_model
    from p2es_dist.train.config import parse_job_config
    from p2es_dist.train.engine import build_engine

    # gpu/smoke_1gpu as the GPU check trains it (bf16 autocast, ZeRO-2), on DeepSpeed's CPU accelerator.
    job = parse_job_config(load_config("gpu/smoke_1gpu", ["train.use_gpu=false", "data.batch_size=4"]))
    torch.manual_seed(0)
    model = build_model(job.model)
    outputs = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv1d))
    conv.register_forward_hook(lambda module, args, out: outputs.append(str(out.dtype)))
    before = [p.detach().clone() for p in model.parameters()]
    engine = build_engine(model, job.train, batch_size=job.data.batch_size)
    batch = synthetic_batch(4)
    losses = []
    for _ in range(3):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    print("RESULT " + json.dumps({"losses": losses, "conv_out": sorted(set(outputs)), "changed": changed,
          "params": len(before), "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
          "stage": engine.zero_optimization_stage(), "train_batch": engine.train_batch_size()}))
""")


@pytest.mark.slow
def test_zero2_bf16_engine_of_the_gpu_check_steps_on_cpu():
    """DeepSpeed accepts the dict and steps: autocast gives bf16 convolutions, weights stay fp32 and move.
    A subprocess, so DeepSpeed's process group and DS_ACCELERATOR stay out of this one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(port), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["stage"] == 2 and result["train_batch"] == 4
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert result["conv_out"] == ["torch.bfloat16"] and result["param_dtypes"] == ["torch.float32"]
    assert result["changed"] > result["params"] // 2


# --- the GPU check, as far as a CPU goes -------------------------------------------------------------------

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check would really run")


@no_gpu
def test_gpu_check_without_cuda_says_so_and_exits_2(capsys):
    from p2es_dist.bench.gpu_check import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "nothing was checked" in err and torch.__version__ in err


@no_gpu
def test_gpu_check_script_without_cuda_exits_2():
    done = subprocess.run(["bash", str(REPO / "infra" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gpu_check: no CUDA device" in done.stderr and "PASS" not in done.stdout


@no_gpu
def test_bench_train_on_cuda_without_cuda_is_a_user_error():
    from p2es_dist.bench.train import main
    from p2es_dist.errors import UserError

    with pytest.raises(UserError, match="--device cuda .* sees no CUDA device"):
        main(["--config", "gpu/smoke_1gpu", "--device", "cuda"])


@pytest.mark.slow
def test_allreduce_harness_sums_across_two_processes_and_reports_failures():
    """The nccl check's harness with gloo on CPU tensors (fp32 and bf16); NCCL on CPU tensors must fail."""
    from p2es_dist.bench.gpu_check import run_allreduce

    assert run_allreduce(2, "gloo", device_type="cpu", dtypes=("float32", "bfloat16"), numel=4096) == (True, "")
    ok, error = run_allreduce(1, "nccl", device_type="cpu", numel=16, timeout_s=120)
    assert not ok and error.startswith("nccl x1: ")


def test_gpu_check_judges_results():
    from p2es_dist.bench.gpu_check import judge_bench, judge_training

    bench = {"device": "cuda", "bf16": True, "zero_stage": 2, "ray_deepspeed_samples_per_s": 900.0,
             "torch_samples_per_s": 1000.0}
    assert judge_bench(bench)[0]
    assert judge_bench({**bench, "bf16": False}) == (False, "bf16=False (expected True)")
    assert not judge_bench({**bench, "device": "cpu"})[0] and not judge_bench(None)[0]
    assert not judge_bench({**bench, "torch_samples_per_s": 0})[0]
    weights = Path(__file__)  # any existing file
    summary = {"steps": 50, "bf16": True, "zero_stage": 2, "val": {"val_x0_mse": 0.02}, "weights": str(weights)}
    assert judge_training(summary, steps=50)[0]
    assert not judge_training({**summary, "steps": 49}, steps=50)[0]
    assert not judge_training({**summary, "zero_stage": 0}, steps=50)[0]
    assert not judge_training({**summary, "val": {"val_x0_mse": float("nan")}}, steps=50)[0]
    assert not judge_training({**summary, "weights": str(weights) + ".missing"}, steps=50)[0]
