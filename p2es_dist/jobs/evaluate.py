"""Evaluate a model (and baselines, on the very same windows) on window shards (README "Evaluation";
the output's layout is `p2es_dist/schemas/metrics.schema.json`).

    p2es evaluate --model runs/p2es/result.json --data shards/bidmc --out eval/ \
        --baselines dct=runs/dct,li2021=runs/li2021 --classifier runs/clf --encoder runs/pretrain
    p2es evaluate --model runs/p2es_lead2 --data shards/ptbxl --condition II --classifier runs/clf --out eval_ptbxl/
    p2es evaluate --cv-folds 5 --data shards/bidmc --train-config p2es_bidmc --out cv/   # jobs/cross_validate.py
    p2es evaluate --probe --encoder runs/pretrain --train-data shards/ptbxl --data shards/ptbxl --labels MI,NORM \
        --out probe/
    ray job submit --working-dir . -- python -m p2es_dist.jobs.evaluate --model s3://p2es/runs/... --data s3://...

Writes `--out`/metrics.json (validated against p2es_dist/schemas/metrics.schema.json), report.md and
figures/*.png, and prints the headline numbers as one JSON line. Runs in this process (no Ray needed):
see `p2es_dist.evaluate.windows` for why.
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser


def _list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def parse_baselines(value: str | None) -> dict[str, str]:
    """`dct=runs/dct,li2021=s3://p2es/runs/li` -> {"dct": "runs/dct", "li2021": "s3://..."}."""
    baselines: dict[str, str] = {}
    for item in _list(value):
        name, sep, uri = item.partition("=")
        if not sep or not name.strip() or not uri.strip():
            raise UserError(f"--baselines: expected name=URI[,name=URI...], got {item!r}")
        if name.strip() in baselines:
            raise UserError(f"--baselines: name {name.strip()!r} given twice")
        baselines[name.strip()] = uri.strip()
    return baselines


def _probe(args) -> int:
    try:
        from p2es_dist.evaluate.probe import run_probe
    except ImportError as exc:
        raise UserError("--probe: probe not available in this installation (p2es_dist.evaluate.probe)") from exc
    if not args.encoder or not args.train_data or not args.data or not args.labels or not args.out:
        raise UserError("--probe needs --encoder, --train-data, --data, --labels and --out")
    result = run_probe(encoder_uri=args.encoder, train_data=_list(args.train_data), data=_list(args.data),
                       labels=_list(args.labels), out=args.out, split=args.split, seed=args.seed,
                       features=args.probe_features, bootstrap=args.bootstrap, max_windows=args.max_windows)
    print(json.dumps({"probe": result.get("probe")}))
    return 0


def _eval_config(args):
    from p2es_dist.evaluate.runner import EvalConfig
    from p2es_dist.evaluate.windows import parse_condition
    from p2es_dist.models.base import GenerationOptions

    if args.batch_size < 1 or (args.n_samples is not None and args.n_samples < 1) or args.bootstrap < 0:
        raise UserError("--batch-size and --n-samples must be >= 1, --bootstrap >= 0")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps: expected a positive number, got {args.steps}")
    return EvalConfig(
        data=_list(args.data), split=args.split, max_windows=args.max_windows, batch_size=args.batch_size,
        condition=parse_condition(_list(args.condition)), n_boot=args.bootstrap, with_dtw=not args.no_dtw,
        protocol=args.protocol or "zero-shot", calibration_s=args.calibration_seconds,
        generation=GenerationOptions(seed=args.seed, sampler=args.sampler, steps=args.steps,
                                     n_samples=args.n_samples),
    )


def _cross_validate(args) -> int:
    from p2es_dist.config import load_config
    from p2es_dist.data.read import calibration_available
    from p2es_dist.evaluate.cv import markdown
    from p2es_dist.jobs.cross_validate import run_cross_validation

    data = _list(args.data)
    if len(data) != 1 or not args.train_config or not args.out:
        raise UserError("--cv-folds needs one --data shard folder, --train-config and --out")
    if args.model or args.baselines:
        raise UserError("--cv-folds trains one model per fold from --train-config: leave out --model/--baselines")
    protocols = [args.protocol] if args.protocol else (
        ["zero-shot", "calibrated"] if calibration_available(data) else ["zero-shot"])
    pooled = run_cross_validation(data=data[0], train_config=load_config(args.train_config, args.train_overrides),
                                  folds=args.cv_folds, protocols=protocols, out=args.out,
                                  eval_config=_eval_config(args), seed=args.seed)
    print("\n".join(markdown(summary) for summary in pooled.values()))
    print(json.dumps({"cv": f"{args.out}/cv.json", "verdicts": {p: s["verdict"] for p, s in pooled.items()}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es evaluate", "signal fidelity, heart rate, fd and diagnostic value of a model on window shards",
               config=False)
    p.add_argument("--model", help="checkpoint folder, job --out folder / result.json, or bundle")
    p.add_argument("--data", help="shard folder(s) with manifest.json, comma separated")
    p.add_argument("--baselines", help="name=URI[,name=URI...] evaluated on the same windows")
    p.add_argument("--encoder", help="foundation encoder checkpoint: enables fd (and --probe)")
    p.add_argument("--classifier", help="ECGClassifier checkpoint: enables the diagnostic metrics (recorded, "
                                        "generated and input-only ECG; its stored validation thresholds from "
                                        "`p2es thresholds`) and, without --encoder, fd on its features")
    p.add_argument("--condition", help="lead(s) given as input, e.g. II or I,II,V1: 12-from-those-leads "
                                       "reconstruction instead of PPG -> ECG")
    p.add_argument("--split", default="test", choices=["all", "train", "val", "test"])
    p.add_argument("--protocol", choices=["zero-shot", "calibrated"],
                   help="zero-shot (default): unseen patients; calibrated: each record's first "
                        "--calibration-seconds calibrate (PAT, own beat) and only later windows are scored; "
                        "--cv-folds evaluates both unless one is given")
    p.add_argument("--calibration-seconds", type=float, default=60.0,
                   help="--protocol calibrated: the calibration segment stored at ingest (preprocess.calibration_s)")
    p.add_argument("--max-windows", type=int, help="evaluate a deterministic subset of N windows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sampler", choices=["ddim", "ancestral"], help="stochastic models: sampler (default: model's)")
    p.add_argument("--steps", type=int, help="stochastic models: sampling steps (default: model's)")
    p.add_argument("--seed", type=int, default=0, help="generation and bootstrap seed")
    p.add_argument("--n-samples", type=int, help="stochastic models: draws averaged per window (default: the "
                   "model's, e.g. P2Es `sample_draws`)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95 %% intervals")
    p.add_argument("--no-dtw", action="store_true", help="skip DTW (reported as null)")
    p.add_argument("--no-figures", action="store_true", help="write metrics.json and report.md only")
    p.add_argument("--cv-folds", type=int, help="subject-grouped K-fold cross-validation over the subjects of "
                                                "--data: trains --train-config per fold (instead of --model)")
    p.add_argument("--train-config", help="--cv-folds: the training config (a path or a shipped name)")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--cv-folds: override a key of --train-config (repeatable)")
    p.add_argument("--probe", action="store_true", help="linear-probe AUROC of --encoder instead (see --labels)")
    p.add_argument("--train-data", help="--probe: shard folder(s) the probe is fitted on")
    p.add_argument("--labels", help="--probe: labels, e.g. MI,NORM")
    p.add_argument("--probe-features", default="channels", choices=["channels", "mean"],
                   help="--probe: per-channel token means (default) or one mean over all tokens")
    args = p.parse_args(argv)
    apply_common(args)
    if args.probe:
        return _probe(args)
    if args.cv_folds is not None:
        return _cross_validate(args)
    if not args.model or not args.data or not args.out:
        raise UserError("--model, --data and --out are required (see `p2es evaluate --help`)")
    from p2es_dist.evaluate.pipeline import run_evaluation

    config = _eval_config(args)
    doc = run_evaluation(model_uri=args.model, config=config, out=args.out, baselines=parse_baselines(args.baselines),
                         encoder_uri=args.encoder, classifier_uri=args.classifier, with_figures=not args.no_figures)
    headline = {"metrics": f"{args.out}/metrics.json", "n_windows": doc["data"]["n_windows"],
                "mse": doc["spaces"]["window"]["overall"]["mse"],
                "pearson": doc["spaces"]["window"]["overall"]["pearson"], "hr_mae_bpm": doc["hr_mae_bpm"],
                "hr_windows": doc["hr_windows"],
                "protocol": doc["protocol"]["name"], "verdict": doc["protocol"]["verdict"],
                "fd": doc["fd"], "fd_features": doc.get("fd_features"), "baselines": sorted(doc["baselines"])}
    threshold = (doc.get("diagnostic_info") or {}).get("threshold")
    if threshold is not None:
        headline["diagnostic_thresholds"] = threshold["source"] or "none: threshold-free figures only"
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es evaluate"))
