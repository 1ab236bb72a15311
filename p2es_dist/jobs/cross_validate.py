"""Subject-grouped K-fold cross-validation of a training config: `p2es evaluate --cv-folds K`.

    p2es evaluate --cv-folds 5 --data shards/bidmc --train-config p2es_bidmc \
        --train-set "data.uris=[shards/bidmc,shards/cinc2015]" --protocol calibrated --out cv/

For each fold (`data/folds.py`: fold k's subjects are test, fold k+1's val, the rest train) it trains the
config with `--data` replaced by the fold's shards, evaluates the fold's test subjects under each protocol,
and pools the folds (`evaluate/cv.py`). Writes `--out`/folds/fold_k (shards), fold_k/model (training
summary), fold_k/<protocol> (metrics.json, report.md, lead_ii_windows.csv), cv.json and cv.md. A fold whose
model or evaluation is already there is not redone, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fold_config(config: dict[str, Any], data: str, fold_uri: str, out: Path, fold: int) -> dict[str, Any]:
    """The training config of one fold: `data` swapped for the fold's shards (added when absent), runs
    stored under `out`/runs with a name per fold."""
    uris = list((config.get("data") or {}).get("uris") or [])
    uris = [fold_uri if uri.rstrip("/") == data.rstrip("/") else uri for uri in uris]
    if fold_uri not in uris:
        uris.insert(0, fold_uri)
    train = {**(config.get("train") or {}), "storage_path": str(out / "runs"), "run_name": f"cv-fold{fold}"}
    return {**config, "data": {**(config.get("data") or {}), "uris": uris}, "train": train}


def run_cross_validation(*, data: str, train_config: dict[str, Any], folds: int, protocols: list[str], out: str,
                         eval_config: Any, seed: int = 0) -> dict[str, Any]:
    """Train and evaluate every fold, then pool; returns {protocol: pooled summary}."""
    from dataclasses import replace

    from p2es_dist.data.folds import write_fold_shards
    from p2es_dist.evaluate.cv import markdown, pool_folds
    from p2es_dist.evaluate.pipeline import run_evaluation
    from p2es_dist.jobs.common import ray_session
    from p2es_dist.train.config import parse_job_config
    from p2es_dist.train.trainer import run_training

    root = Path(out)
    parse_job_config(train_config)  # a bad key fails before any fold is written
    fold_uris = write_fold_shards(data, str(root / "folds"), folds=folds, seed=seed)
    for fold, fold_uri in enumerate(fold_uris):
        model_dir = root / f"fold_{fold}" / "model"
        if not (model_dir / "result.json").exists():
            print(f"[cv] fold {fold + 1}/{folds}: training on {fold_uri}", flush=True)
            with ray_session():
                run_training(fold_config(train_config, data, fold_uri, root, fold), out=str(model_dir))
        for protocol in protocols:
            target = root / f"fold_{fold}" / protocol
            if (target / "lead_ii_windows.csv").exists():
                continue
            print(f"[cv] fold {fold + 1}/{folds}: evaluating ({protocol})", flush=True)
            run_evaluation(model_uri=str(model_dir), out=str(target), with_figures=False,
                           config=replace(eval_config, data=[fold_uri], split="test", protocol=protocol))
    pooled = {protocol: pool_folds([root / f"fold_{k}" / protocol for k in range(folds)], protocol=protocol,
                                   n_boot=eval_config.n_boot, seed=seed)
              for protocol in protocols}
    (root / "cv.json").write_text(json.dumps({"data": data, "folds": folds, "seed": seed, "pooled": pooled},
                                             indent=2, allow_nan=False) + "\n")
    (root / "cv.md").write_text("\n".join(markdown(summary) for summary in pooled.values()))
    return pooled
