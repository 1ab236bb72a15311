"""`p2es tune`: a Ray Tune search whose trials are Ray Train runs (the Train V2 pattern).

    best = run_search("tune_spaces/dilation_depth.yaml", load_config("p2es_bidmc"), out="tune_out")

Each Tune trial is a small *driver* function: it applies its sampled values to a copy of the base config,
builds the `TorchTrainer` of `p2es train` and runs it. Ray Train workers report `val_x0_mse` (and `val_loss`) every
`train.eval_every` steps; `TuneReportCallback` forwards each report (and the checkpoint's path) to Tune,
where ASHA decides whether the trial goes on. Stopping a trial ends its driver, and with it the Train
controller and workers it owns; the search then removes the Train run's placement group (see
`_ReleasePlacementGroups`). Tune's experiment and every trial's Train run (checkpoints included) live
under `<train.storage_path>/<name>/`. best.json is built from Tune's results alone (`tune/summary.py`);
the one Ray internal used, for the placement groups, is behind `tune/ray_compat.py`.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import PlacementGroupID
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from p2es_dist.storage import uri as uri_lib
from p2es_dist.tune import ray_compat
from p2es_dist.tune.spaces import SearchSpace, TuneSettings, apply_values, load_space, validate_space
from p2es_dist.tune.summary import TrialRecord, summarise, trial_record

__all__ = ["TrialRecord", "concurrent_trials", "cpus_per_trial", "run_search", "summarise"]

log = logging.getLogger("p2es.tune")

DEFAULT_STORAGE = "~/ray_results"  # where Ray itself would put results when train.storage_path is unset
TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes: the driver's whole request (no CPU, see the module docstring)

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
        callbacks=[_ForwardToTune(metric), ray_compat.RecordPlacementGroup()],
    )
    build_torch_trainer(job, run_config=run_config).fit()  # the trial's config, parsed once, is what its workers get


# Ray Train's controller removes its workers' placement group when the run ends, and a detached helper
# removes it when the controller is killed (as when ASHA stops a trial), but that helper asks the State
# API, which needs the dashboard (`ray[default]`): on a Ray without it the group leaks, its CPUs stay
# reserved, and later trials starve the data pipeline. So each report names its group and the search
# removes it once the trial is over. ASHA only stops a trial on a report, so a stopped trial has named it.
# Only a Ray Train internal knows the group (see ray_compat).
PLACEMENT_GROUP_KEY = "train_placement_group"


class _ForwardToTune(TuneReportCallback):
    """Rank 0's reports -> Tune, only those that carry the metric (a checkpoint-only report would fail
    Tune's metric check, and ASHA's rungs then count validations), tagged with the placement group."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics or self.metric not in metrics[0]:
            return
        group = ray_compat.controller_placement_group()
        tagged = {**metrics[0], **({PLACEMENT_GROUP_KEY: group} if group else {})}
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
    ray_compat.require_ray_internals()  # before any trial starts: a one-line error, not a failed trial each
    from p2es_dist.train.trainer import with_population

    # Once for the search, not in every trial (each would read the training shards again).
    base_config = {**with_population(base_config).as_dict(), "_source": base_config.get("_source", "config")}
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
        scheduler = ASHAScheduler(grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
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

    trials = [trial_record(result, space) for result in results]
    best = summarise(trials, settings=settings, base_config=base_config, searched_keys=space.searched_keys,
                     storage_root=storage_root, experiment_uri=experiment_uri, retries=retries.retries)
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
