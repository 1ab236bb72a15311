"""Distil a diffusion teacher into the mobile student (Ray Data teacher inference + Ray Train).

    p2es distill --config distill --set distill.teacher=runs/p2es-.../step-00001000 --out out/distill
    ray job submit --working-dir . -- python -m p2es_dist.jobs.distill --config p2es_dist/configs/distill.yaml \
        --set distill.teacher=s3://p2es/runs/p2es-.../step-00001000 --set distill.actors=4
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser, ray_session


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es distill", "teacher -> mobile student: teacher outputs, training, pruning, fine-tune, ONNX")
    p.add_argument("--teacher", help="teacher checkpoint URI (same as --set distill.teacher=URI)")
    args = p.parse_args(argv)
    if not args.config:
        raise UserError("--config is required (e.g. distill, p2es_dist/configs/distill.yaml)")
    if args.teacher:
        args.overrides.append(f"distill.teacher={args.teacher}")
    config = apply_common(args)
    from p2es_dist.distill.config import parse_distill_config
    from p2es_dist.distill.run import run_distill

    parse_distill_config(config)  # fail on a bad key before Ray starts
    with ray_session():
        summary = run_distill(config, out=args.out)
    keys = ("checkpoint", "steps", "restored_from_step", "failures", "val", "params", "bytes", "cache_uri")
    print(json.dumps({key: summary[key] for key in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es distill"))
