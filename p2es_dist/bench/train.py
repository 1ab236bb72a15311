"""One Ray Train + DeepSpeed worker vs. a bare single-process PyTorch loop, same model and batches.

    p2es bench train --config smoke [--steps 30] [--set data.uris=[s3://p2es-demo/synthetic]]

The batches are read once through the loader and shared by both sides (through Ray's object store for
the worker), so only the training machinery differs. Each side times its step loop after two warm-up
steps, with the same number of torch threads; start-up is not part of either figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from p2es_dist.jobs.common import apply_common, connect_ray, parser

WARMUP = 2


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


def _time_steps(step_fn, batches) -> float:
    """Samples per second over the batches after the warm-up steps."""
    for batch in batches[:WARMUP]:
        step_fn(batch)
    begin = time.perf_counter()
    for batch in batches[WARMUP:]:
        step_fn(batch)
    return sum(len(b["ecg"]) for b in batches[WARMUP:]) / (time.perf_counter() - begin)


def bare_torch(job, batches) -> float:
    from p2es_dist.models import build_model

    torch.manual_seed(job.train.seed)
    model = build_model(job.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)

    def step(batch):
        loss, _ = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, batches)


def _worker(loop_config) -> float:
    import ray

    from p2es_dist.models import build_model
    from p2es_dist.train.config import parse_job_config
    from p2es_dist.train.engine import build_engine

    job = parse_job_config(loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(job.train.seed)
    batches = ray.get(loop_config["batches"])
    engine = build_engine(build_model(job.model), job.train, batch_size=job.data.batch_size)

    def step(batch):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    return _time_steps(step, batches)  # Train V2 hands rank 0's return value to the driver


def ray_deepspeed(job, batches, threads: int) -> float:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": {**job.as_dict(), "_source": job.source}, "batches": ray.put(batches),
                           "threads": threads},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": job.train.cpus_per_worker}),
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
    args = p.parse_args(argv)
    args.config = args.config or "smoke"
    config = apply_common(args)
    from p2es_dist.train.config import parse_job_config

    job = parse_job_config(config)
    torch.set_num_threads(args.threads)
    started = connect_ray()
    try:
        batches = _collect_batches(job, args.steps + WARMUP)
        torch_rate = bare_torch(job, batches)
        ray_rate = ray_deepspeed(job, batches, args.threads)
    finally:
        if started:
            from p2es_dist.jobs.common import stop_local_ray

            stop_local_ray()
    print(json.dumps({"bench": "train", "workers": 1, "model": job.model["name"], "threads": args.threads,
                      "ray_deepspeed_samples_per_s": round(ray_rate, 2), "torch_samples_per_s": round(torch_rate, 2),
                      "ratio": round(ray_rate / torch_rate, 3)}))
    return 0
