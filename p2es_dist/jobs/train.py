"""Train P2Es or a baseline with Ray Train + DeepSpeed.

    p2es train --config p2es_dist/configs/smoke.yaml --set train.num_workers=2 --out out/
    ray job submit --working-dir . -- python -m p2es_dist.jobs.train --config p2es_dist/configs/p2es_bidmc.yaml \
        --set train.storage_path=s3://bucket/runs --set train.deepspeed.zero_stage=2
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser, ray_session


def train_and_print(config: dict, out: str | None, *, fresh: bool = False) -> int:
    """Validate, run `run_training` on (or as) a Ray cluster, print the summary line. Shared with `pretrain`."""
    from p2es_dist.train.config import parse_job_config
    from p2es_dist.train.trainer import run_name, run_training

    run_name(parse_job_config(config), out=out, fresh=fresh)  # fail on a bad key or flag before Ray starts
    with ray_session():
        summary = run_training(config, out=out, fresh=fresh)
    print(json.dumps({k: summary[k] for k in ("run", "checkpoint", "weights", "steps", "restored_from_step",
                                              "failures", "val", "selected") if k in summary}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es train", "train P2Es or a baseline named in the config (Ray Train + DeepSpeed); the same "
               "command again resumes its run from the latest checkpoint")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run instead of resuming the one this config and --out name")
    args = p.parse_args(argv)
    if not args.config:
        raise UserError("--config is required (e.g. p2es_dist/configs/smoke.yaml)")
    return train_and_print(apply_common(args), args.out, fresh=args.fresh)

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es train"))
