"""A checkpoint -> a publishable bundle (`p2es_dist/export/bundle.py`; README "Distillation, bundles, translation").

    p2es export --checkpoint out/distill --metrics out/eval-student/metrics.json --out bundles/p2es-student
    p2es export --checkpoint s3://p2es/runs/p2es-.../checkpoint_000001 --train-result out/train/result.json \
        --metrics out/eval/metrics.json --out bundles/p2es-teacher
    p2es export --checkpoint out/train --no-metrics --out bundles/untested      # card says: not evaluated

The bundle states the preprocessing and labels of the training data (`config.data.uris` of the run's
result.json: each folder's manifest.json and shards); export refuses when they cannot be read, or when the
folders were ingested with different settings, unless `--preprocessing-from-defaults`.

`--kind` defaults from the model's name (p2es: teacher, student: student, encoder, classifier, anything
else: baseline); students also get `model.onnx` and `model.pt`, each checked against PyTorch.
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser


def main(argv: list[str] | None = None) -> int:
    from p2es_dist.export.bundle import KINDS

    p = parser("p2es export", "checkpoint -> publishable bundle: safetensors, config.json, MODEL_CARD.md, "
                              "metrics.json (+ ONNX and TorchScript for students), SHA256SUMS", config=False)
    for action in p._actions:  # the shared --out is a summary folder elsewhere; here it is the bundle itself
        if action.dest == "out":
            action.help, action.metavar = "the bundle folder to create (local path, file:// or s3://)", "DIR"
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (model.safetensors + model.json), a job's --out folder or result.json")
    p.add_argument("--metrics", help="metrics.json of `p2es evaluate` on this model (required unless --no-metrics)")
    p.add_argument("--no-metrics", action="store_true",
                   help="publish without an evaluation; the card says in bold that the model was not evaluated")
    p.add_argument("--kind", choices=KINDS, help="what the model is (default: from its name)")
    p.add_argument("--train-result", help="result.json of the training run, whose config.data.uris name the "
                                          "training data: its preprocessing, labels and licences (default: "
                                          "beside --checkpoint, if any)")
    p.add_argument("--preprocessing-from-defaults", action="store_true",
                   help="where the training data's manifests or shards cannot be read (no result.json, data "
                        "moved): state ingest's default preprocessing instead of refusing; the card says so")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    args = p.parse_args(argv)
    if not args.out:
        raise UserError("--out: required (the bundle folder to create)")
    apply_common(args)
    from p2es_dist.export.bundle import write_bundle

    summary = write_bundle(args.checkpoint, args.out, metrics=args.metrics, no_metrics=args.no_metrics,
                           kind=args.kind, train_result=args.train_result, overwrite=args.overwrite,
                           preprocessing_from_defaults=args.preprocessing_from_defaults)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es export"))
