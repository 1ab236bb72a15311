"""The whole pipeline, small, on the embedded defaults: what `make demo` runs.

    p2es quickstart --out demo_out [--data-root ../shared/data] [--windows 4000]

Starts the embedded object store and a local Ray unless they are already running (and stops only what it
started), ingests a synthetic cohort (plus the real BIDMC records under --data-root when given) into
s3://p2es-demo/, streams the shards back through the Ray Data loader, trains the P2Es teacher briefly
with Ray Train + DeepSpeed, runs the smoke Ray Tune search, evaluates the teacher on the test split
(metrics.json, report.md, figures), distils it into the mobile student (teacher outputs by Ray Data
batch inference, Ray Train, pruning, ONNX), evaluates and exports the student as a bundle, translates a
real PPG record with it (when --data-root has one), and prints a table with every path.
Everything is tiny and undertrained: the demo shows the pipeline, not the models' quality.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from p2es_dist.cli import run_main
from p2es_dist.jobs.common import connect_ray, parser

BUCKET = "s3://p2es-demo"
EVAL_WINDOWS = 64
CALIBRATION_S = 60.0


def _stream(uri: str) -> dict:
    """Read every split of a shard folder through the training loader; count windows and time it."""
    from p2es_dist.data.loader import LoaderConfig, model_space_dataset, torch_batches

    config = LoaderConfig(uris=[uri], batch_size=64)
    counts, begin = {}, time.perf_counter()
    for split in ("train", "val", "test"):
        dataset = model_space_dataset(config, split=split, training=split == "train")
        counts[split] = sum(len(b["ecg"]) for b in torch_batches(dataset, config, training=False))
    elapsed = time.perf_counter() - begin
    return {"windows": counts, "windows_per_s": round(sum(counts.values()) / max(elapsed, 1e-9), 1)}


def _smoke_overrides(uris: list[str], steps: int) -> list[str]:
    return [f"data.uris=[{', '.join(uris)}]", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
            f"train.eval_every={steps}", f"train.storage_path={BUCKET}/runs"]


def _train(uris: list[str], steps: int, out: Path) -> dict:
    from p2es_dist.config import load_config
    from p2es_dist.train.trainer import run_training

    print(f"\ntraining the P2Es teacher for {steps} steps (Ray Train + DeepSpeed)...", flush=True)
    # The teacher takes calibration templates, so the demo can translate a103l zero-shot and calibrated.
    overrides = [*_smoke_overrides(uris, steps), "model.use_template=true"]
    result = run_training(load_config("smoke", overrides), out=str(out / "train"))
    return {"uri": result["checkpoint"], "val_x0_mse": result["val"].get("val_x0_mse"), "steps": result["steps"]}


def _tune(uris: list[str], out: Path) -> dict:
    try:
        from p2es_dist.tune.search import run_search
    except ModuleNotFoundError:
        return {"uri": "-", "status": "p2es tune is not available in this version"}
    from p2es_dist.config import load_config

    print("\nsmoke search over noise schedules and depths (Ray Tune + ASHA)...", flush=True)
    space = Path(__file__).resolve().parents[2] / "tune_spaces" / "smoke.yaml"
    best = run_search(str(space), load_config("smoke", _smoke_overrides(uris, 6)), out=str(out / "tune"))
    return {"uri": best.get("checkpoint"), best.get("metric", "val_x0_mse"): best.get("value"),
            "trials": best.get("trials")}


def _evaluate(model_uri: str, uris: list[str], out: Path) -> dict:
    from p2es_dist.evaluate.pipeline import run_evaluation
    from p2es_dist.evaluate.runner import EvalConfig

    print(f"\nevaluating {model_uri} on {EVAL_WINDOWS} test windows...", flush=True)
    config = EvalConfig(data=uris, split="test", max_windows=EVAL_WINDOWS, n_boot=200)
    metrics = run_evaluation(model_uri=model_uri, config=config, out=out)
    overall = metrics["spaces"]["window"]["overall"]
    return {"uri": str(out / "report.md"), "result": f"mse {overall['mse']:.4f}, pearson {overall['pearson']:.3f} "
            f"(model space, {metrics['data']['n_windows']} windows)"}


def _distill(teacher_uri: str, uri: str, out: Path) -> dict:
    from p2es_dist.config import load_config
    from p2es_dist.distill.run import run_distill

    print("\ndistilling the teacher into the mobile student (Ray Data actors, Ray Train, pruning)...", flush=True)
    overrides = [f"distill.teacher={teacher_uri}", f"distill.cache_root={BUCKET}/teacher_outputs",
                 "distill.steps=5", "distill.finetune_steps=20", "distill.prune_windows=64", f"data.uris=[{uri}]",
                 "train.max_steps=60", "train.eval_every=60", "train.checkpoint_every=60", "train.val_batches=2",
                 "train.cpus_per_worker=0.5", f"train.storage_path={BUCKET}/runs"]
    result = run_distill(load_config("distill", overrides), out=str(out))
    return {"uri": result["checkpoint"], "result": f"{result['params']:,} parameters, {result['bytes']:,} bytes, "
            f"val_x0_mse {result['val'].get('val_x0_mse', float('nan')):.4f}"}


def _export(checkpoint: str, metrics: Path, train_result: Path, out: Path) -> dict:
    from p2es_dist.export.bundle import write_bundle

    summary = write_bundle(checkpoint, str(out), metrics=str(metrics), train_result=str(train_result),
                           overwrite=True)
    files = ", ".join(sorted(summary.get("files", []))) or "bundle written"
    return {"uri": str(out), "result": files}


def _translate(bundle: Path, teacher: str, data_root: Path | None, out: Path) -> list[tuple[str, dict]]:
    """a103l with the student bundle, then with the teacher zero-shot and calibrated on its own first 60 s."""
    record = data_root / "wfdb_samples" / "a103l" if data_root else None
    if record is None or not record.with_suffix(".hea").exists():
        return []
    from p2es_dist.translate.calibrate import calibrate_file
    from p2es_dist.translate.run import translate_file

    out.mkdir(parents=True, exist_ok=True)
    translate_file(model=str(bundle), input=str(record), out=str(out / "a103l"), png=str(out / "a103l.png"))
    rows = [("translate a103l", {"uri": str(out / "a103l.hea"), "result": "student, 12-lead WFDB at 125 Hz (+ png)"})]
    profile = calibrate_file(input=str(record), out=str(out / "a103l_profile.json"), seconds=CALIBRATION_S)
    zero_shot = translate_file(model=teacher, input=str(record), out=str(out / "a103l_zero_shot"),
                               score_from_s=CALIBRATION_S)
    calibrated = translate_file(model=teacher, input=str(record), out=str(out / "a103l_calibrated"),
                                calibration=str(out / "a103l_profile.json"), png=str(out / "a103l_calibrated.png"))
    figure = _compare_strips(record, out, start_s=CALIBRATION_S)

    def pearson(summary: dict) -> str:
        scored = summary.get("recorded") or {}
        return "n/a" if not scored else f"{scored['pearson']:.2f}"

    rows.append(("calibrate a103l", {"uri": str(out / "a103l_profile.json"),
                                     "result": f"PAT {profile['pat_s'] * 1000:.0f} ms from {profile['n_beats']} beats "
                                               f"of its first {CALIBRATION_S:.0f} s"}))
    rows.append(("zero-shot vs calibrated", {"uri": str(figure),
                                             "result": f"teacher lead II Pearson after {CALIBRATION_S:.0f} s: "
                                                       f"zero-shot {pearson(zero_shot)}, calibrated "
                                                       f"{pearson(calibrated)}"}))
    return rows


def _compare_strips(record: Path, out: Path, *, start_s: float, seconds: float = 10.0) -> Path:
    """Recorded, zero-shot and calibrated lead II of a103l, 10 s after the calibration segment."""
    import wfdb

    from p2es_dist.constants import FS, LEAD_INDEX
    from p2es_dist.evaluate.figures import plot_rhythm_strips
    from p2es_dist.translate.recorded import recorded_leads

    span = slice(int(start_s * FS), int((start_s + seconds) * FS))
    recorded = recorded_leads(str(record))
    traces = {"recorded": recorded[0]["II"][span]} if recorded and "II" in recorded[0] else {}
    for name in ("zero_shot", "calibrated"):
        generated = wfdb.rdrecord(str(out / f"a103l_{name}")).p_signal[:, LEAD_INDEX["II"]]
        traces[f"teacher, {name.replace('_', '-')}"] = generated[span]
    return plot_rhythm_strips(out / "a103l_compare.png", traces=traces,
                              title=f"a103l lead II, {start_s:.0f}-{start_s + seconds:.0f} s (calibration: 0-"
                                    f"{start_s:.0f} s)")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es quickstart", "the pipeline end to end on the embedded object store and a local Ray")
    p.add_argument("--data-root", help="folder with PhysioNet data (bidmc/ under it is ingested too)")
    p.add_argument("--windows", type=int, default=4000, help="synthetic cohort size")
    p.add_argument("--store-dir", help="object store state folder (default: under the user's cache)")
    p.add_argument("--steps", type=int, default=60, help="training steps of the teacher")
    args = p.parse_args(argv)
    out = Path(args.out or "demo_out").resolve()
    out.mkdir(parents=True, exist_ok=True)

    from p2es_dist.config import load_config
    from p2es_dist.data.ingest import run_ingest
    from p2es_dist.storage import objectstore

    summary: dict = {"stages": {}}
    with objectstore.running(args.store_dir) as store:
        os.environ.update(store.env())
        print(f"object store: {store.endpoint}", flush=True)
        started_ray = connect_ray()
        try:
            sources = [("synthetic", None, {"synthetic": {"n_windows": args.windows, "seed": 0}})]
            bidmc_root = Path(args.data_root) / "bidmc" if args.data_root else None
            if bidmc_root is not None:
                if not bidmc_root.is_dir():
                    print(f"--data-root: {bidmc_root} not found; using synthetic data only", flush=True)
                else:
                    sources.append(("bidmc", str(bidmc_root), {}))
            for source, input_uri, overrides in sources:
                config = load_config("ingest")
                for section, values in overrides.items():
                    config.setdefault(section, {}).update(values)
                output = f"{BUCKET}/{source}"
                # The demo bucket is quickstart's own: an ingest by an older version is redone, not refused.
                manifest = run_ingest(source, input_uri, output, config, replace_other_settings=True)
                streamed = _stream(output)
                summary["stages"][f"ingest {source}"] = {
                    "uri": output, "windows": manifest["n_windows"], "subjects": manifest["n_subjects"],
                    "quarantined_windows": manifest["n_windows_quarantined"], "stream": streamed,
                }
            uris = [info["uri"] for info in summary["stages"].values()]
            summary["stages"]["train p2es"] = _train(uris, args.steps, out)
            summary["stages"]["tune smoke"] = _tune(uris, out)
            teacher = summary["stages"]["train p2es"]["uri"]
            summary["stages"]["evaluate teacher"] = _evaluate(teacher, uris, out / "evaluate")
            summary["stages"]["distill student"] = _distill(teacher, f"{BUCKET}/synthetic", out / "distill")
            student = summary["stages"]["distill student"]["uri"]
            summary["stages"]["evaluate student"] = _evaluate(student, uris, out / "evaluate_student")
            summary["stages"]["export student"] = _export(student, out / "evaluate_student" / "metrics.json",
                                                          out / "distill" / "result.json", out / "bundle")
            translated = _translate(out / "bundle", teacher, Path(args.data_root) if args.data_root else None,
                                    out / "translate")
            for stage, info in translated:
                summary["stages"][stage] = info
        finally:
            if started_ray:
                from p2es_dist.jobs.common import stop_local_ray

                stop_local_ray()
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2))

    rows = [("stage", "where", "result")]
    for stage, info in summary["stages"].items():
        if "windows" in info:
            w = info["windows"]
            result = f"windows {w['train']}/{w['val']}/{w['test']} (train/val/test), " \
                     f"streamed at {info['stream']['windows_per_s']}/s"
        elif "val_x0_mse" in info:
            trials = f" over {info['trials']} trials" if "trials" in info else ""
            result = f"val_x0_mse {info['val_x0_mse']:.4f}{trials}"
        else:
            result = info.get("result") or info.get("status", "")
        rows.append((stage, str(info["uri"]), result))
    print("\n" + _table(rows))
    print(f"\nreport: {out / 'evaluate' / 'report.md'} (figures in {out / 'evaluate' / 'figures'})")
    print(f"checkpoints: {summary['stages']['train p2es']['uri']} (teacher), "
          f"{summary['stages']['distill student']['uri']} (student)")
    print(f"mobile model: {out / 'bundle'} (model.onnx, model.pt, model.safetensors, MODEL_CARD.md)")
    print(f"summary: {out / 'quickstart.json'}")
    print(f"shards: {BUCKET}/ in the object store under {store.state_dir} "
          "(`p2es objectstore start` serves them again)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es quickstart"))
