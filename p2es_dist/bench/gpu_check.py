"""One command that says whether this machine runs the GPU path: bf16, DeepSpeed, NCCL, Ray Train on a GPU.

    python -m p2es_dist.bench.gpu_check [--work DIR] [--timeout 900]      # or: infra/gpu_check.sh

One PASS / FAIL line per check; exit status 0 when all pass, 1 when any fails, 2 when torch sees no CUDA
device (nothing is checked then). Checks (docs/GPU.md):

  device       the GPUs torch sees, and bf16 support on each
  bench-train  `p2es bench train --device cuda --config gpu/smoke_1gpu`: one Ray Train + DeepSpeed worker
               (bf16 autocast, ZeRO-2) and a bare PyTorch loop, both on a GPU
  nccl         all-reduce of fp32 and bf16 tensors across 2 processes, one GPU each. With one GPU (two NCCL
               ranks cannot share a device) it checks a 1-rank NCCL all-reduce on it and a 2-process gloo
               all-reduce of tensors on it, and says that the 2-rank NCCL path went unchecked
  ray-zero2    `p2es train --config gpu/smoke_1gpu`: 50 steps of DeepSpeed ZeRO-2 in bf16 on 1 GPU worker through
               Ray Train, a checkpoint, its consolidated fp32 weights and a finite validation error

bench-train and ray-zero2 read synthetic shards that `p2es ingest --source synthetic` writes first into the
work folder (default: a new temporary folder, kept: it holds each step's log). Each of those runs in its own
process on a private local Ray (RAY_ADDRESS is unset for them): the check is of this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

CONFIG = "gpu/smoke_1gpu"
SYNTHETIC_WINDOWS = 1200  # ~960 train windows: 22 full batches of 32 for the bench, 2 val batches
BENCH_STEPS = 20
TRAIN_STEPS = 50  # gpu/smoke_1gpu's train.max_steps
ALLREDUCE_NUMEL = 1 << 22  # 16 MB of fp32: large enough for NCCL's ring kernels, not only its small-message path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def no_cuda_message() -> str | None:
    """Why this machine cannot run the checks, or None when torch sees a CUDA device."""
    if torch.cuda.is_available():
        return None
    build = torch.version.cuda or "none: a CPU-only torch wheel"
    return (f"no CUDA device: torch {torch.__version__} (CUDA build: {build}) sees no GPU, so nothing was checked. "
            "Run this on a machine with an NVIDIA GPU and a CUDA build of torch (docs/GPU.md).")


def check_device() -> Check:
    names = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    bf16 = torch.cuda.is_bf16_supported()
    return Check("device", bf16, f"{len(names)} GPU(s) [{'; '.join(names)}], CUDA {torch.version.cuda}, "
                 f"bf16 {'supported' if bf16 else 'NOT supported: the GPU configs ask for bf16'}")


# --- subprocess checks --------------------------------------------------------------------------------------

def _run(name: str, argv: list[str], work: Path, timeout_s: float) -> tuple[int | None, str]:
    """`python -m p2es_dist.cli <argv>` in `work`; (exit status or None on timeout, stdout). Output -> <name>.log."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["P2ES_LOG_DIR"] = str(work / "logs")
    log = work / f"{name}.log"
    command = [sys.executable, "-m", "p2es_dist.cli", *argv]
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        log.write_text(f"$ {' '.join(command)}\n(timed out after {timeout_s:.0f} s)\n{output}")
        return None, _text(exc.stdout)
    log.write_text(f"$ {' '.join(command)}\n(exit {done.returncode})\n{done.stdout}{done.stderr}")
    return done.returncode, done.stdout


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _failure(name: str, status: int | None, work: Path, timeout_s: float) -> Check:
    if status is None:
        return Check(name, False, f"timed out after {timeout_s:.0f} s (log: {work / f'{name}.log'})")
    lines = [line.strip() for line in (work / f"{name}.log").read_text().splitlines() if line.strip()]
    # The CLI's own one-line summary (`p2es <command>: error: ...`) first; Ray logs much else with "error" in it.
    ours = [line for line in lines if line.startswith("p2es ") and ": error: " in line]
    errors = [line for line in lines if "error" in line.lower()]
    last = (ours or errors or lines or [""])[-1]
    return Check(name, False, f"exit {status}: {last[:300]} (log: {work / f'{name}.log'})")


def _json_line(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def prepare_shards(work: Path, timeout_s: float) -> tuple[Check, str]:
    shards = work / "shards"
    status, _ = _run("shards", ["ingest", "--source", "synthetic", "--output", str(shards),
                                "--set", f"synthetic.n_windows={SYNTHETIC_WINDOWS}", "--set", "ingest.shard_rows=512"],
                     work, timeout_s)
    if status != 0:
        return _failure("shards", status, work, timeout_s), str(shards)
    return Check("shards", True, f"{SYNTHETIC_WINDOWS} synthetic windows in {shards}"), str(shards)


def judge_bench(result: dict | None) -> tuple[bool, str]:
    """`p2es bench train`'s JSON line: both sides ran on CUDA in bf16 and measured a rate."""
    if not result:
        return False, "no JSON result line on stdout"
    wrong = [f"{key}={result.get(key)!r} (expected {want!r})" for key, want in (("device", "cuda"), ("bf16", True))
             if result.get(key) != want]
    rates = [result.get("ray_deepspeed_samples_per_s"), result.get("torch_samples_per_s")]
    if not all(isinstance(rate, int | float) and rate > 0 for rate in rates):
        wrong.append(f"samples/s {rates}")
    if wrong:
        return False, "; ".join(wrong)
    return True, (f"Ray Train + DeepSpeed (ZeRO-{result.get('zero_stage')}, bf16) {rates[0]} samples/s, bare "
                  f"PyTorch {rates[1]} samples/s on {result.get('device')}")


def check_bench_train(work: Path, shards: str, timeout_s: float) -> Check:
    status, stdout = _run("bench-train", ["bench", "train", "--config", CONFIG, "--device", "cuda",
                                          "--steps", str(BENCH_STEPS), "--set", f"data.uris=[{shards}]"],
                          work, timeout_s)
    if status != 0:
        return _failure("bench-train", status, work, timeout_s)
    ok, detail = judge_bench(_json_line(stdout))
    return Check("bench-train", ok, detail)


def judge_training(summary: dict | None, *, steps: int) -> tuple[bool, str]:
    """`p2es train`'s result.json: all steps done in bf16 under ZeRO-2, weights written, finite val error."""
    if not summary:
        return False, "no result.json"
    value = (summary.get("val") or {}).get("val_x0_mse")
    wrong = [f"{key}={summary.get(key)!r} (expected {want!r})"
             for key, want in (("steps", steps), ("bf16", True), ("zero_stage", 2)) if summary.get(key) != want]
    if not (isinstance(value, int | float) and math.isfinite(value)):
        wrong.append(f"val_x0_mse={value!r}")
    weights = summary.get("weights")
    if not weights or not Path(str(weights).removeprefix("file://")).exists():
        wrong.append(f"weights {weights!r} not found")
    if wrong:
        return False, "; ".join(wrong)
    return True, f"{steps} steps, ZeRO-2, bf16, 1 GPU worker; val_x0_mse {value:.4f}; weights {weights}"


def check_ray_zero2(work: Path, shards: str, timeout_s: float) -> Check:
    out = work / "train"
    status, _ = _run("ray-zero2", ["train", "--config", CONFIG, "--set", f"data.uris=[{shards}]",
                                   "--set", f"train.storage_path={work / 'runs'}", "--out", str(out), "--fresh"],
                     work, timeout_s)
    if status != 0:
        return _failure("ray-zero2", status, work, timeout_s)
    result = out / "result.json"
    ok, detail = judge_training(json.loads(result.read_text()) if result.exists() else None, steps=TRAIN_STEPS)
    return Check("ray-zero2", ok, detail)


# --- all-reduce ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _allreduce_worker(rank: int, world: int, backend: str, port: int, numel: int, device_type: str,
                      dtypes: tuple[str, ...]) -> None:
    """One rank: sum (rank + 1) over the ranks for each dtype; raise unless every element is the expected sum."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # device_id binds NCCL's communicator to this GPU now (eager init) instead of at the first collective.
    bind = {"device_id": device} if backend == "nccl" and device.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120), **bind)
    try:
        expected = world * (world + 1) / 2  # small integers: exact in bf16 as in fp32
        for name in dtypes:
            tensor = torch.full((numel,), float(rank + 1), dtype=getattr(torch, name), device=device)
            dist.all_reduce(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wrong = int((tensor != expected).sum())
            if wrong:
                raise RuntimeError(f"rank {rank}: {backend} all-reduce of {name} on {device}: {wrong} of {numel} "
                                   f"elements differ from {expected}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_allreduce(world: int, backend: str, *, device_type: str = "cuda", dtypes: tuple[str, ...] = ("float32",),
                  numel: int = ALLREDUCE_NUMEL, timeout_s: float = 180.0) -> tuple[bool, str]:
    """`world` spawned processes all-reduce with `backend`; (ok, what went wrong). A hang is killed at timeout_s."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_allreduce_worker, args=(world, backend, _free_port(), numel, device_type, dtypes),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()  # our own children, stuck in a collective
                return False, f"{backend} x{world}: no result within {timeout_s:.0f} s (hung; try NCCL_DEBUG=INFO)"
    except Exception as exc:  # a rank raised or died: ProcessRaisedException / ProcessExitedException
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return False, f"{backend} x{world}: {lines[-1] if lines else type(exc).__name__}"
    return True, ""


def check_nccl(timeout_s: float) -> Check:
    gpus = torch.cuda.device_count()
    both = ("float32", "bfloat16")
    if gpus >= 2:
        ok, error = run_allreduce(2, "nccl", dtypes=both, timeout_s=timeout_s)
        return Check("nccl", ok, error or "2 processes on cuda:0 and cuda:1: fp32 and bf16 all-reduce exact")
    # Two NCCL ranks on one device fail ("Duplicate GPU detected"): check what one GPU can show.
    ok_nccl, error_nccl = run_allreduce(1, "nccl", dtypes=both, timeout_s=timeout_s)
    ok_gloo, error_gloo = run_allreduce(2, "gloo", dtypes=("float32",), timeout_s=timeout_s)
    errors = "; ".join(e for e in (error_nccl, error_gloo) if e)
    return Check("nccl", ok_nccl and ok_gloo, errors or (
        "1 GPU: 1-rank NCCL fp32 + bf16 all-reduce on cuda:0 and a 2-process gloo all-reduce of cuda:0 tensors "
        "exact; a 2-rank NCCL all-reduce needs 2 GPUs and was NOT checked"))


# --- main ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p2es_dist.bench.gpu_check",
                                description="PASS/FAIL checks of the GPU path on this machine (docs/GPU.md)")
    p.add_argument("--work", help="folder for the shards, runs and logs (default: a new temporary folder)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per check before it counts as failed")
    args = p.parse_args(argv)
    reason = no_cuda_message()
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="p2es-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: work folder {work}", flush=True)
    checks = [check_device()]
    print(checks[-1].line(), flush=True)
    prepared, shards = prepare_shards(work, args.timeout)
    if not prepared.ok:
        print(prepared.line(), flush=True)
    for run in (lambda: check_bench_train(work, shards, args.timeout), lambda: check_nccl(min(args.timeout, 300.0)),
                lambda: check_ray_zero2(work, shards, args.timeout)):
        checks.append(run())
        print(checks[-1].line(), flush=True)
    failed = [check.name for check in checks if not check.ok]
    print(f"gpu_check: {len(checks) - len(failed)} of {len(checks)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or not prepared.ok else 0


if __name__ == "__main__":
    sys.exit(main())
