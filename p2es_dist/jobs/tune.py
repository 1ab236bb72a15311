"""Ray Tune search over Ray Train runs, as a Ray job.

    p2es tune --space tune_spaces/smoke.yaml --config p2es_dist/configs/smoke.yaml --out tune_out
    p2es tune --space tune_spaces/dilation_depth.yaml --config p2es_bidmc --set train.storage_path=s3://p2es/runs
    ray job submit --working-dir . -- python -m p2es_dist.jobs.tune --space tune_spaces/noise_schedules.yaml \
        --config p2es_dist/configs/p2es_bidmc.yaml --set train.storage_path=s3://bucket/runs --out tune_out

Prints the best trial's metric, sampled values and checkpoint; `--out DIR` gets `best.json`.
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, connect_ray, parser


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es tune", "Ray Tune search (ASHA, random or Optuna) whose trials are Ray Train runs")
    p.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/smoke.yaml")
    p.add_argument("--name", help="experiment name under the storage path (default: tune-<space>-<time>)")
    args = p.parse_args(argv)
    if not args.config:
        raise UserError("--config: required, the base job config the space varies (e.g. p2es_dist/configs/smoke.yaml)")
    config = apply_common(args)
    from p2es_dist.tune.search import run_search
    from p2es_dist.tune.spaces import load_space, validate_space

    space = load_space(args.space)
    validate_space(space, config)  # before Ray starts: a typo costs no cluster time
    started = connect_ray()
    try:
        best = run_search(space, config, out=args.out, name=args.name, validate=False)
    finally:
        if started:
            from p2es_dist.jobs.common import stop_local_ray

            stop_local_ray()
    summary = {key: best[key] for key in ("metric", "mode", "value", "checkpoint", "trials",
                                          "trials_stopped_early", "experiment_path")}
    summary["sampled"] = best["config"]["sampled"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es tune"))
