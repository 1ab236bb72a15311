"""The driver side of training: a Ray Train `TorchTrainer` over `loop.train_loop_per_worker`.

    result = run_training(load_config("smoke", ["train.num_workers=2"]), out="out/")

After `fit`, the driver reads the last checkpoint (every rank's DeepSpeed files, merged by Ray Train),
consolidates fp32 weights into `model.safetensors` beside it, and writes `result.json`.

A run's name is stable (`stable_run_name`): running the same command again resumes the run from its latest
checkpoint, and a run whose storage failed for a while is fitted again the same way (`fit_with_storage_retries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2es_dist.errors import UserError, root_cause
from p2es_dist.storage import uri as uri_lib
from p2es_dist.train.config import SELECTION_METRIC, SELECTION_MODE, JobConfig, parse_job_config

log = logging.getLogger("p2es.train")

# Keys that do not change what a run trains, so they stay out of its name: where it lives and how failures
# and old checkpoints are handled, loader speed knobs, the population (derived from data.uris), fault injection.
NON_IDENTITY_KEYS = {
    "train": ("run_name", "storage_path", "max_failures", "keep_checkpoints", "storage_retries",
              "storage_retry_delay_s", "tracking", "tracking_dir"),
    "data": ("prefetch_batches", "block_rows"),
    "model": ("population",),
}
# Where Ray Train V2 keeps a run's checkpoint list; it resumes a run whose folder holds one.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def stable_run_name(job: JobConfig, out: str | None = None) -> str:
    """`<model>-<hash>`: the same for the same resolved config and output folder, whatever the spelling
    of the command (key order, defaults written out), different when anything that is trained changes."""
    identity = {section: dict(values) for section, values in job.as_dict().items() if section != "fault"}
    for section, keys in NON_IDENTITY_KEYS.items():
        for key in keys:
            identity[section].pop(key, None)
    identity["out"] = str(Path(out).expanduser().resolve()) if out else None
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{job.model.name}-{digest}"


def run_name(job: JobConfig, *, out: str | None = None, fresh: bool = False) -> str:
    """`train.run_name` when set, else the stable name; `fresh` makes a new one that no earlier run has."""
    if job.train.run_name:
        if fresh:
            raise UserError(f"--fresh starts a new run under a new name, but train.run_name={job.train.run_name} "
                            "fixes the name: drop one of them")
        return job.train.run_name
    name = stable_run_name(job, out)
    if fresh:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return name


def resumable_step(job: JobConfig, name: str) -> int | None:
    """The step of the checkpoint Ray Train will resume run `name` from; None when it starts from scratch."""
    try:
        text = uri_lib.read_text(uri_lib.join(job.train.storage_path, name, SNAPSHOT_FILE))
    except FileNotFoundError:
        return None
    try:
        latest = json.loads(text).get("latest_checkpoint_result") or {}
    except ValueError:
        return None  # Ray Train will say what is wrong with its own file
    step = (latest.get("metrics") or {}).get("step")
    return int(step) if isinstance(step, int | float) else None


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


def with_population(config: dict[str, Any] | JobConfig) -> JobConfig:
    """The job (parsed once; a JobConfig passes through) with `model.population` filled in for a model
    that takes calibration templates.

    The population (median beat per lead, median PAT and its spread of the training records, pooled and
    per source, `data/calibration.py`) comes from the `train` split of `data.uris` only, and is written
    into the model's config, so every checkpoint carries the zero-shot template its model was trained with.
    """
    job = parse_job_config(config)
    model = job.model.config
    if not getattr(model, "use_template", False) or getattr(model, "population", None):
        return job
    from p2es_dist.data.calibration import population_from_shards, population_json, populations_by_source

    uris = list(job.data.uris)
    profile = population_from_shards(uris)
    if profile is None:
        log.warning("model.use_template: the training data carry no calibration (shard schema < 2 or no paired "
                    "record in train): no population template, zero-shot windows get no template")
        return job
    population = population_json(profile, populations_by_source(uris))
    return replace(job, model=replace(job.model, config=replace(model, population=population)))


def build_torch_trainer(config: dict[str, Any] | JobConfig, *, run_config=None, name: str | None = None):
    """A ready-to-fit TorchTrainer for a job (Ray Tune calls this with its own `run_config`). The workers
    get the parsed JobConfig itself: nothing is parsed again on them."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from p2es_dist.data.loader import training_datasets
    from p2es_dist.train.loop import train_loop_per_worker

    job = with_population(config)
    name = name or stable_run_name(job)
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
        train_loop_config={"job": job, "run_uri": run_uri},
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
    return save_checkpoint(state, job.model.as_dict(), checkpoint_uri(job, checkpoint))


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


def _nested_errors(error: BaseException) -> Iterator[BaseException]:
    """`error` and what Ray Train wrapped in it: the controller's failure, each worker's, their causes."""
    stack, seen = [error], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        workers = getattr(current, "worker_failures", None) or {}
        stack += [workers[rank] for rank in sorted(workers, reverse=True)]
        stack += [getattr(current, name, None) for name in ("cause", "_base_exc", "controller_failure")]
        stack.append(current.__cause__)


def fit_with_storage_retries(fit: Callable[[], Any], job: JobConfig, name: str, *,
                             sleep: Callable[[float], None] = time.sleep) -> Any:
    """`fit()`, fitted again (resuming from the latest checkpoint) after a transient storage failure.

    Ray Train restarts failed workers itself (`train.max_failures`), at once; it does not retry its
    controller's own storage errors, and an endpoint down for a minute outlasts immediate restarts. So a
    run that stopped on an unreachable or throttling store is fitted again, up to `train.storage_retries`
    times, after `train.storage_retry_delay_s` doubling each time. Other failures become one-line UserErrors.
    """
    run_uri = uri_lib.join(job.train.storage_path, name)
    for retry in range(job.train.storage_retries + 1):
        try:
            step = resumable_step(job, name)
            if step is None:
                print(f"starting run {name} (the same command resumes it; --fresh starts over)", file=sys.stderr)
            else:
                print(f"resuming run {name} from step {step}", file=sys.stderr)
            return fit()
        except Exception as exc:  # sorted below: retried, re-raised, or made a one-line UserError
            cause = root_cause(exc)
            transient = any(uri_lib.is_transient(e) for e in _nested_errors(exc))
            if transient and retry < job.train.storage_retries:
                delay = job.train.storage_retry_delay_s * 2**retry
                log.warning("run %s stopped on a storage error (%s); resuming it in %.0f s (retry %d of %d)",
                            name, _one_line(cause), delay, retry + 1, job.train.storage_retries)
                sleep(delay)
                continue
            if isinstance(exc, UserError) and exc is cause and not retry:
                raise
            message = uri_lib.storage_error(cause, run_uri) if transient else None
            what = _one_line(message if message is not None else cause)
            retried = f" after {retry} storage retr{'y' if retry == 1 else 'ies'}" if retry else ""
            raise UserError(f"training run {name} stopped{retried}: {what} (checkpoints under {run_uri}; "
                            "the same command resumes it)") from exc
    raise AssertionError("unreachable")  # the loop returns or raises


def _one_line(error: BaseException) -> str:
    """A UserError's message, else `Type: line`: the last line of a message holding a traceback, else the first."""
    if isinstance(error, UserError):
        return " ".join(str(error).split())
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = (lines[-1] if "Traceback (most recent call last)" in str(error) else lines[0]) if lines else ""
    return f"{type(error).__name__}: {line}".rstrip(": ")


def _attempt_count(run_uri: str) -> int:
    return len(uri_lib.ls(uri_lib.join(run_uri, "attempts"), suffix=".json", missing_ok=True))


def run_training(config: dict[str, Any] | JobConfig, *, out: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """Fit, consolidate, summarise. Raises UserError when training fails for good.

    The run's name is stable (`run_name`), so the same call again resumes it; `fresh` starts a new run.
    The summary's `checkpoint` (and `weights`) is the kept checkpoint with the lowest validation
    reconstruction error (`SELECTION_METRIC`), not necessarily the last; `steps` and `val` are the last
    report's, `selected` says which step was chosen and why; `failures` counts this call's restarts.
    """
    job = with_population(config)
    name = run_name(job, out=out, fresh=fresh)
    run_uri = uri_lib.join(job.train.storage_path, name)
    attempts_before: list[int] = []

    def fit():
        attempts_before.append(_attempt_count(run_uri))
        return build_torch_trainer(job, name=name).fit()

    result = fit_with_storage_retries(fit, job, name)
    if result.checkpoint is None:
        raise UserError(f"training finished without a checkpoint (train.max_steps={job.train.max_steps})")
    metrics = dict(result.metrics or {})
    attempts = _attempt_count(run_uri) - attempts_before[0]
    selected, selected_metrics = select_checkpoint(result.best_checkpoints, result.checkpoint, metrics)
    summary = {
        "run": run_uri,
        "checkpoint": checkpoint_uri(job, selected),
        "weights": export_weights(job, selected),
        "selected": {"metric": SELECTION_METRIC, "mode": SELECTION_MODE,
                     "step": int(selected_metrics.get("step", 0)), "value": selected_metrics.get(SELECTION_METRIC)},
        "model": job.model.name,
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
