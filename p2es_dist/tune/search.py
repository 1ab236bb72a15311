"""`p2es tune`: a Ray Tune search whose trials are Ray Train runs (the Train V2 pattern).

    best = run_search("tune_spaces/dilation_depth.yaml", load_config("p2es_bidmc"), out="tune_out")

Each Tune trial is a small *driver* function: it applies its sampled values to a copy of the base config,
builds the `TorchTrainer` of `p2es train` and runs it. Ray Train workers report `val_x0_mse` (and `val_loss`) every
`train.eval_every` steps; `TuneReportCallback` forwards each report (and the checkpoint's path) to Tune,
where ASHA decides whether the trial goes on. Stopping a trial ends its driver, and with it the Train
controller and workers it owns; the search then removes the Train run's placement group (see
`_ReleasePlacementGroups`). Tune's experiment and every trial's Train run (checkpoints included) live
under `<train.storage_path>/<name>/`.

Resources: the driver only waits on the Train controller, so it asks for no CPU (a token of memory, since
Tune needs a non-empty request); a trial's CPUs are its Train workers'. The search keeps at least one CPU
free for Ray Data's read and conversion tasks, which otherwise queue behind the workers that wait on them:
on a 2-core machine the smoke space runs one trial at a time, its worker on half a CPU
(`train.cpus_per_worker: 0.5`), and the data pipeline has the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import PlacementGroupID
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from p2es_dist.storage import uri as uri_lib
from p2es_dist.tune.spaces import SearchSpace, TuneSettings, apply_values, load_space, plain, validate_space

log = logging.getLogger("p2es.tune")

DEFAULT_STORAGE = "~/ray_results"  # where Ray itself would put results when train.storage_path is unset
TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes: the driver's whole request (no CPU, see the module docstring)
CHECKPOINT_PATH_KEY = "checkpoint_path"  # the key TuneReportCallback adds to a report with a checkpoint


class StopRecordingASHA(ASHAScheduler):
    """ASHA that remembers the trials it stopped before `max_t`.

    Tune marks a trial stopped by its scheduler `done`, like one that finished, so the count of early
    stops is only known here.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped_early: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.stopped_early.add(trial.trial_id)
        return decision


# ---------------------------------------------------------------------------------------------------------
# the trial: a Ray Train run driven from inside a Tune function trainable


def _train_driver(sampled: dict[str, Any], *, base_config: dict[str, Any], experiment_uri: str,
                  metric: str, mode: str) -> None:
    """One trial. `sampled` is Tune's config: the dotted keys of the space with this trial's values."""
    import ray.train
    import ray.tune

    from p2es_dist.train.config import parse_job_config
    from p2es_dist.train.trainer import build_torch_trainer

    # The Train run lives inside the experiment folder; the worker loop writes its attempt markers
    # under train.storage_path/<run name>, so both must name the same place.
    config = apply_values(base_config, {**sampled, "train.storage_path": experiment_uri})
    job = parse_job_config(config)
    filesystem, storage_path = _storage(experiment_uri)
    run_config = ray.train.RunConfig(
        # Fixed by the trial id: when Tune restarts a failed trial, Ray Train resumes this run from its
        # latest checkpoint. Restarts are Tune's (see run_search): a Train-level restart racing with
        # `_ReleasePlacementGroups` could leave a new worker group behind a stopped trial.
        name=f"train-{ray.tune.get_context().get_trial_id()}",
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=0),
        # Keep the best checkpoints by the searched metric (Train always keeps the latest too).
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train.keep_checkpoints,
                                                     checkpoint_score_attribute=metric,
                                                     checkpoint_score_order=mode),
        callbacks=[_ForwardToTune(metric), _RecordPlacementGroup()],
    )
    build_torch_trainer(config, run_config=run_config).fit()


# Ray Train's controller removes its workers' placement group when the run ends, and a detached helper
# removes it when the controller is killed (as when ASHA stops a trial), but that helper asks the State
# API, which needs the dashboard (`ray[default]`): on a Ray without it the group leaks, its CPUs stay
# reserved, and later trials starve the data pipeline. So each report names its group and the search
# removes it once the trial is over. ASHA only stops a trial on a report, so a stopped trial has named it.
# `WorkerGroupCallback` is a Ray Train internal; Train hands non-user callbacks to its controller as is.
PLACEMENT_GROUP_KEY = "train_placement_group"
_controller_state: dict[str, str] = {}  # lives in a Train controller's process: its worker group's id


class _RecordPlacementGroup(WorkerGroupCallback):
    """Runs in the Train controller: remembers the placement group of each worker group it starts."""

    def after_worker_group_start(self, worker_group) -> None:
        handle = worker_group.get_worker_group_state().placement_group_handle
        _controller_state[PLACEMENT_GROUP_KEY] = handle.placement_group.id.hex()


class _ForwardToTune(TuneReportCallback):
    """Rank 0's reports -> Tune, only those that carry the metric (a checkpoint-only report would fail
    Tune's metric check, and ASHA's rungs then count validations), tagged with the placement group."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self._metric = metric

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics or self._metric not in metrics[0]:
            return
        tagged = {**metrics[0], **_controller_state}
        super().after_report(run_context, [tagged, *metrics[1:]], checkpoint)


class _CountRetries(Callback):
    """In the search's driver: Tune's restarts of each trial after an error, which `trials_failed` misses."""

    def __init__(self) -> None:
        self.retries: dict[str, int] = {}

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1


class _ReleasePlacementGroups(Callback):
    """Runs in the search's driver: removes a finished trial's Train placement group if it is still there."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._release(trial)

    @staticmethod
    def _release(trial) -> None:
        group_id = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if not group_id:
            return
        state = placement_group_table().get(group_id, {}).get("state")
        if state in (None, "REMOVED"):
            return  # the controller shut its worker group down itself
        log.info("tune: removing placement group %s left by trial %s", group_id, trial.trial_id)
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id)))


# ---------------------------------------------------------------------------------------------------------
# the search


def run_search(space: SearchSpace | str | os.PathLike, base_config: dict[str, Any], *,
               out: str | os.PathLike | None = None, name: str | None = None,
               validate: bool = True) -> dict[str, Any]:
    """Run the search on the connected Ray cluster; return (and write to `out/best.json`) the summary."""
    import ray
    from ray import tune

    if not isinstance(space, SearchSpace):
        space = load_space(space)
    if validate:
        validate_space(space, base_config)
    from p2es_dist.train.trainer import with_population

    # Once for the search, not in every trial (each would read the training shards again).
    base_config = with_population(base_config)
    settings = space.settings
    storage_root = _storage_root(base_config)
    name = name or f"tune-{Path(space.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment_uri = uri_lib.join(storage_root, name)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
    max_concurrent = concurrent_trials(settings, cpus_per_trial(space, base_config), cluster_cpus)
    max_failures = int((base_config.get("train") or {}).get("max_failures", 1))

    # stop_last_trials=False: a trial that survives every rung finishes on its own (its Train run shuts
    # down cleanly) rather than being cut at max_t, which then only sets the rungs.
    scheduler = None
    if settings.scheduler == "asha":
        scheduler = StopRecordingASHA(grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
                                      max_t=settings.max_t, stop_last_trials=False)
    trainable = tune.with_resources(
        tune.with_parameters(_train_driver, base_config=base_config, experiment_uri=experiment_uri,
                             metric=settings.metric, mode=settings.mode),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    filesystem, storage_path = _storage(storage_root)
    search_alg, tune_max_concurrent = _search_alg(settings, max_concurrent)
    retries = _CountRetries()
    tuner = tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=settings.num_samples,
            max_concurrent_trials=tune_max_concurrent,
            reuse_actors=False,  # a driver whose Train run was cut must not carry over to the next trial
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=max_failures),  # a restarted trial resumes its run
            callbacks=[_ReleasePlacementGroups(), retries],
        ),
    )
    log.info("tune: %s over %s, %d sample(s), at most %d trial(s) at a time, results in %s",
             space.source, ", ".join(space.searched_keys), settings.num_samples, max_concurrent, experiment_uri)
    results = tuner.fit()

    trials = [_trial_record(result, space) for result in results]
    stopped = scheduler.stopped_early if scheduler is not None else set()
    best = summarise(trials, settings=settings, base_config=base_config, stopped_early=stopped,
                     searched_keys=space.searched_keys, storage_root=storage_root, experiment_uri=experiment_uri,
                     retries=retries.retries)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    return best


def _search_alg(settings: TuneSettings, max_concurrent: int):
    """(search_alg, max_concurrent_trials for TuneConfig).

    TuneConfig limits concurrency by wrapping a `Searcher` (Optuna); the random generator is not one and
    would ignore it (Tune only warns), so it takes the limit itself.
    """
    if settings.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=settings.seed), max_concurrent
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent), None


def _storage_root(config: Mapping[str, Any]) -> str:
    root = (config.get("train") or {}).get("storage_path") or DEFAULT_STORAGE
    root = str(root)
    return root if uri_lib.is_s3(root) else str(Path(root.removeprefix("file://")).expanduser().resolve())


def _storage(uri: str):
    """(filesystem, path) for Ray's storage arguments: S3 through our endpoint and credentials; local as is."""
    if uri_lib.is_s3(uri):
        uri_lib.ensure_bucket(uri)  # Ray's pyarrow filesystem does not create buckets
        return uri_lib.pyarrow_filesystem(uri)
    return None, uri


def _checkpoint_uri(path: str, storage_root: str) -> str:
    """Ray reports checkpoint paths inside its filesystem: `bucket/key` on S3."""
    return f"s3://{path}" if uri_lib.is_s3(storage_root) and not uri_lib.is_s3(path) else path


# ---------------------------------------------------------------------------------------------------------
# resources


def cpus_per_trial(space: SearchSpace, base_config: Mapping[str, Any]) -> float:
    """CPUs one trial's Train workers hold: the largest the space can ask for."""
    train = base_config.get("train") or {}

    def largest(key: str, default: int) -> float:
        dim = space.dimensions.get(f"train.{key}")
        values = dim.candidates() if dim is not None else (train.get(key, default),)
        return float(max(values))

    return largest("num_workers", 1) * largest("cpus_per_worker", 1)


def concurrent_trials(settings: TuneSettings, per_trial: float, cluster_cpus: float) -> int:
    """Trials at once such that one CPU stays free for the data pipeline; an explicit setting wins (warned)."""
    room = max(1, math.floor((cluster_cpus - 1) / per_trial))
    if per_trial >= cluster_cpus:
        log.warning("tune: one trial's workers take %g of %g CPUs, none is left for Ray Data's tasks: lower "
                    "train.num_workers or train.cpus_per_worker", per_trial, cluster_cpus)
    if settings.max_concurrent_trials is None:
        return room
    if settings.max_concurrent_trials > room:
        log.warning("tune: max_concurrent_trials=%d trials of %g CPUs leave no CPU for the data pipeline on "
                    "%g CPUs (%d would)", settings.max_concurrent_trials, per_trial, cluster_cpus, room)
    return settings.max_concurrent_trials


# ---------------------------------------------------------------------------------------------------------
# results -> best.json


@dataclass
class TrialRecord:
    trial_id: str
    sampled: dict[str, Any]
    reports: list[dict[str, Any]]  # every report of the trial, oldest first
    error: str | None = None  # first line of the trial's error, if it failed


def _trial_record(result, space: SearchSpace) -> TrialRecord:
    frame = result.metrics_dataframe
    reports = [] if frame is None else frame.to_dict("records")
    config = result.config or {}
    trial_id = (result.metrics or {}).get("trial_id") or Path(str(result.path)).name
    return TrialRecord(
        trial_id=str(trial_id),
        sampled={key: plain(config[key]) for key in space.searched_keys if key in config},
        reports=reports,
        error=None if result.error is None else f"{type(result.error).__name__}: {result.error}".splitlines()[0],
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _best_report(reports: Iterable[dict[str, Any]], metric: str, mode: str,
                 accept=lambda report: True) -> dict[str, Any] | None:
    candidates = [r for r in reports if _finite(r.get(metric)) and accept(r)]
    if not candidates:
        return None
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda r: r[metric])


def summarise(trials: list[TrialRecord], *, settings: TuneSettings, base_config: Mapping[str, Any],
              stopped_early: set[str], searched_keys: list[str], storage_root: str,
              experiment_uri: str, retries: Mapping[str, int] | None = None) -> dict[str, Any]:
    """best.json: the trial with the best `metric` in any of its reports, and its best surviving checkpoint;
    `retries` (trial id -> Tune's restarts of it) gives `trials_retried`, `trial_retries` and each trial's."""
    retries = retries or {}
    metric, mode = settings.metric, settings.mode
    best_by_trial = {t.trial_id: _best_report(t.reports, metric, mode) for t in trials}
    ranked = [t for t in trials if best_by_trial[t.trial_id] is not None]
    if not ranked:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported it"
        raise RuntimeError(f"tune: no trial reported a finite {metric} ({errors})")
    sign = 1.0 if mode == "min" else -1.0
    best = min(ranked, key=lambda t: sign * best_by_trial[t.trial_id][metric])
    best_report = best_by_trial[best.trial_id]

    # Train keeps only the last `train.keep_checkpoints`: take the best checkpoint that still exists.
    def checkpoint_alive(report: dict[str, Any]) -> bool:
        path = report.get(CHECKPOINT_PATH_KEY)
        return isinstance(path, str) and bool(path) and uri_lib.exists(_checkpoint_uri(path, storage_root))

    checkpoint_report = _best_report(best.reports, metric, mode, accept=checkpoint_alive)
    return {
        "metric": metric,
        "mode": mode,
        "value": float(best_report[metric]),
        "step": _int_or_none(best_report.get("step")),
        "config": {"sampled": best.sampled, "full": _public(apply_values(base_config, best.sampled))},
        "checkpoint": None if checkpoint_report is None
        else _checkpoint_uri(checkpoint_report[CHECKPOINT_PATH_KEY], storage_root),
        "checkpoint_value": None if checkpoint_report is None else float(checkpoint_report[metric]),
        "trial_id": best.trial_id,
        "trials": len(trials),
        "trials_stopped_early": sum(t.trial_id in stopped_early for t in trials),
        "trials_failed": sum(t.error is not None for t in trials),
        "trials_retried": sum(retries.get(t.trial_id, 0) > 0 for t in trials),
        "trial_retries": sum(retries.get(t.trial_id, 0) for t in trials),
        "storage_path": storage_root,
        "experiment_path": experiment_uri,
        "searched_keys": searched_keys,
        "scheduler": {"name": settings.scheduler, "grace_period": settings.grace_period,
                      "reduction_factor": settings.reduction_factor, "max_t": settings.max_t},
        "search_alg": settings.search_alg,
        "all_trials": [_trial_summary(t, best_by_trial[t.trial_id], metric, t.trial_id in stopped_early,
                                      retries.get(t.trial_id, 0)) for t in trials],
    }


def _trial_summary(trial: TrialRecord, best_report: dict[str, Any] | None, metric: str,
                   stopped_early: bool, retries: int) -> dict[str, Any]:
    last = trial.reports[-1] if trial.reports else {}
    return {
        "trial_id": trial.trial_id,
        "sampled": trial.sampled,
        "best": None if best_report is None else float(best_report[metric]),
        "reports": len(trial.reports),
        "last_step": _int_or_none(last.get("step")),
        "stopped_early": stopped_early,
        "retries": retries,
        "error": trial.error,
    }


def _int_or_none(value: Any) -> int | None:
    return int(value) if _finite(value) else None


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}
