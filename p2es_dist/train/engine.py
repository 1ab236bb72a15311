"""DeepSpeed from a `train:` section: engine, LR schedule, checkpoints, consolidated fp32 weights."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2es_dist.train.config import TrainSection

CHECKPOINT_TAG = "checkpoint"


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


def lr_factor(step: int, train: TrainSection) -> float:
    """Linear warm-up, then cosine decay to 10 % (or constant)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, train: TrainSection, *, batch_size: int):
    """A DeepSpeed engine around `LossModule(model)` with a plain torch AdamW (no op compilation)."""
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    wrapped = LossModule(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, batch_size=batch_size, bf16=use_bf16(train)),
    )
    return engine


def consolidated_state_dict(checkpoint_dir: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the bare model (no `model.` prefix) from a merged DeepSpeed checkpoint folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if zero_stage == 0:
        # Stage 0 keeps whole fp32 weights with the module states; nothing is partitioned.
        states = torch.load(checkpoint_dir / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        states = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
    return {key.removeprefix("model."): value.detach().float().contiguous() for key, value in states.items()}
