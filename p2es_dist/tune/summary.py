"""best.json of a Tune search: built only from what Tune's results show (each trial's reports and error)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2es_dist.storage import uri as uri_lib
from p2es_dist.tune.spaces import SearchSpace, TuneSettings, apply_values, lookup, plain

CHECKPOINT_PATH_KEY = "checkpoint_path"  # the key TuneReportCallback adds to a report with a checkpoint


@dataclass
class TrialRecord:
    trial_id: str
    sampled: dict[str, Any]
    reports: list[dict[str, Any]]  # every report of the trial, oldest first
    error: str | None = None  # first line of the trial's error, if it failed


def trial_record(result: Any, space: SearchSpace) -> TrialRecord:
    """A `ray.tune.Result` (its public fields) as a TrialRecord."""
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


def stopped_early(trial: TrialRecord, settings: TuneSettings, base_config: Mapping[str, Any]) -> bool:
    """Whether the scheduler cut the trial short. Tune marks such a trial done like one that finished, so
    this reads its reports: ASHA stops a trial only at a report before `max_t`, and a trial that ran its
    course reported its last step (the training loop validates at `train.max_steps`)."""
    if settings.scheduler != "asha" or trial.error is not None or not trial.reports:
        return False
    last = trial.reports[-1]
    iterations = last.get("training_iteration", len(trial.reports))  # Tune's count of the trial's reports
    if not _finite(iterations) or iterations >= settings.max_t:
        return False
    found, max_steps = lookup(apply_values(base_config, trial.sampled), "train.max_steps")
    step = last.get("step")
    # Without both numbers (a config leaving max_steps to its default), fewer reports than max_t decides.
    return not (found and _finite(max_steps) and _finite(step) and step >= max_steps)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _best_report(reports: Iterable[dict[str, Any]], metric: str, mode: str,
                 accept=lambda report: True) -> dict[str, Any] | None:
    candidates = [r for r in reports if _finite(r.get(metric)) and accept(r)]
    if not candidates:
        return None
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda r: r[metric])


def checkpoint_uri(path: str, storage_root: str) -> str:
    """Ray reports checkpoint paths inside its filesystem: `bucket/key` on S3."""
    return f"s3://{path}" if uri_lib.is_s3(storage_root) and not uri_lib.is_s3(path) else path


def summarise(trials: list[TrialRecord], *, settings: TuneSettings, base_config: Mapping[str, Any],
              searched_keys: list[str], storage_root: str, experiment_uri: str,
              retries: Mapping[str, int] | None = None) -> dict[str, Any]:
    """best.json: the trial with the best `metric` in any of its reports, and its best surviving checkpoint;
    `retries` (trial id -> Tune's restarts of it) gives `trials_retried`, `trial_retries` and each trial's."""
    retries = retries or {}
    metric, mode = settings.metric, settings.mode
    best_by_trial = {t.trial_id: _best_report(t.reports, metric, mode) for t in trials}
    stopped = {t.trial_id for t in trials if stopped_early(t, settings, base_config)}
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
        return isinstance(path, str) and bool(path) and uri_lib.exists(checkpoint_uri(path, storage_root))

    checkpoint_report = _best_report(best.reports, metric, mode, accept=checkpoint_alive)
    return {
        "metric": metric,
        "mode": mode,
        "value": float(best_report[metric]),
        "step": _int_or_none(best_report.get("step")),
        "config": {"sampled": best.sampled, "full": _public(apply_values(base_config, best.sampled))},
        "checkpoint": None if checkpoint_report is None
        else checkpoint_uri(checkpoint_report[CHECKPOINT_PATH_KEY], storage_root),
        "checkpoint_value": None if checkpoint_report is None else float(checkpoint_report[metric]),
        "trial_id": best.trial_id,
        "trials": len(trials),
        "trials_stopped_early": len(stopped),
        "trials_failed": sum(t.error is not None for t in trials),
        "trials_retried": sum(retries.get(t.trial_id, 0) > 0 for t in trials),
        "trial_retries": sum(retries.get(t.trial_id, 0) for t in trials),
        "storage_path": storage_root,
        "experiment_path": experiment_uri,
        "searched_keys": searched_keys,
        "scheduler": {"name": settings.scheduler, "grace_period": settings.grace_period,
                      "reduction_factor": settings.reduction_factor, "max_t": settings.max_t},
        "search_alg": settings.search_alg,
        "all_trials": [_trial_summary(t, best_by_trial[t.trial_id], metric, t.trial_id in stopped,
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
