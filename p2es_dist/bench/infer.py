"""Student (ONNX Runtime) vs teacher (PyTorch, few-step sampler) per-window latency on one CPU thread.

    p2es bench infer --model bundles/p2es-student --teacher runs/p2es-.../step-00001000 [--steps 10]

`--model` is a bundle with `model.onnx` (as `p2es export` writes) or a student checkpoint, which is
exported to ONNX in a temporary folder first. Both sides run on the same synthetic PPG windows in this
process with `torch.set_num_threads(1)` and ONNX Runtime `intra_op_num_threads=1`; each side's
figure is the best of `--repeats` timed passes after a warm-up. Prints one JSON line (README "Benchmarks";
its keys are those `main` writes).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from p2es_dist.constants import LABELS, N_LEADS
from p2es_dist.jobs.common import apply_common, parser
from p2es_dist.models.base import Batch


def ppg_batch(ppg: torch.Tensor) -> Batch:
    """A model batch with PPG only (no leads, unknown demographics), as a watch would give."""
    n = len(ppg)
    return {"ppg": ppg, "ppg_mask": torch.ones(n, dtype=torch.bool),
            "ecg": torch.zeros(n, N_LEADS, ppg.shape[-1]), "ecg_mask": torch.zeros(n, N_LEADS, dtype=torch.bool),
            "age": torch.full((n,), float("nan")), "sex": torch.full((n,), -1, dtype=torch.int64),
            "labels": torch.zeros(n, len(LABELS)), "subject": torch.zeros(n, dtype=torch.int64),
            "scale": torch.ones(n)}


def best_seconds(run: Callable[[], object], *, repeats: int) -> float:
    run()  # warm-up: allocations, ORT's first-run graph work
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - begin)
    return best


def student_onnx(model_uri: str, model: torch.nn.Module, scratch: Path) -> Path:
    """The bundle's model.onnx (copied locally), or a fresh export of the checkpoint."""
    from p2es_dist.export.onnx_io import export_onnx
    from p2es_dist.storage import uri as uri_lib

    bundled = uri_lib.join(model_uri, "model.onnx")
    if uri_lib.exists(bundled):
        path = scratch / "model.onnx"
        path.write_bytes(uri_lib.read_bytes(bundled))
        return path
    return export_onnx(model, scratch / "model.onnx")


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es bench infer", "student (ONNX Runtime) vs teacher sampler latency, one CPU thread", config=False)
    p.add_argument("--model", required=True, help="student bundle (with model.onnx) or student checkpoint")
    p.add_argument("--teacher", required=True, help="teacher checkpoint / bundle URI")
    p.add_argument("--windows", type=int, default=64, help="student windows per timed pass")
    p.add_argument("--batch-size", type=int, default=16, help="student windows per ONNX call")
    p.add_argument("--teacher-windows", type=int, default=2, help="teacher windows per timed pass")
    p.add_argument("--sampler", help="teacher sampler (default: the bundle's generation section, else ddim)")
    p.add_argument("--steps", type=int, help="teacher sampler steps (default: bundle's, else the model's own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-int8", action="store_true", help="skip the int8-weight ONNX copy")
    args = p.parse_args(argv)
    apply_common(args)

    from p2es_dist.export.onnx_io import example_ppg, onnx_max_abs_diff, onnx_session, run_onnx
    from p2es_dist.export.quantize import quantize_int8
    from p2es_dist.models.base import GenerationOptions
    from p2es_dist.models.checkpoint import WEIGHTS, load_model
    from p2es_dist.storage import uri as uri_lib

    torch.set_num_threads(1)
    student = load_model(args.model)
    teacher = load_model(args.teacher)
    ppg = example_ppg(args.windows, seed=0)
    report: dict[str, object] = {"bench": "infer"}
    with tempfile.TemporaryDirectory() as scratch:
        onnx_paths = {"fp32": student_onnx(args.model, student.model, Path(scratch))}
        if not args.no_int8:
            onnx_paths["int8"] = quantize_int8(onnx_paths["fp32"], Path(scratch) / "model.int8.onnx")
        timings = {}
        for kind, path in onnx_paths.items():
            session = onnx_session(path, threads=1)
            chunks = [ppg[i : i + args.batch_size].numpy() for i in range(0, len(ppg), args.batch_size)]
            seconds = best_seconds(lambda s=session, c=chunks: [run_onnx(s, x) for x in c], repeats=args.repeats)
            timings[kind] = 1000 * seconds / len(ppg)
            report_key = "student" if kind == "fp32" else "int8"
            report[f"{report_key}_onnx_bytes"] = path.stat().st_size
            report[f"{report_key}_diff"] = onnx_max_abs_diff(student.model, path, ppg[: args.batch_size])
    with torch.no_grad():
        torch_seconds = best_seconds(lambda: student.model.forward_ppg(ppg[: args.batch_size]), repeats=args.repeats)

    generation = dict(teacher.metadata.get("generation") or {})
    default_steps = getattr(getattr(teacher.model, "config", None), "sample_steps", None)
    steps = args.steps or generation.get("steps") or default_steps
    # Resolved by the model: a deterministic teacher (a regressor) has no sampler, and records None for both.
    options = teacher.model.generation_options(
        GenerationOptions(seed=0, sampler=args.sampler or generation.get("sampler") or "ddim", steps=steps))
    teacher_batch = ppg_batch(ppg[: args.teacher_windows])
    with torch.no_grad():
        teacher_seconds = best_seconds(lambda: teacher.model.generate(teacher_batch, options),
                                       repeats=max(1, min(args.repeats, 2)))
    teacher_ms = 1000 * teacher_seconds / args.teacher_windows

    student_ms = timings["fp32"]
    report.update({
        "student_ms_per_window": round(student_ms, 4),
        "teacher_ms_per_window": round(teacher_ms, 3),
        "speedup": round(teacher_ms / student_ms, 1),
        "student_bytes": len(uri_lib.read_bytes(uri_lib.join(student.uri, WEIGHTS))),
        "onnx_max_abs_diff": report.pop("student_diff"),
        "student_params": sum(p.numel() for p in student.model.parameters()),
        "student_torch_ms_per_window": round(1000 * torch_seconds / min(args.batch_size, len(ppg)), 4),
        "teacher_sampler": options.sampler,
        "teacher_steps": options.steps,
        "teacher_name": teacher.name,
    })
    if "int8" in timings:
        report["int8_ms_per_window"] = round(timings["int8"], 4)
        report["int8_bytes"] = report.pop("int8_onnx_bytes")
        report["int8_max_abs_diff"] = report.pop("int8_diff")
    report = {key: (float(value) if isinstance(value, np.floating) else value) for key, value in report.items()}
    print(json.dumps(report))
    return 0
