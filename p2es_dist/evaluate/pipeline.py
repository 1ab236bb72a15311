"""`p2es evaluate` end to end: windows -> model and baselines -> metrics.json, report.md, figures/*.png.

    doc = run_evaluation(model_uri="runs/p2es/result.json", baselines={"dct": "runs/dct"},
                         config=EvalConfig(data=["shards/bidmc"], split="test"), out="eval/")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from p2es_dist import __version__
from p2es_dist.constants import LEADS, SCHEMA_VERSION
from p2es_dist.data.calibration import population_from_shards
from p2es_dist.errors import UserError
from p2es_dist.evaluate import figures, metrics, templates
from p2es_dist.evaluate.diagnostic import diagnostic_summary
from p2es_dist.evaluate.runner import (
    EvalConfig,
    ModelRun,
    Reference,
    compute_reference,
    generate,
    generation_settings,
    run_model,
    summarise,
    window_overall,
)
from p2es_dist.evaluate.schema import validate_metrics
from p2es_dist.evaluate.thresholds import load_thresholds, split_conflict
from p2es_dist.evaluate.windows import iter_batches, read_eval_windows

log = logging.getLogger("p2es.evaluate")

SPACE_DEFINITIONS = {
    "window": "model space: the 12 leads of a window divided together by one factor (max |x| over recorded "
              "leads), so inter-lead relations survive; multiply by the window's scale for mV",
    "minmax": "each lead of each window (recorded and generated separately) min-max scaled to [-1, 1], "
              "the space most published PPG-to-ECG numbers use",
}


def _load(uri: str, role: str):
    from p2es_dist.models.checkpoint import load_model

    loaded = load_model(uri)
    if role in ("model", "baseline") and not hasattr(loaded.model, "generate"):
        raise UserError(f"--{role} {uri}: model {loaded.name!r} has no generate(); expected a translation model")
    if role == "classifier" and not hasattr(loaded.model, "predict_proba"):
        raise UserError(f"--classifier {uri}: model {loaded.name!r} has no predict_proba(); expected 'classifier'")
    if role == "encoder" and not hasattr(loaded.model, "embed"):
        raise UserError(f"--encoder {uri}: model {loaded.name!r} has no embed(); expected the foundation encoder")
    return loaded


LEAD_II_WINDOWS = "lead_ii_windows.csv"
LEAD_II_COLUMNS = (("window", "pearson"), ("window", "pearson_lag"), ("window", "rrmse"), ("window", "amp_ratio"),
                   ("minmax", "rmse"))


def classifier_thresholds(loaded, config: EvalConfig) -> dict[str, Any]:
    """The `threshold` block of diagnostic_info; sets `config.thresholds` to the stored validation thresholds.

    Never fits one here: without usable stored thresholds the report has threshold-free figures only."""
    document, why = load_thresholds(loaded)
    if document is not None:
        conflict = split_conflict(document, config.data, config.split)
        if conflict:
            document, why = None, f"{conflict}: not used; only threshold-free figures"
    if document is None:
        log.warning("DIAGNOSTIC THRESHOLDS: %s", why)
        config.thresholds = None
        return {"source": None, "method": None, "uri": None, "fitted_on": None, "values": {}, "note": why}
    config.thresholds = {label: float(v["threshold"]) for label, v in document["labels"].items()}
    return {"source": "validation", "method": document.get("method"), "uri": document["uri"],
            "fitted_on": {"data": document.get("data"), "split": document.get("split"),
                          "n_windows": document.get("n_windows")},
            "values": config.thresholds, "note": why}


def input_only_info(config: EvalConfig) -> dict[str, Any]:
    if config.condition:
        return {"leads": list(config.condition),
                "description": f"the recorded ECG with only the model's input lead(s) {', '.join(config.condition)} "
                               "unmasked (where recorded); every other lead zeroed and masked"}
    return {"leads": [], "description": "PPG-conditioned model, no input ECG: the classifier with no lead unmasked "
                                        "outputs one constant (its label prior), so input-only is the chance floor "
                                        "(AUROC 0.5 by construction)"}


def write_lead_ii_windows(path: Path, runs: list[ModelRun], reference: Reference) -> None:
    """Lead II per window and model (`<model>.<metric>`, minmax RMSE as `<model>.minmax_rmse`), for pooling
    across folds (`evaluate/cv.py`) or a user's own analysis. Empty cells: lead II not scored."""
    import csv

    lead = LEADS.index("II")
    columns = {"window_id": reference.window_ids, "subject_id": list(reference.subjects)}
    for run in runs:
        for space, metric in LEAD_II_COLUMNS:
            name = f"{run.name}.{'minmax_' if space == 'minmax' else ''}{metric}"
            values = np.where(reference.mask[:, lead], run.per_window[space][metric][:, lead], np.nan)
            columns[name] = ["" if not np.isfinite(v) else f"{v:.6g}" for v in values]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))


def pick_windows(run: ModelRun) -> dict[str, int]:
    """Rows of the best, median and worst windows by overall window-space MSE."""
    mse = window_overall(run, "mse")
    rows = np.nonzero(np.isfinite(mse))[0]
    if rows.size == 0:
        return {}
    ranked = rows[np.argsort(mse[rows], kind="stable")]
    return {"best": int(ranked[0]), "median": int(ranked[len(ranked) // 2]), "worst": int(ranked[-1])}


def _regenerate(run: ModelRun, table: pa.Table, config: EvalConfig, first: int) -> tuple[dict, np.ndarray]:
    """The batch starting at row `first` and the model's output for it: same rows, same seed, same output."""
    _, batch = next(iter_batches(table, batch_size=config.batch_size, condition=config.condition,
                                 protocol=config.protocol, population=config.population,
                                 start=first, stop=min(first + config.batch_size, len(table))))
    options, _ = generation_settings(run.loaded.model, config.generation)
    return batch, generate(run.loaded.model, batch, first_row=first, options=options)


def write_figures(out: Path, *, runs: list[ModelRun], sections: dict[str, dict], table: pa.Table,
                  reference: Reference, config: EvalConfig) -> list[str]:
    folder, model = out / "figures", runs[0]
    written, regenerated = [], {}
    mse = window_overall(model, "mse")
    for tag, row in pick_windows(model).items():
        first = (row // config.batch_size) * config.batch_size
        if first not in regenerated:
            regenerated[first] = _regenerate(model, table, config, first)
        batch, generated = regenerated[first]
        i = row - first
        scale = float(batch["scale"][i])  # model space -> mV
        traces = {"recorded": batch["ecg"][i] * scale, model.name: generated[i] * scale}
        title = f"{tag} window by MSE: {reference.window_ids[row]} ({model.name}, window-space MSE {mse[row]:.4g})"
        written.append(figures.plot_twelve_lead(
            folder / f"window_{tag}.png", traces=traces, title=title, lead_mask=reference.recorded_mask[row]))
    written.append(figures.plot_per_lead(folder / "per_lead_window.png", sections=sections, space="window"))
    written.append(figures.plot_per_lead(folder / "per_lead_minmax.png", sections=sections, space="minmax"))
    written.append(figures.plot_bland_altman(folder / "hr_bland_altman.png", recorded_bpm=reference.hr,
                                             generated={run.name: run.hr for run in runs}))
    written.append(figures.plot_models(folder / "models.png", sections=sections, space="window"))
    return [str(path.relative_to(out)) for path in written]


def _data_section(table: pa.Table, config: EvalConfig) -> dict[str, Any]:
    split_counts = dict(zip(*np.unique(table.column("split").to_pylist(), return_counts=True), strict=True))
    return {"uri": list(config.data), "n_windows": len(table),
            "n_subjects": len(set(table.column("subject_id").to_pylist())), "split": config.split,
            "max_windows": config.max_windows, "n_windows_per_split": {k: int(v) for k, v in split_counts.items()},
            "window_ids_sha256": _ids_digest(table)}


def _ids_digest(table: pa.Table) -> str:
    import hashlib

    return hashlib.sha256("\n".join(table.column("window_id").to_pylist()).encode()).hexdigest()


def run_evaluation(*, model_uri: str, config: EvalConfig, out: str | Path, baselines: dict[str, str] | None = None,
                   encoder_uri: str | None = None, classifier_uri: str | None = None,
                   with_figures: bool = True) -> dict[str, Any]:
    """Evaluate the model and the baselines on the same windows; write and return metrics.json."""
    from p2es_dist.evaluate.report import write_report

    out = Path(out)
    baselines = dict(baselines or {})
    loaded = {"model": _load(model_uri, "model")}
    loaded.update({name: _load(uri, "baseline") for name, uri in baselines.items()})
    classifier_loaded = _load(classifier_uri, "classifier") if classifier_uri else None
    classifier = classifier_loaded.model.eval() if classifier_loaded is not None else None
    threshold_info = classifier_thresholds(classifier_loaded, config) if classifier_loaded is not None else None
    encoder = _load(encoder_uri, "encoder").model.eval() if encoder_uri else None

    table = read_eval_windows(config.data, split=config.split, max_windows=config.max_windows)
    with_templates = "calib_pat_s" in table.column_names
    if config.protocol != "zero-shot" or with_templates:
        templates.check_protocol(config.data, config.protocol, config.calibration_s)
        table = templates.scored_rows(table, config.protocol)
        config.population = population_from_shards(config.data)
        loaded.update(templates.template_baselines(config.protocol, config.population))
    log.info("evaluating %d windows of split %s (%s protocol)", len(table), config.split, config.protocol)
    reference = compute_reference(table, config, classifier=classifier, encoder=encoder)
    if not reference.mask.any():
        raise UserError(f"--condition {','.join(config.condition)}: no recorded lead is left to score in these "
                        "windows (every recorded lead is a model input)")
    names = {"model": loaded["model"].name, **{name: name for name in loaded if name != "model"}}
    if names["model"] in baselines:
        names["model"] = f"{names['model']} (model)"
    runs = [run_model(names[key], value, table, reference, config, classifier=classifier, encoder=encoder)
            for key, value in loaded.items()]
    sections = {run.name: summarise(run, reference, config) for run in runs}

    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "version": __version__}
    document.update(sections[runs[0].name])
    document.update({
        "data": _data_section(table, config),
        "condition": list(config.condition) or None,
        "space": SPACE_DEFINITIONS,
        "dtw": {"local_cost": "|a - b| (dtaidistance inner_dist='euclidean'), summed along the warping path",
                "normalised_by": "L", "band": "Sakoe-Chiba |i - j| <= round(0.1 L)",
                "band_samples": metrics.sakoe_chiba_window(int(table.column("ecg").type.list_size // 12)) - 1,
                "dtaidistance_window": metrics.sakoe_chiba_window(int(table.column("ecg").type.list_size // 12)),
                "computed": config.with_dtw},
        "hr_method": {"detector": "neurokit2 ecg_clean + ecg_peaks (method 'neurokit') on lead II in mV",
                      "rate": "60 / median RR", "min_peaks": metrics.HR_MIN_PEAKS,
                      "note": ("lead II is a model input (--condition): its heart rate is not a fair test"
                               if "II" in config.condition else None)},
        "diagnostic_info": ({"classifier": classifier_uri, **diagnostic_summary(reference.labels),
                             "threshold": threshold_info, "input_only": input_only_info(config)}
                            if classifier is not None else {"classifier": None, "note": "no --classifier given"}),
        "bootstrap": {"n": config.n_boot, "level": 0.95, "unit": "subject", "seed": config.generation.seed},
        "baselines": {run.name: sections[run.name] for run in runs[1:]},
        "protocol": {"name": config.protocol,
                     "calibration_s": config.calibration_s if config.protocol == "calibrated" else None,
                     "scored": ("windows starting at or after the end of their record's calibration segment"
                                if config.protocol == "calibrated" else "every window of the split"),
                     "population": templates.population_summary(config.population),
                     "verdict": templates.lead_ii_verdict(sections, runs[0].name, config.protocol)},
    })
    out.mkdir(parents=True, exist_ok=True)
    if with_figures:
        document["figures"] = write_figures(out, runs=runs, sections=sections, table=table, reference=reference,
                                            config=config)
    validate_metrics(document)
    (out / "metrics.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_lead_ii_windows(out / LEAD_II_WINDOWS, runs, reference)
    write_report(out / "report.md", document)
    return document
