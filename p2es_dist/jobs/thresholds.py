"""Choose the diagnostic classifier's per-label thresholds on its validation windows (`thresholds.json`).

    p2es thresholds --classifier runs/clf                          # the run's own data.uris, split val
    p2es thresholds --classifier runs/clf/.../step-00002000 --data shards/ptbxl,shards/cinc --max-windows 5000

`p2es train` does this itself at the end of a `classifier` run; this command is for classifiers trained
before, or to refit on other validation data. `p2es evaluate --classifier` only reads the file
(`p2es_dist/evaluate/thresholds.py`). Prints one JSON line: where it was written and the thresholds.
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es thresholds", "per-label Youden-J thresholds of a diagnostic classifier, chosen on its "
               "validation windows and stored beside its weights", config=False)
    p.add_argument("--classifier", required=True,
                   help="the classifier: its training --out folder / result.json, or a checkpoint folder")
    p.add_argument("--data", help="shard folder(s), comma separated (default: the run's data.uris)")
    p.add_argument("--split", default="val", choices=["val", "train"],
                   help="the split thresholds are chosen on (never the test split)")
    p.add_argument("--max-windows", type=int, help="a deterministic subset of N windows of that split")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    apply_common(args)
    from p2es_dist.evaluate.thresholds import fit_classifier_thresholds, run_data_uris

    data = [part.strip() for part in (args.data or "").split(",") if part.strip()] or run_data_uris(args.classifier)
    if not data:
        raise UserError(f"--classifier {args.classifier}: no result.json with data.uris there; give --data")
    if args.max_windows is not None and args.max_windows < 1 or args.batch_size < 1:
        raise UserError("--max-windows and --batch-size must be >= 1")
    document = fit_classifier_thresholds(args.classifier, data, split=args.split, max_windows=args.max_windows,
                                         batch_size=args.batch_size)
    if args.out:  # a copy beside the job's other summaries; the classifier's own copy is what evaluate reads
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "thresholds.json").write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"thresholds": document["uri"], "split": document["split"], "n_windows": document["n_windows"],
                      "labels": {k: round(v["threshold"], 6) for k, v in document["labels"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es thresholds"))
