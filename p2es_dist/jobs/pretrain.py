"""Pretrain the foundation ECG/PPG encoder (masked reconstruction) with Ray Train + DeepSpeed.

    p2es pretrain --config pretrain_tiny --out out/pretrain
    ray job submit --working-dir . -- python -m p2es_dist.jobs.pretrain --config pretrain_tiny \
        --set model.size=small --set train.storage_path=s3://bucket/runs --out out/pretrain

The same training loop as `p2es train` (checkpoints, resume by re-running the same command, fault
tolerance, `result.json`); the config's model must be the `encoder`. The `--out` folder (or its
result.json) is what `ppg_encoder_checkpoint`, `p2es evaluate --encoder` and `--probe` read.
"""

from __future__ import annotations

import sys
from typing import Any

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser
from p2es_dist.jobs.train import train_and_print


def check_encoder_config(config: dict[str, Any]) -> None:
    """Refuse configs whose model is not the foundation encoder, before Ray starts."""
    model = config.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if name != "encoder":
        raise UserError(f"{config.get('_source', 'config')}: model.name: `p2es pretrain` trains the foundation "
                        f"encoder, expected 'encoder', got {name!r} (use `p2es train` for other models)")


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es pretrain", "pretrain the foundation ECG/PPG encoder (Ray Train + DeepSpeed)")
    args = p.parse_args(argv)
    if not args.config:
        raise UserError("--config is required (e.g. pretrain_tiny)")
    config = apply_common(args)
    check_encoder_config(config)
    return train_and_print(config, args.out)

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es pretrain"))
