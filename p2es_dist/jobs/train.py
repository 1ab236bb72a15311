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

    job = parse_job_config(config)
    run_name(job, out=out, fresh=fresh)  # fail on a bad key or flag before Ray starts
    with ray_session():
        summary = run_training(job, out=out, fresh=fresh)  # the job parsed above, not the dict again
    if summary.get("model") == "classifier":
        summary["thresholds"] = classifier_thresholds(summary["checkpoint"], job.data.uris)
    print(json.dumps({k: summary[k] for k in ("run", "checkpoint", "weights", "steps", "restored_from_step",
                                              "failures", "val", "selected", "thresholds") if k in summary}))
    return 0


def classifier_thresholds(checkpoint: str, uris: list[str]) -> str | None:
    """Per-label Youden thresholds of a trained classifier on its validation split, stored beside its
    weights (`evaluate/thresholds.py`); a run without usable validation windows keeps its checkpoint and
    says how to fit them later."""
    from p2es_dist.evaluate.thresholds import fit_classifier_thresholds

    try:
        return fit_classifier_thresholds(checkpoint, uris, split="val")["uri"]
    except UserError as exc:
        print(f"p2es train: warning: no classifier thresholds ({exc}); fit them with `p2es thresholds "
              f"--classifier {checkpoint} --data ...`", file=sys.stderr)
        return None


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
