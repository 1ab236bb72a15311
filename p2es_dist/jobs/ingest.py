"""Raw records -> window shards, as a Ray job.

    p2es ingest --source bidmc --input ../shared/data/bidmc --output s3://p2es/bidmc
    p2es ingest --source synthetic --output s3://p2es/synthetic --set synthetic.n_windows=100000
    ray job submit --working-dir . -- python -m p2es_dist.jobs.ingest --source ptbxl --input /data/ptbxl \
        --output s3://bucket/ptbxl
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.data.sources import SOURCES
from p2es_dist.jobs.common import apply_common, connect_ray, parser


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es ingest", "raw records -> patient-disjoint window shards (Parquet) + manifest.json")
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--input", help="folder of raw records (not needed for --source synthetic)")
    p.add_argument("--output", required=True, help="local folder, file:// or s3://bucket/prefix")
    args = p.parse_args(argv)
    if not args.config:
        args.config = "ingest"
    config = apply_common(args)
    from p2es_dist.data.ingest import run_ingest

    started = connect_ray()
    try:
        manifest = run_ingest(args.source, args.input, args.output, config)
    finally:
        if started:
            from p2es_dist.jobs.common import stop_local_ray

            stop_local_ray()
    summary = {k: manifest[k] for k in ("source", "n_windows", "n_subjects", "n_records_ok",
                                        "n_records_quarantined", "n_windows_quarantined")}
    summary["shards"] = len(manifest["shards"])
    summary["output"] = args.output
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es ingest"))
