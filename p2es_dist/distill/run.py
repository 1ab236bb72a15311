"""`p2es distill` end to end: teacher outputs -> student training -> pruning -> fine-tune -> ONNX.

    summary = run_distill(load_config("distill", ["distill.teacher=runs/p2es-.../step-00001000"]), out="out/")

1. The teacher's few-step outputs for the train and val windows (`teacher_outputs`, cached by key).
2. The student trains on them with Ray Train (`run_training`, the generic loop calling `Student.loss`):
   the cached shards are its data, so every batch carries `teacher_ecg` beside the recorded leads.
3. Its trunk channels are scored by significance (eq. 11) on training windows and the weakest
   `prune_fraction` removed (`prune`); the pruned weights are saved as a checkpoint.
4. The pruned student is fine-tuned from those weights for `finetune_steps` (Ray Train again).
5. The final checkpoint (model.safetensors + model.json with the pruned widths, loadable by
   `load_model`) is exported to ONNX and, optionally, int8 weights, each checked against PyTorch.

Each training stage logs its curves to TensorBoard like any run (`train.tracking`); the distillation as a
whole (config, final numbers, every artifact's URI) goes beside them, under `<storage_path>/<name>`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from p2es_dist.config import to_dict
from p2es_dist.distill.config import DistillJob, parse_distill_config
from p2es_dist.distill.teacher_outputs import Compute, cached_batches, ensure_teacher_outputs, infer_with_ray
from p2es_dist.models.base import Batch, count_parameters
from p2es_dist.models.checkpoint import CHECKPOINT_CONFIG, WEIGHTS, load_model, save_checkpoint
from p2es_dist.storage import uri as uri_lib

log = logging.getLogger("p2es.distill")


def stage_config(job: DistillJob, *, model: dict[str, Any], data_uri: str, run_name: str,
                 max_steps: int | None = None, lr: float | None = None) -> dict[str, Any]:
    """A `p2es train` config for one stage: the cached teacher outputs as data, the student as model."""
    train = {**job.train, "run_name": run_name}
    if max_steps is not None:
        train["max_steps"] = max_steps
        train["warmup_steps"] = min(int(train.get("warmup_steps", 50)), max(1, max_steps // 10))
    if lr is not None:
        train["lr"] = lr
    data = {**job.data, "uris": [data_uri], "teacher_ecg": True}
    return {"model": model, "data": data, "train": train, "_source": job.source}


def export_artifacts(model: torch.nn.Module, folder: str, batch: Batch, *, quantize: bool) -> dict[str, Any]:
    """model.onnx (and model.int8.onnx) in `folder`, with their size and max |difference| to PyTorch."""
    from p2es_dist.export.onnx_io import export_onnx, onnx_max_abs_diff
    from p2es_dist.export.quantize import quantize_int8

    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        files = {"onnx": export_onnx(model, Path(scratch) / "model.onnx")}
        if quantize:
            files["int8"] = quantize_int8(files["onnx"], Path(scratch) / "model.int8.onnx")
        for kind, path in files.items():
            target = uri_lib.join(folder, path.name)
            uri_lib.write_bytes_atomic(target, path.read_bytes())
            report[kind] = {"uri": target, "bytes": path.stat().st_size,
                            "max_abs_diff": onnx_max_abs_diff(model, path, batch)}
    return report


def track_distillation(job: DistillJob, run_folder: str, summary: dict[str, Any]) -> None:
    """The whole distillation as one TensorBoard run (`train/tracking.py`), at the student's total steps."""
    from p2es_dist.train.tracking import Tracker

    tracker = Tracker.for_run(run_folder, tracking=job.train.get("tracking", "tensorboard"),
                              tracking_dir=job.train.get("tracking_dir"))
    step = summary["distill_steps"] + summary["finetune_steps"]
    tracker.log_config(summary["config"], step=step)
    pruning = summary["pruning"] or {}
    metrics = {**summary["val"], "params": summary["params"], "bytes": summary["bytes"],
               "pruning/channels_before": pruning.get("channels_before"),
               "pruning/channels_after": pruning.get("channels_after")}
    metrics.update({f"before_pruning/{key}": value for key, value in (summary["val_before_pruning"] or {}).items()})
    artifacts = {"checkpoint": summary["checkpoint"], "weights": summary["weights"],
                 "pruned": pruning.get("checkpoint"), "teacher_outputs": summary["cache_uri"]}
    artifacts.update({f"stage_run_{i}": run for i, run in enumerate(summary["runs"])})
    for kind in ("onnx", "int8"):
        if kind in summary:
            metrics.update({f"{kind}/{key}": summary[kind][key] for key in ("bytes", "max_abs_diff")})
            artifacts[kind] = summary[kind]["uri"]
    tracker.log_metrics(metrics, step)
    for name, uri in artifacts.items():
        if uri:
            tracker.log_artifact(name, uri, step)
    tracker.close()


def run_distill(config: dict[str, Any], *, out: str | None = None, compute: Compute = infer_with_ray) -> dict[str, Any]:
    """The whole distillation (see the module docstring); writes `out/result.json` when `out` is given."""
    from p2es_dist.distill.prune import prune_student, select_channels, significance
    from p2es_dist.train.trainer import run_training

    job = parse_distill_config(config)
    settings = job.distill
    teacher = load_model(settings.teacher)
    cache = ensure_teacher_outputs(teacher_uri=teacher.uri, teacher_digest=teacher.digest,
                                   data_uris=list(job.data["uris"]), distill=settings, compute=compute)
    name = job.train.get("run_name") or f"student-{time.strftime('%Y%m%d-%H%M%S')}"
    run_folder = uri_lib.join(job.train.get("storage_path", "runs"), name)
    model = {**job.model, "teacher_weight": settings.teacher_weight, "recorded_weight": settings.recorded_weight}

    distilled = run_training(stage_config(job, model=model, data_uri=cache["uri"], run_name=f"{name}-distill"))
    stages, final, pruning = [distilled], distilled, None
    if settings.prune_fraction > 0:
        full = load_model(distilled["checkpoint"]).model
        scores = significance(full, cached_batches(cache["uri"], windows=settings.prune_windows))
        score = scores.score(settings.prune_lambda_w)
        kept = select_channels(score, c1_channels=full.config.c1_channels, fraction=settings.prune_fraction)
        pruned, pruned_config = prune_student(full, kept)
        pruned_section = {"name": "student", **to_dict(pruned_config)}
        pruned_section.pop("init_weights")
        pruned_weights = save_checkpoint(pruned, pruned_section, uri_lib.join(run_folder, "pruned"))
        pruning = {"channels_before": full.config.channels, "channels_after": len(kept), "kept": kept,
                   "score": [round(float(s), 4) for s in score], "windows": scores.windows,
                   "params_before": count_parameters(full), "params_after": count_parameters(pruned),
                   "checkpoint": uri_lib.join(run_folder, "pruned")}
        final = run_training(stage_config(job, model={**pruned_section, "init_weights": pruned_weights},
                                          data_uri=cache["uri"], run_name=f"{name}-finetune",
                                          max_steps=settings.finetune_steps, lr=settings.finetune_lr))
        stages.append(final)
        # The fine-tuned weights are complete: the final model.json must not point at the pruned ones.
        uri_lib.write_text_atomic(uri_lib.join(final["checkpoint"], CHECKPOINT_CONFIG),
                                  json.dumps(pruned_section, indent=2))

    student = load_model(final["checkpoint"])
    summary: dict[str, Any] = {
        "checkpoint": final["checkpoint"],
        "weights": uri_lib.join(final["checkpoint"], WEIGHTS),
        "model": "student",
        "steps": final["steps"],
        "distill_steps": distilled["steps"],
        "finetune_steps": final["steps"] if pruning else 0,
        "restored_from_step": final["restored_from_step"],
        "failures": sum(stage["failures"] for stage in stages),
        "val": final["val"],
        "val_before_pruning": distilled["val"] if pruning else None,
        "params": count_parameters(student.model),
        "bytes": len(uri_lib.read_bytes(uri_lib.join(student.uri, WEIGHTS))),
        "student_config": student.model_config,
        "teacher": {"uri": teacher.uri, "digest": teacher.digest, "name": teacher.name,
                    "sampler": settings.sampler, "steps": settings.steps, "seed": settings.seed,
                    "n_samples": settings.n_samples},
        "teacher_outputs": {"uri": cache["uri"], "reused": cache["reused"], "n_windows": cache["n_windows"]},
        "cache_uri": cache["uri"],
        "teacher_digest": teacher.digest,
        "pruning": pruning,
        "runs": [stage["run"] for stage in stages],
        "config": {"distill": to_dict(settings), "model": job.model, "data": job.data, "train": job.train},
    }
    if settings.onnx:
        batch = next(cached_batches(cache["uri"], windows=16))
        summary.update(export_artifacts(student.model, uri_lib.join(run_folder, "onnx"), batch,
                                        quantize=settings.quantize))
    track_distillation(job, run_folder, summary)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(summary, indent=2))
    return summary
