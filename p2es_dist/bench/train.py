"""One Ray Train + DeepSpeed worker vs. a bare single-process PyTorch loop, same model and batches.

    p2es bench train --config smoke [--steps 30] [--set data.uris=[s3://p2es-demo/synthetic]]
    p2es bench train --config gpu/smoke_1gpu --device cuda --set data.uris=[...]   # one GPU, bf16

The batches are read once through the loader and shared by both sides (through Ray's object store for
the worker), so only the training machinery differs. Each side times its step loop after two warm-up
steps, with the same number of torch threads; start-up is not part of either figure.

`--device cuda` (default: the config's `train.use_gpu`) puts both sides on a GPU: the worker asks Ray for
one, and the bare loop runs under the same bf16 autocast as DeepSpeed's `torch_autocast` when the config's
precision resolves to bf16 (`engine.use_bf16`). CUDA timings synchronise the device before reading the clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, connect_ray, parser

WARMUP = 2
DEVICES = ("cpu", "cuda")


def _collect_batches(job, n: int) -> list[dict[str, torch.Tensor]]:
    from p2es_dist.data.loader import model_space_dataset, torch_batches

    dataset = model_space_dataset(job.data, split="train", training=False)
    batches = []
    for batch in torch_batches(dataset, job.data, training=False):
        if len(batch["ecg"]) == job.data.batch_size:
            batches.append(batch)
        if len(batches) == n:
            return batches
    raise RuntimeError(f"only {len(batches)} full batches in the train split; lower --steps or data.batch_size")


def _on_device(batches: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Copied before timing on both sides, so host-to-device transfer is in neither figure."""
    return [{key: value.to(device) for key, value in batch.items()} for batch in batches]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock


def _time_steps(step_fn, batches, device: torch.device) -> float:
    """Samples per second over the batches after the warm-up steps."""
    for batch in batches[:WARMUP]:
        step_fn(batch)
    _sync(device)
    begin = time.perf_counter()
    for batch in batches[WARMUP:]:
        step_fn(batch)
    _sync(device)
    return sum(len(b["ecg"]) for b in batches[WARMUP:]) / (time.perf_counter() - begin)


def bare_torch(job, batches, device: torch.device | None = None, *, bf16: bool = False) -> float:
    from p2es_dist.models import build_model

    device = device or torch.device("cpu")
    torch.manual_seed(job.train.seed)
    model = build_model(job.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)
    batches = _on_device(batches, device)

    def step(batch):
        # As DeepSpeed's torch_autocast: bf16 matmuls and convolutions, fp32 weights and loss.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, batches, device)


def _worker(loop_config) -> float:
    import ray
    import ray.train.torch

    from p2es_dist.models import build_model
    from p2es_dist.train.engine import build_engine

    job = loop_config["job"]  # parsed once on the driver
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(job.train.seed)
    # The GPU Ray assigned to this worker; on the model before DeepSpeed wraps it, as train/loop.py does.
    device = ray.train.torch.get_device() if job.train.use_gpu else torch.device("cpu")
    batches = _on_device(ray.get(loop_config["batches"]), device)
    engine = build_engine(build_model(job.model).to(device), job.train, batch_size=job.data.batch_size)

    def step(batch):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    return _time_steps(step, batches, device)  # Train V2 hands rank 0's return value to the driver


def ray_deepspeed(job, batches, threads: int) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job, "batches": ray.put(batches),
                           "threads": threads},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=job.train.use_gpu, resources_per_worker={
            "CPU": job.train.cpus_per_worker, **({"GPU": 1} if job.train.use_gpu else {})}),
        run_config=ray.train.RunConfig(name=f"bench-train-{time.strftime('%Y%m%d-%H%M%S')}",
                                       storage_path=str(Path("runs").resolve())),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return float(result.return_value)


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es bench train", "one Ray Train + DeepSpeed worker vs a bare PyTorch loop")
    p.add_argument("--steps", type=int, default=30, help="timed steps per side (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--device", choices=DEVICES,
                   help="cpu or cuda (one GPU for each side; sets train.use_gpu); default: the config's train.use_gpu")
    args = p.parse_args(argv)
    args.config = args.config or "smoke"
    if args.device:
        args.overrides.append(f"train.use_gpu={'true' if args.device == 'cuda' else 'false'}")
    config = apply_common(args)
    from p2es_dist.train.config import parse_job_config
    from p2es_dist.train.engine import use_bf16

    job = parse_job_config(config)
    device = torch.device("cuda" if job.train.use_gpu else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda (train.use_gpu): torch {torch.__version__} sees no CUDA device "
                        f"(built for CUDA {torch.version.cuda}); use --device cpu")
    bf16 = use_bf16(job.train)
    torch.set_num_threads(args.threads)
    started = connect_ray()
    try:
        batches = _collect_batches(job, args.steps + WARMUP)
        torch_rate = bare_torch(job, batches, device, bf16=bf16)
        ray_rate = ray_deepspeed(job, batches, args.threads)
    finally:
        if started:
            from p2es_dist.jobs.common import stop_local_ray

            stop_local_ray()
    print(json.dumps({"bench": "train", "workers": 1, "model": job.model.name, "threads": args.threads,
                      "device": device.type, "bf16": bf16, "zero_stage": job.train.deepspeed.zero_stage,
                      "ray_deepspeed_samples_per_s": round(ray_rate, 2), "torch_samples_per_s": round(torch_rate, 2),
                      "ratio": round(ray_rate / torch_rate, 3)}))
    return 0
