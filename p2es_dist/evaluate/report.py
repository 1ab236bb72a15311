"""`report.md`: the metrics.json of `p2es evaluate` as tables a reader can scan, with the figures linked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2es_dist.evaluate.diagnostic import verdict
from p2es_dist.evaluate.metrics import METRICS


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _with_ci(section: dict, metric: str) -> str:
    low, high = section["ci95"].get(metric, [None, None])
    if low is None or high is None:
        return _fmt(section.get(metric))
    return f"{_fmt(section.get(metric))} [{_fmt(low, 3)}, {_fmt(high, 3)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _models(doc: dict) -> dict[str, dict]:
    return {doc["model"]["name"]: doc, **doc.get("baselines", {})}


def _comparison(doc: dict) -> list[str]:
    lines = []
    for space in ("window", "minmax"):
        rows = [[name, *[_with_ci(s["spaces"][space]["overall"], m) for m in METRICS]]
                for name, s in _models(doc).items()]
        lines += [f"### Overall, {space} space (mean over leads of the per-lead means, 95 % CI)", "",
                  *_table(["model", *METRICS], rows), ""]
    rows = [[name, _fmt(s["hr_mae_bpm"], 3), f"{s['hr']['n_windows']} / {s['hr']['n_excluded']}", _fmt(s["fd"]),
             _fmt(s["timing"]["windows_per_s"], 3), str(s["model"]["params"]),
             " ".join(f"{k}={v}" for k, v in s["generation"].items() if v is not None)]
            for name, s in _models(doc).items()]
    header = ["model", "HR MAE (bpm)", "HR windows used / excluded", "fd", "windows/s", "params", "generation"]
    return lines + ["### Heart rate, Fréchet distance, speed", "", *_table(header, rows), ""]


def _per_lead(doc: dict) -> list[str]:
    lines = []
    for space in ("window", "minmax"):
        leads = doc["spaces"][space]["leads"]
        rows = [[lead, str(v["n"]), *[_with_ci(v, m) for m in METRICS]] for lead, v in leads.items()]
        lines += [f"### {doc['model']['name']}, {space} space", "", *_table(["lead", "n", *METRICS], rows), ""]
    return lines


def _breakdown(doc: dict) -> list[str]:
    lines = []
    for key, title in (("age", "age band"), ("sex", "sex")):
        rows = [[group, str(v["n_windows"]), str(v["n_subjects"]), *[_fmt(v[m]) for m in METRICS]]
                for group, v in doc["breakdown"][key].items()]
        lines += [f"### By {title} (window space, point estimates)", "",
                  *_table([title, "windows", "subjects", *METRICS], rows), ""]
    rows = [[w["subject_id"], str(w["n_windows"]), _fmt(w["mse"]), _fmt(w.get("pearson"))]
            for w in doc["worst_subjects"]]
    lines += ["### Worst subjects (highest mean window-space MSE)", "",
              *_table(["subject", "windows", "mse", "pearson"], rows), ""]
    return lines


VARIANT_NAMES = {"recorded": "recorded", "generated": "generated", "input_only": "input-only"}
THRESHOLD_KEYS = ("sensitivity", "specificity", "precision", "f1")


def _auroc_ci(row: dict) -> str:
    interval = row.get("auroc_ci95")
    if row.get("auroc") is None or not interval:
        return _fmt(row.get("auroc"), 3)
    return f"{row['auroc']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _difference_words(difference: dict | None, other: str) -> str:
    """"beats input-only by 0.04 [0.01, 0.07]" / "indistinguishable from recorded: ..." in words."""
    if not difference or difference.get("auroc") is None:
        return f"no AUROC difference to {other} (a class is missing)"
    value, interval = difference["auroc"], difference.get("ci95")
    if interval is None:
        return f"{value:+.3f} AUROC against {other}, no interval (a class comes from fewer than two subjects)"
    which = verdict(difference)
    if which == "higher":
        return f"beats {other} by {value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    if which == "lower":  # the shortfall and its interval as positive numbers
        return f"falls short of {other} by {-value:.3f} [{-interval[1]:.3f}, {-interval[0]:.3f}]"
    return (f"indistinguishable from {other} ({value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]: the "
            "interval contains 0)")


def _winner(diag: dict, label: str) -> str:
    """Which of the three wins on AUROC, in one phrase, from the two paired intervals."""
    differences = diag.get("differences", {}).get(label, {})
    vs_input = verdict(differences.get("generated_minus_input_only"))
    vs_recorded = verdict(differences.get("generated_minus_recorded"))
    if vs_input is None or vs_recorded is None:
        return "no verdict"
    if vs_input == "higher":
        return "generated wins over input-only" + (", as good as recorded" if vs_recorded != "lower"
                                                   else ", recorded wins overall")
    if vs_input == "lower":
        return "input-only wins: the generated ECG loses what its input carried"
    return "no gain from generation: input-only does as well"


def _threshold_text(info: dict) -> str:
    threshold = info.get("threshold") or {}
    if threshold.get("source") != "validation":
        return (f"**No validation thresholds: {threshold.get('note', 'none stored')}.** Sensitivity, specificity, "
                "precision and F1 are not reported (never fitted on the evaluated windows).")
    fitted = threshold.get("fitted_on") or {}
    return (f"Per-label thresholds maximise Youden's J on the classifier's validation windows (split "
            f"`{fitted.get('split')}` of {', '.join(fitted.get('data') or [])}, {fitted.get('n_windows')} windows; "
            f"`{threshold.get('uri')}`), never on the evaluated split.")


def _diagnostic(doc: dict) -> list[str]:
    info = doc.get("diagnostic_info", {})
    lines = ["## Diagnostic value", ""]
    if doc.get("diagnostic") is None:
        return lines + [f"Not measured: {info.get('note', 'no --classifier given')}.", ""]
    input_only = (info.get("input_only") or {}).get("description", "the model's input leads alone")
    lines += [f"Classifier `{info.get('classifier')}` applied to three ECGs of the same windows: **recorded** "
              "(its recorded leads), **generated** (the model's 12 leads) and **input-only** "
              f"({input_only}). {info.get('n_labelled')} labelled windows, {info.get('n_unlabelled')} without "
              "labels (skipped); labels without a positive among the labelled windows are omitted. AUROC and "
              "AUPRC are threshold-free; AUROC intervals and the paired differences are 95 % subject bootstraps.",
              "", _threshold_text(info), ""]
    for name, section in _models(doc).items():
        diag = section["diagnostic"]
        if not diag["recorded"]:
            lines += [f"{name}: no label has a positive among the labelled windows.", ""]
            continue
        variants = [v for v in VARIANT_NAMES if v in diag]
        rows = [[label, VARIANT_NAMES[variant], str(diag[variant][label]["n_pos"]), _auroc_ci(diag[variant][label]),
                 _fmt(diag[variant][label].get("auprc"), 3), _fmt(diag[variant][label].get("threshold"), 3),
                 *[_fmt(diag[variant][label][k], 3) for k in THRESHOLD_KEYS]]
                for label in diag["recorded"] for variant in variants]
        lines += [f"### {name}", "", *_table(["label", "ECG", "positives", "AUROC [95 % CI]", "AUPRC", "threshold",
                                              *THRESHOLD_KEYS], rows), ""]
        for label in diag["recorded"]:
            differences = diag.get("differences", {}).get(label, {})
            parts = [f"generated {_difference_words(differences.get(key), other)}"
                     for key, other in (("generated_minus_input_only", "input-only"),
                                        ("generated_minus_recorded", "recorded")) if key in differences]
            lines.append(f"- **{label}**: {_winner(diag, label)}; " + "; ".join(parts) + ".")
        lines.append("")
    return lines


def _fd_text(doc: dict) -> list[str]:
    note = doc.get("fd_info", {}).get("note")
    features = doc.get("fd_features")
    source = {"encoder": "foundation-encoder features", "classifier": "the diagnostic classifier's pooled "
              "features (no --encoder given)"}.get(features, "learned features (foundation encoder, else the "
                                                   "diagnostic classifier's pooled features)")
    lines = ["## What fd is", "",
             f"`fd` is the Fréchet distance between Gaussian fits of {source} of the generated and of the "
             "recorded ECGs of the same windows (both with the recorded lead mask, PPG masked out): "
             "||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Lower is closer. It is never computed on "
             "raw samples, and values in different feature spaces are not comparable."]
    if note:
        lines += ["", f"Not computed in this run: {note}."]
    return lines + [""]


def _protocol(doc: dict) -> list[str]:
    """The protocol, and in words whether the model beats the template baseline of that protocol."""
    protocol = doc.get("protocol") or {}
    if not protocol:
        return []
    lines = [f"## Protocol: {protocol['name']}", "", f"- scored: {protocol['scored']}"]
    population = protocol.get("population")
    if population:
        lines.append(f"- population template: median beat ({', '.join(population['leads'])}) and median PAT "
                     f"{population['pat_s'] * 1000:.0f} ms of {population['n_records']} records, "
                     f"{population['source']}")
    verdict = protocol.get("verdict")
    if verdict:
        beats = "beats" if verdict["beats_template"] else "does NOT beat"
        lines.append(f"- **lead II: {doc['model']['name']} {beats} `{verdict['template']}`** (Pearson "
                     f"{verdict['model_pearson_ii']:.3f} vs {verdict['template_pearson_ii']:.3f})")
    elif population is None and protocol["name"] == "zero-shot":
        lines.append("- no template baseline: the shards carry no beat timing (re-ingest with this version)")
    return lines + [""]


def render_report(doc: dict) -> str:
    data = doc["data"]
    condition = ", ".join(doc["condition"]) if doc.get("condition") else None
    task = f"12 leads from recorded lead(s) {condition}" if condition else "12-lead ECG from PPG"
    lines = [
        f"# Evaluation of {doc['model']['name']}", "",
        f"- task: {task}; scored leads: recorded leads that were not a model input",
        f"- data: {', '.join(data['uri'])}, split `{data['split']}`: {data['n_windows']} windows, "
        f"{data['n_subjects']} subjects" + (f" (capped at {data['max_windows']})" if data.get("max_windows") else ""),
        f"- model: `{doc['model'].get('uri', '')}` ({doc['model']['params']} parameters)",
        f"- spaces: **window**: {doc['space']['window']}; **minmax**: {doc['space']['minmax']}",
        f"- DTW: {doc['dtw']['local_cost']}, divided by L; {doc['dtw']['band']} = {doc['dtw']['band_samples']} "
        f"samples (dtaidistance window={doc['dtw']['dtaidistance_window']})",
        f"- heart rate: {doc['hr_method']['detector']}, {doc['hr_method']['rate']}; windows with fewer than "
        f"{doc['hr_method']['min_peaks']} R-peaks in either ECG are excluded and counted",
        f"- intervals: 95 % percentile bootstrap over subjects ({doc['bootstrap']['n']} replicates)", "",
        *_protocol(doc),
        "## Model vs baselines (same windows)", "", *_comparison(doc),
        "## Per lead", "", *_per_lead(doc),
        "## Breakdown", "", *_breakdown(doc),
        *_diagnostic(doc), *_fd_text(doc),
    ]
    if doc["hr_method"].get("note"):
        lines += [f"Note: {doc['hr_method']['note']}.", ""]
    if doc.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(p).stem}]({p})" for p in doc["figures"]] + [""]
    return "\n".join(lines)


def write_report(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    path.write_text(render_report(doc))
    return path
