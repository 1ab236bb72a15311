"""What each Ray Train worker runs: resume, train with DeepSpeed, validate on `val`, checkpoint, report.

Checkpoints: every rank calls DeepSpeed's `save_checkpoint` into its own temporary folder and reports
it; Ray Train V2 merges the ranks' files into one checkpoint folder in storage, so ZeRO partitions of
every rank sit together and a restarted worker group reloads them with `load_checkpoint`. Each rank's folder
carries a manifest of its files' SHA-256 (`engine.save_training_checkpoint`); a resume verifies them all
and loads weights-only (`engine.load_training_checkpoint`), so a checkpoint file never runs code here.

Recovery: rank 0 drops an attempt marker in the run folder at every (re)start, so the driver counts
failures from storage, and `fault.kill_rank` kills that worker once, on the first attempt only.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from p2es_dist.storage import uri as uri_lib
from p2es_dist.train.config import SELECTION_METRIC
from p2es_dist.train.engine import build_engine, load_training_checkpoint, save_training_checkpoint, use_bf16
from p2es_dist.train.tracking import Tracker

# The loss part that is a model's reconstruction error, by preference: P2Es' x0 prediction, the
# regressors' (and student's) MSE, the foundation encoder's masked-patch reconstruction.
RECONSTRUCTION_PARTS = ("x0_mse", "mse", "recon")
# Training losses stay on the device until this many are pending (or a validation step comes): reading one
# back waits for the device, which every step would otherwise do for the tracker alone.
TRACKED_LOSSES_PER_SYNC = 25


def _batches(shard, job, *, training: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Endless epochs over a training shard (each epoch reshuffled), or one pass over validation."""
    from p2es_dist.data.loader import torch_batches

    epoch = 0
    while True:
        produced = False
        for batch in torch_batches(shard, job.data, training=training, epoch=epoch):
            produced = True
            yield batch
        if not training:
            return
        if not produced:
            raise RuntimeError("the train split yielded no batch: check data.uris and data.batch_size")
        epoch += 1


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _validate(engine, job, device: torch.device) -> dict[str, float]:
    """Mean loss (and its parts) over the val shard, summed across ranks. Seeded: the same every time.

    Also `SELECTION_METRIC` (`val_x0_mse`), what checkpoints and Tune trials are ranked by: the first of
    `RECONSTRUCTION_PARTS` the model reports; a model without one (the classifier) reports its loss.
    """
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    engine.eval()
    fork = torch.random.fork_rng(devices=[])
    totals: dict[str, float] = {}
    count = 0
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    with fork, torch.no_grad():
        torch.manual_seed(1234 + rank)  # diffusion losses draw t and noise: fix them so val numbers compare
        for i, batch in enumerate(_batches(shard, job, training=False)):
            if job.train.val_batches and i >= job.train.val_batches * world:
                break
            if i % world != rank:  # every rank holds the whole val split; each takes every world-th batch
                continue
            loss, parts = engine(_to_device(batch, device))
            n = len(batch["ecg"])
            totals["val_loss"] = totals.get("val_loss", 0.0) + float(loss) * n
            for name, value in parts.items():
                totals[f"val_{name}"] = totals.get(f"val_{name}", 0.0) + float(value) * n
            count += n
    engine.train()
    keys = sorted(totals)
    # On the worker's device: a GPU worker's process group is NCCL, which cannot reduce CPU tensors.
    summed = torch.tensor([totals[k] for k in keys] + [count], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(summed)
    if summed[-1] == 0:
        return {"val_loss": float("nan"), SELECTION_METRIC: float("nan")}
    metrics = {key: float(summed[i] / summed[-1]) for i, key in enumerate(keys)}
    reconstruction = [f"val_{part}" for part in RECONSTRUCTION_PARTS if f"val_{part}" in metrics]
    metrics[SELECTION_METRIC] = metrics[reconstruction[0] if reconstruction else "val_loss"]
    return metrics


def _record_attempt(run_uri: str, rank: int) -> int:
    """Rank 0 writes a marker per (re)start; every rank returns the attempt number (1 = first)."""
    attempts = uri_lib.join(run_uri, "attempts")
    if rank == 0:
        marker = {"time": time.time(), "pid": os.getpid()}
        uri_lib.write_text_atomic(uri_lib.join(attempts, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"),
                                  json.dumps(marker))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return len(uri_lib.ls(attempts, suffix=".json", missing_ok=True))


def _broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Data-driven initialisation ran on rank 0's batches: give every rank the same weights."""
    if torch.distributed.is_initialized():
        for tensor in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


def log_pending_losses(tracker, pending: list[tuple[int, torch.Tensor, float]]) -> None:
    """Log (step, loss on the device, lr) entries and empty the list: one device sync for all of them."""
    values = torch.stack([loss.float() for _, loss, _ in pending]).cpu().tolist()
    for (step, _, lr), value in zip(pending, values, strict=True):
        tracker.log_metrics({"train_loss": value, "lr": lr}, step)
    pending.clear()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from p2es_dist.models import build_model

    job = loop_config["job"]  # a train.config.JobConfig, parsed once on the driver
    run_uri = loop_config["run_uri"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, round(job.train.cpus_per_worker)))
    torch.manual_seed(job.train.seed + rank)
    device = torch.device("cuda", torch.cuda.current_device()) if job.train.use_gpu else torch.device("cpu")

    attempt = _record_attempt(run_uri, rank)
    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    model = build_model(job.model).to(device)
    train_shard = ray.train.get_dataset_shard("train")
    batches = _batches(train_shard, job, training=True)

    checkpoint = ray.train.get_checkpoint()
    affinity = None
    if checkpoint is None and hasattr(model, "init_affinity"):
        # Every rank pulls its first batches: a streaming split stalls when one reader lags the others.
        first = [next(batches) for _ in range(4)]
        if rank == 0:
            affinity = model.init_affinity([_to_device(b, device) for b in first], seed=job.train.seed)
        _broadcast_from_rank0(model)
        batches = itertools.chain(first, batches)
    engine = build_engine(model, job.train, batch_size=job.data.batch_size)

    step, restored_from = 0, None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = restored_from = load_training_checkpoint(engine, folder)
    # Rank 0's TensorBoard events (tracking.py). A restart purges what the failed attempt logged past `step`.
    tracker = Tracker.for_run(run_uri, tracking=job.train.tracking, tracking_dir=job.train.tracking_dir, rank=rank,
                              purge_step=step + 1 if restored_from is not None or attempt > 1 else None)
    tracker.log_config(job.as_dict(), step=step)

    last_log, begin, window_count = time.perf_counter(), time.perf_counter(), 0
    pending_losses: list[tuple[int, torch.Tensor, float]] = []
    while step < job.train.max_steps:
        if job.fault.kill_rank == rank and job.fault.at_step == step and attempt == 1:
            # Crash after the last checkpoint is registered with the controller, as a real crash some
            # steps later would: reports are processed asynchronously, so a crash right after one races it.
            ray.train.get_all_reported_checkpoints(timeout_s=60)
            print(f"[fault injection] rank {rank} kills itself at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        batch = _to_device(next(batches), device)
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        step += 1
        window_count += len(batch["ecg"])
        if tracker.enabled:
            pending_losses.append((step, loss.detach(), engine.get_lr()[0]))
        if rank == 0 and time.perf_counter() - last_log > 10:
            print(f"step {step}/{job.train.max_steps} loss {float(loss):.4f} lr {engine.get_lr()[0]:.2e}", flush=True)
            last_log = time.perf_counter()

        save = step % job.train.checkpoint_every == 0 or step == job.train.max_steps
        # Every checkpoint carries its validation numbers: checkpoints are kept and selected by them.
        evaluate = step % job.train.eval_every == 0 or save
        if pending_losses and (len(pending_losses) >= TRACKED_LOSSES_PER_SYNC or evaluate):
            log_pending_losses(tracker, pending_losses)
        if not (evaluate or save):
            continue
        metrics = {"step": step, "train_loss": float(loss), "restored_from_step": restored_from,
                   "attempt": attempt, "samples_per_s": window_count / (time.perf_counter() - begin),
                   "bf16": use_bf16(job.train)}
        if affinity is not None:
            metrics["affinity_initialised"] = bool(affinity.get("initialised"))
        if evaluate:
            metrics.update(_validate(engine, job, device))
        tracker.log_metrics({key: value for key, value in metrics.items() if key != "train_loss"}, step)
        if save:
            with tempfile.TemporaryDirectory() as folder:
                save_training_checkpoint(engine, folder, step=step, rank=rank, world_size=context.get_world_size(),
                                         train_state={"step": step, "model": job.model.as_dict(),
                                                      "zero_stage": job.train.deepspeed.zero_stage})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"step-{step:08d}")
            tracker.log_artifact("checkpoint", uri_lib.join(run_uri, f"step-{step:08d}"), step)
            tracker.sync()  # the events up to this checkpoint reach storage with it
        else:
            ray.train.report(metrics)
            tracker.flush()  # Tune's ASHA may stop a trial after any report: its local events are current
    tracker.close()
