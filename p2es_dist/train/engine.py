"""DeepSpeed from a `train:` section: engine, LR schedule, checkpoints, consolidated fp32 weights.

Checkpoints are saved with a manifest of their files' hashes and loaded only after it checks out, and then
weights-only (`checkpoint_manifest`): resuming or consolidating never runs code from a checkpoint file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2es_dist.errors import UserError
from p2es_dist.train.checkpoint_manifest import load_tensors, verify_manifest, weights_only_loads, write_manifest
from p2es_dist.train.config import TrainSection

CHECKPOINT_TAG = "checkpoint"
TRAIN_STATE = "train_state.json"
# DeepSpeed compiles its CPU shared-memory all-reduce op on first use (seconds to a few minutes); a build
# lock older than this was left by a build that was killed, and torch would wait on it for ever.
STALE_BUILD_LOCK_S = 600.0

log = logging.getLogger("p2es.train")


class LossModule(nn.Module):
    """Wraps a model so DeepSpeed's engine(batch) runs `model.loss(batch)`: ZeRO-3 hooks see the call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(batch)


def use_bf16(train: TrainSection) -> bool:
    if train.precision == "bf16":
        return True
    if train.precision == "fp32":
        return False
    return train.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(train: TrainSection, *, batch_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config. bf16 goes through torch autocast so fp32 master weights and the
    diffusion schedule buffers stay fp32."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.deepspeed.zero_stage},
        "steps_per_print": 10**9,  # progress is ours to report, not DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    config.update(train.deepspeed.extra)
    return config


def lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from lr / warmup_steps to lr at step warmup_steps - 1, then cosine decay to 10 % of lr
    at max_steps and 10 % after (or constant lr after the warm-up)."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    warmup_steps = train.warmup_steps
    warmup = LinearLR(optimizer, start_factor=1.0 / max(1, warmup_steps), total_iters=max(0, warmup_steps - 1))
    if train.lr_schedule == "constant":
        return warmup  # LinearLR holds end_factor (1.0) once its iterations are done
    decay_steps = max(1, train.max_steps - warmup_steps)
    decay = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=0.1 * train.lr)
    # CosineAnnealingLR climbs back up after T_max; the floor holds 10 % should a run step past max_steps
    # (ConstantLR's factor lasts total_iters steps: practically for ever).
    floor = ConstantLR(optimizer, factor=0.1, total_iters=2**62)
    if not warmup_steps:
        return SequentialLR(optimizer, [decay, floor], milestones=[decay_steps])
    return SequentialLR(optimizer, [warmup, decay, floor], milestones=[warmup_steps, warmup_steps + decay_steps])


def clear_stale_build_locks(*, max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch-extension build locks older than `max_age_s`, warning for each; return them.

    torch's `FileBaton` waits without limit on the `lock` file of an extension being built. A build that was
    killed (Ctrl-C, a preempted node, a test timeout) leaves the file behind, and every later DeepSpeed
    start then hangs silently in `init_distributed`.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    removed = []
    # <root>/<extension>/lock with TORCH_EXTENSIONS_DIR, <root>/<py311_cpu>/<extension>/lock without
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = now - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed a stale build lock %s (%.0f min old): an earlier build of this op was "
                            "killed; it is rebuilt now", lock, age / 60)
        except FileNotFoundError:  # another process finished or removed it meanwhile
            continue
    return removed


def build_engine(model: nn.Module, train: TrainSection, *, batch_size: int):
    """A DeepSpeed engine around `LossModule(model)` with a plain torch AdamW (DeepSpeed itself still
    compiles its CPU communication op once per machine; see `clear_stale_build_locks`)."""
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    clear_stale_build_locks()
    import deepspeed

    wrapped = LossModule(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = lr_scheduler(optimizer, train)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, batch_size=batch_size, bf16=use_bf16(train)),
    )
    return engine


def save_training_checkpoint(engine, folder: str | Path, *, step: int, rank: int, world_size: int,
                             train_state: dict[str, Any] | None = None) -> None:
    """This rank's DeepSpeed files (and rank 0's `train_state.json`) into `folder`, then their manifest.

    Every rank calls it with its own folder (DeepSpeed's save is collective); Ray Train merges the folders.
    """
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"step": step})
    if train_state is not None and rank == 0:
        Path(folder, TRAIN_STATE).write_text(json.dumps(train_state))
    write_manifest(folder, rank=rank, world_size=world_size)


def _weights_only_engine(config):
    """DeepSpeed's torch checkpoint engine reading each file through `load_tensors` (weights-only, and a
    refusal names the file)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_tensors(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine(config)


def load_training_checkpoint(engine, folder: str | Path) -> int:
    """Resume `engine` from a merged checkpoint folder after verifying its manifest; returns its step."""
    verify_manifest(folder)
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    saving_engine = engine.checkpoint_engine
    if type(saving_engine) is not TorchCheckpointEngine:
        # Our configs never pick another engine; one would read files its own way, past the guard below.
        raise UserError(f"{folder}: resuming needs DeepSpeed's torch checkpoint engine, the config picked "
                        f"{type(saving_engine).__name__}")
    engine.checkpoint_engine = _weights_only_engine(engine._config)
    try:
        # Any torch.load DeepSpeed makes outside the checkpoint engine is forced weights-only too.
        with weights_only_loads():
            load_path, client_state = engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
    finally:
        engine.checkpoint_engine = saving_engine
    if load_path is None or not client_state or "step" not in client_state:
        raise UserError(f"{folder}: DeepSpeed found no {CHECKPOINT_TAG!r} checkpoint with a step to resume from")
    return int(client_state["step"])


def consolidated_state_dict(checkpoint_dir: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the bare model (no `model.` prefix) from a merged DeepSpeed checkpoint folder,
    verified against its manifest and read weights-only."""
    checkpoint_dir = Path(checkpoint_dir)
    verify_manifest(checkpoint_dir)
    if zero_stage == 0:
        # Stage 0 keeps whole fp32 weights with the module states; nothing is partitioned.
        states = load_tensors(checkpoint_dir / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():  # zero_to_fp32 asks torch.load for weights_only=False; this overrides it
            states = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
    return {key.removeprefix("model."): value.detach().float().contiguous() for key, value in states.items()}
