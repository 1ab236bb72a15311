"""Pool the folds of a subject-grouped cross-validation into one lead II table with subject-level intervals.

Each fold's `p2es evaluate` writes `lead_ii_windows.csv` (per window and model); the folds' test subjects
are disjoint and together cover every subject, so the pooled windows are scored once each and the
bootstrap resamples subjects exactly as a single evaluation does (`metrics.subject_bootstrap`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from p2es_dist.errors import UserError
from p2es_dist.evaluate import metrics, templates

POOLED_METRICS = ("pearson", "pearson_lag", "rrmse", "amp_ratio", "minmax_rmse")


def read_lead_ii_windows(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(subject per row, column -> float array) of one fold's `lead_ii_windows.csv`."""
    if not path.exists():
        raise UserError(f"{path}: missing (written by `p2es evaluate` since the cross-validation release)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return [], {}
    columns = [name for name in rows[0] if name not in ("window_id", "subject_id")]
    values = {name: np.array([float(row[name]) if row[name] else np.nan for row in rows]) for name in columns}
    return [row["subject_id"] for row in rows], values


def pool_folds(fold_outputs: list[Path], *, protocol: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"models": {name: {metric: value, "ci95": {metric: [lo, hi]}}}, "folds": [...], "verdict": ...}."""
    subjects: list[str] = []
    pooled: dict[str, list[np.ndarray]] = {}
    folds = []
    for index, folder in enumerate(fold_outputs):
        fold_subjects, values = read_lead_ii_windows(Path(folder) / "lead_ii_windows.csv")
        if subjects and set(fold_subjects) & set(subjects):
            raise UserError(f"{folder}: its test subjects overlap an earlier fold's; folds must be subject-disjoint")
        subjects += fold_subjects
        for name, column in values.items():
            pooled.setdefault(name, []).append(column)
        folds.append({"fold": index, "n_windows": len(fold_subjects), "n_subjects": len(set(fold_subjects)),
                      "pearson": {name.removesuffix(".pearson"): metrics.as_number(np.nanmean(column))
                                  for name, column in values.items() if name.endswith(".pearson")}})
    lengths = {name: len(parts) for name, parts in pooled.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"folds disagree on the models they score: {lengths}")
    models: dict[str, dict] = {}
    for name, parts in pooled.items():
        model, _, metric = name.rpartition(".")
        point, low, high = metrics.subject_bootstrap(np.concatenate(parts), subjects, n_boot=n_boot, seed=seed)
        entry = models.setdefault(model, {"ci95": {}})
        entry[metric] = metrics.as_number(point[0])
        entry["ci95"][metric] = [metrics.as_number(low[0]), metrics.as_number(high[0])]
    return {"protocol": protocol, "n_windows": len(subjects), "n_subjects": len(set(subjects)),
            "models": models, "folds": folds, "verdict": _verdict(models, protocol)}


def _verdict(models: dict[str, dict], protocol: str) -> dict | None:
    scored = {name: entry["pearson"] for name, entry in models.items()
              if name in templates.TEMPLATES[protocol] and entry.get("pearson") is not None}
    learned = [name for name in models if not name.startswith("template_")]
    if not scored or not learned or models[learned[0]].get("pearson") is None:
        return None
    reference = max(scored, key=scored.get)
    mine = models[learned[0]]["pearson"]
    return {"model": learned[0], "template": reference, "model_pearson_ii": mine,
            "template_pearson_ii": scored[reference], "beats_template": bool(mine > scored[reference])}


def markdown(summary: dict) -> str:
    """The pooled table as Markdown (what `p2es evaluate --cv-folds` prints and writes to cv.md)."""
    lines = [f"### {summary['protocol']}: {summary['n_subjects']} subjects, {summary['n_windows']} windows, "
             f"{len(summary['folds'])} folds (lead II, 95 % subject bootstrap)", "",
             "| model | Pearson | lag-tolerant Pearson | rRMSE | amplitude ratio | min-max RMSE |",
             "|---|---|---|---|---|---|"]

    def cell(entry: dict, metric: str) -> str:
        value, (low, high) = entry.get(metric), entry["ci95"].get(metric, [None, None])
        if value is None:
            return "-"
        return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else f"{value:.3f}"

    for name, entry in summary["models"].items():
        lines.append(f"| {name} | " + " | ".join(cell(entry, m) for m in POOLED_METRICS) + " |")
    verdict = summary.get("verdict")
    if verdict:
        beats = "beats" if verdict["beats_template"] else "does NOT beat"
        lines += ["", f"{verdict['model']} {beats} {verdict['template']} on pooled lead II Pearson "
                      f"({verdict['model_pearson_ii']:.3f} vs {verdict['template_pearson_ii']:.3f})."]
    return "\n".join(lines) + "\n"
