"""The driver side of training: a Ray Train `TorchTrainer` over `loop.train_loop_per_worker`.

    result = run_training(load_config("smoke", ["train.num_workers=2"]), out="out/")

After `fit`, the driver reads the last checkpoint (every rank's DeepSpeed files, merged by Ray Train),
consolidates fp32 weights into `model.safetensors` beside it, and writes `result.json`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib
from p2es_dist.train.config import SELECTION_METRIC, SELECTION_MODE, JobConfig, parse_job_config

log = logging.getLogger("p2es.train")


def run_name(job: JobConfig) -> str:
    return job.train.run_name or f"{job.model['name']}-{time.strftime('%Y%m%d-%H%M%S')}"


def _storage(job: JobConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig; s3:// goes through our endpoint-aware filesystem."""
    path = job.train.storage_path
    if uri_lib.is_s3(path):
        uri_lib.ensure_bucket(path)
        filesystem, stripped = uri_lib.pyarrow_filesystem(path)
        return stripped, filesystem
    local = Path(path.removeprefix("file://")).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return str(local), None


def with_population(config: dict[str, Any]) -> dict[str, Any]:
    """The config with `model.population` filled in for a model that takes calibration templates.

    The population (median beat per lead and median PAT of the training records, `data/calibration.py`)
    comes from the `train` split of `data.uris` only, and is written into the model section, so every
    checkpoint carries the zero-shot template its model was trained with.
    """
    model = config.get("model") or {}
    if not model.get("use_template") or model.get("population"):
        return config
    from p2es_dist.data.calibration import population_from_shards

    profile = population_from_shards(list((config.get("data") or {}).get("uris") or []))
    if profile is None:
        log.warning("model.use_template: the training data carry no calibration (shard schema < 2 or no paired "
                    "record in train): no population template, zero-shot windows get no template")
        return config
    population = profile.to_json()
    population = {key: population[key] for key in ("fs", "pat_s", "pat_iqr_s", "n_beats", "beat", "source")}
    return {**config, "model": {**model, "population": population}}


def build_torch_trainer(config: dict[str, Any], *, run_config=None, name: str | None = None):
    """A ready-to-fit TorchTrainer for a job config (Ray Tune calls this with its own `run_config`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from p2es_dist.data.loader import training_datasets
    from p2es_dist.train.loop import train_loop_per_worker

    config = with_population(config)
    job = parse_job_config(config)
    name = name or run_name(job)
    storage_path, filesystem = _storage(job)
    if run_config is None:
        run_config = ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            # Keep the best checkpoints by validation reconstruction error (Train also keeps the latest).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train.keep_checkpoints,
                                                         checkpoint_score_attribute=SELECTION_METRIC,
                                                         checkpoint_score_order=SELECTION_MODE),
        )
    run_uri = uri_lib.join(job.train.storage_path, run_config.name or name)
    resources = {"CPU": job.train.cpus_per_worker}
    if job.train.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": {**job.as_dict(), "_source": job.source}, "run_uri": run_uri},
        scaling_config=ray.train.ScalingConfig(num_workers=job.train.num_workers, use_gpu=job.train.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config,
        datasets=training_datasets(job.data),
        # `train` is split between workers; every worker sees all of `val` and strides over it, so no
        # worker ever waits on another's half-read validation pass.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def checkpoint_uri(job: JobConfig, checkpoint) -> str:
    """A checkpoint's location in the user's spelling (s3://... rather than the stripped bucket path)."""
    return f"s3://{checkpoint.path}" if uri_lib.is_s3(job.train.storage_path) else checkpoint.path


def export_weights(job: JobConfig, checkpoint) -> str:
    """Consolidated fp32 safetensors (+ the model config) of a DeepSpeed checkpoint, written beside it
    by `models.checkpoint.save_checkpoint`; returns the weights' URI."""
    from p2es_dist.models.checkpoint import save_checkpoint
    from p2es_dist.train.engine import consolidated_state_dict

    with checkpoint.as_directory() as folder:
        state = consolidated_state_dict(folder, job.train.deepspeed.zero_stage)
    return save_checkpoint(state, job.model, checkpoint_uri(job, checkpoint))


def select_checkpoint(best_checkpoints: list[tuple[Any, dict[str, Any]]] | None, latest: Any,
                      latest_metrics: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """(checkpoint, its metrics) with the best `SELECTION_METRIC` among those Ray Train kept (the later
    one on a tie); the latest when none reported a finite value."""
    candidates = [(index, checkpoint, metrics) for index, (checkpoint, metrics) in enumerate(best_checkpoints or [])
                  if isinstance(metrics.get(SELECTION_METRIC), (int, float))
                  and math.isfinite(metrics[SELECTION_METRIC])]
    if not candidates:
        return latest, dict(latest_metrics or {})
    sign = 1.0 if SELECTION_MODE == "min" else -1.0
    _, checkpoint, metrics = min(candidates, key=lambda c: (sign * c[2][SELECTION_METRIC],
                                                              -c[2].get("step", 0), -c[0]))
    return checkpoint, dict(metrics)


def run_training(config: dict[str, Any], *, out: str | None = None) -> dict[str, Any]:
    """Fit, consolidate, summarise. Raises UserError when training fails for good.

    The summary's `checkpoint` (and `weights`) is the kept checkpoint with the lowest validation
    reconstruction error (`SELECTION_METRIC`), not necessarily the last; `steps` and `val` are the last
    report's, `selected` says which step was chosen and why.
    """
    config = with_population(config)
    job = parse_job_config(config)
    name = run_name(job)
    trainer = build_torch_trainer(config, name=name)
    result = trainer.fit()
    run_uri = uri_lib.join(job.train.storage_path, name)
    if result.error is not None:
        raise UserError(f"training failed after {job.train.max_failures} restart(s): {result.error} "
                        f"(logs and checkpoints under {run_uri})")
    if result.checkpoint is None:
        raise UserError(f"training finished without a checkpoint (train.max_steps={job.train.max_steps})")
    metrics = dict(result.metrics or {})
    attempts = len(uri_lib.ls(uri_lib.join(run_uri, "attempts"), suffix=".json", missing_ok=True))
    selected, selected_metrics = select_checkpoint(result.best_checkpoints, result.checkpoint, metrics)
    summary = {
        "run": run_uri,
        "checkpoint": checkpoint_uri(job, selected),
        "weights": export_weights(job, selected),
        "selected": {"metric": SELECTION_METRIC, "mode": SELECTION_MODE,
                     "step": int(selected_metrics.get("step", 0)), "value": selected_metrics.get(SELECTION_METRIC)},
        "model": job.model["name"],
        "steps": int(metrics.get("step", 0)),
        "restored_from_step": metrics.get("restored_from_step"),
        "failures": max(0, attempts - 1),
        "val": {key: value for key, value in metrics.items() if key.startswith("val_")},
        "train_loss": metrics.get("train_loss"),
        "samples_per_s": metrics.get("samples_per_s"),
        "workers": job.train.num_workers,
        "zero_stage": job.train.deepspeed.zero_stage,
        "bf16": metrics.get("bf16"),
        "config": job.as_dict(),
    }
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(summary, indent=2))
    return summary
