"""`report.md`: the metrics.json of `p2es evaluate` as tables a reader can scan, with the figures linked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _diagnostic(doc: dict) -> list[str]:
    info = doc.get("diagnostic_info", {})
    lines = ["## Diagnostic value", ""]
    if doc.get("diagnostic") is None:
        return lines + [f"Not measured: {info.get('note', 'no --classifier given')}.", ""]
    lines += [f"Classifier `{info.get('classifier')}` applied to the recorded ECG (its recorded leads) and to the "
              f"generated 12-lead ECG of the same windows. Threshold {info.get('threshold')} on the probability; "
              f"{info.get('n_labelled')} labelled windows, {info.get('n_unlabelled')} without labels (skipped). "
              "Labels without a positive among the labelled windows are omitted.", ""]
    keys = ("sensitivity", "specificity", "precision", "f1", "auroc")
    for name, section in _models(doc).items():
        diag = section["diagnostic"]
        if not diag["recorded"]:
            lines += [f"{name}: no label has a positive among the labelled windows.", ""]
            continue
        rows = [[label, str(diag["recorded"][label]["n_pos"]),
                 *[f"{_fmt(diag['recorded'][label][k], 3)} / {_fmt(diag['generated'][label][k], 3)}" for k in keys]]
                for label in diag["recorded"]]
        lines += [f"### {name} (recorded / generated)", "", *_table(["label", "positives", *keys], rows), ""]
    return lines


def _fd_text(doc: dict) -> list[str]:
    note = doc.get("fd_info", {}).get("note")
    lines = ["## What fd is", "",
             "`fd` is the Fréchet distance between Gaussian fits of foundation-encoder features of the generated "
             "and of the recorded ECGs of the same windows (both embedded with the recorded lead mask, PPG "
             "masked out): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Lower is closer. It is never "
             "computed on raw samples."]
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
