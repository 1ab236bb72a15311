"""The LR schedule built from torch's schedulers gives, step by step, the warm-up + cosine formula it replaced,
also across a checkpoint resume."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from p2es_dist.train.config import TrainSection
from p2es_dist.train.engine import lr_scheduler


def old_lr_factor(step: int, train: TrainSection) -> float:
    """The hand-written LambdaLR factor the schedulers replaced, verbatim."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(train: TrainSection) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=train.lr)


def _lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


CASES = [(0, 10), (1, 10), (2, 6), (10, 100), (50, 1000), (100, 50), (7, 7), (0, 1)]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize(("warmup_steps", "max_steps"), CASES)
def test_schedule_matches_the_old_formula_at_every_step(schedule, warmup_steps, max_steps):
    train = TrainSection(lr=3e-4, lr_schedule=schedule, warmup_steps=warmup_steps, max_steps=max_steps)
    optimizer = _optimizer(train)
    # Past max_steps too: the old formula holds 10 % there, where a bare cosine would climb back up.
    got = _lrs(optimizer, lr_scheduler(optimizer, train), max_steps + 25)
    want = [train.lr * old_lr_factor(step, train) for step in range(max_steps + 25)]
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("resume_at", [3, 10, 60, 130])
def test_schedule_resumes_from_a_saved_state(resume_at):
    train = TrainSection(lr=1e-3, warmup_steps=10, max_steps=120)
    optimizer = _optimizer(train)
    scheduler = lr_scheduler(optimizer, train)
    first = _lrs(optimizer, scheduler, resume_at)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # resuming reads checkpoints weights-only
    optimizer = _optimizer(train)
    scheduler = lr_scheduler(optimizer, train)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rest = _lrs(optimizer, scheduler, 140 - resume_at)
    assert first + rest == pytest.approx([train.lr * old_lr_factor(step, train) for step in range(140)], rel=1e-12)


RESUME_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    import torch
    from p2es_dist.train.config import TrainSection
    from p2es_dist.train.engine import build_engine, load_training_checkpoint, save_training_checkpoint

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def loss(self, batch):
            return self.linear(batch["x"]).square().mean(), {}

    train = TrainSection(max_steps=12, warmup_steps=4, lr=3e-4, use_gpu=False, precision="fp32")
    train.deepspeed.zero_stage = int(sys.argv[2])

    def run(engine, steps):
        lrs = []
        for _ in range(steps):
            lrs.append(engine.get_lr()[0])
            loss, _ = engine({"x": torch.randn(2, 3)})
            engine.backward(loss)
            engine.step()
        return lrs

    engine = build_engine(Model(), train, batch_size=2)
    first = run(engine, 6)
    folder = tempfile.mkdtemp()
    save_training_checkpoint(engine, folder, step=6, rank=0, world_size=1)
    resumed = build_engine(Model(), train, batch_size=2)
    step = load_training_checkpoint(resumed, folder)
    print("RESULT " + json.dumps({"step": step, "lrs": first + run(resumed, 6)}))
""")


@pytest.mark.slow
def test_deepspeed_checkpoint_resume_keeps_the_schedule():
    """DeepSpeed saves and restores the scheduler state (and, under ZeRO-2, the partitioned optimizer's
    current LR the cosine phase steps from); the resumed engine continues the same LRs. A subprocess, so
    the single-rank process group DeepSpeed opens does not outlive the test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(port), "2"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    train = TrainSection(max_steps=12, warmup_steps=4, lr=3e-4)
    assert result["step"] == 6
    assert result["lrs"] == pytest.approx([train.lr * old_lr_factor(step, train) for step in range(12)], rel=1e-12)
