"""Window shards (any URI) -> Ray Data -> model-space torch batches for Ray Train workers.

    datasets = training_datasets(LoaderConfig(uris=["s3://p2es/bidmc", "s3://p2es/synthetic"]))
    trainer = TorchTrainer(..., datasets=datasets)
    # inside the worker loop:
    for batch in torch_batches(ray.train.get_dataset_shard("train"), config, training=True): ...

Shards are read by `data/read.py` (through each folder's manifest, the split filter pushed down into the
Parquet scan). Conversion to model space (and augmentation, for training) runs in Ray Data's parallel
`map_batches` on whole Arrow blocks, so no per-row Python touches the signals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from p2es_dist.constants import LEADS
from p2es_dist.data.augment import AugmentConfig, augment_batch
from p2es_dist.data.batches import table_to_batch
from p2es_dist.data.read import calibration_available, read_windows
from p2es_dist.data.schema import CALIBRATION_COLUMNS
from p2es_dist.errors import UserError

TRANSPORT_FLOAT16 = ("ecg", "ppg", "template")

# Columns a model batch needs; `window_id` only seeds augmentation and is dropped after conversion.
READ_COLUMNS = ["window_id", "split", "subject_id", "ppg", "ecg", "ecg_mask", "age", "sex", "labels", "quality"]
# Read besides when every manifest is of shard schema 2 or later; batches then carry `template(_mask)` and
# `source` (each source has its own zero-shot population, `models/base.PopulationTemplate`).
CALIBRATION_READ_COLUMNS = ["start", "source", *CALIBRATION_COLUMNS]


@dataclass
class LoaderConfig:
    uris: list[str] = field(default_factory=list)  # shard folders, each with a manifest.json
    batch_size: int = 32
    shuffle_buffer: int = 1024  # local shuffle buffer of training batches (0 turns it off)
    seed: int = 0
    min_quality: float = 0.0
    block_rows: int | None = None  # rows per conversion call; None: whole blocks, which lets Ray fuse it into the read
    prefetch_batches: int = 4
    condition_leads: list[str] = field(default_factory=list)  # recorded leads given as input, e.g. [II]
    teacher_ecg: bool = False  # shards carry a `teacher_ecg` column (distillation) that batches pass on
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def window_seeds(window_ids: list[str], seed: int) -> list[int]:
    """One seed per window from its id, so augmentation is the same however Ray Data groups rows."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{w}".encode(), digest_size=8).digest(), "big") >> 1
            for w in window_ids]


def convert_block(table: pa.Table, *, augment: AugmentConfig | None = None, seed: int = 0,
                  condition_leads: list[str] | None = None) -> dict[str, np.ndarray]:
    """Arrow rows -> model-space numpy batch (optionally augmented). Runs inside `map_batches`.

    Signals leave as float16, the precision the shards store them in: half the bytes through Ray's
    object store. `torch_batches` widens them to float32 on the consumer.
    """
    batch = table_to_batch(table)
    if augment is not None and augment.enabled and len(table):
        # Per window, not per block: Ray Data's block boundaries differ between runs.
        seeds = window_seeds(table.column("window_id").to_pylist(), seed)
        rows = [augment_batch({k: v[i : i + 1] for k, v in batch.items()}, augment, seed=s)
                for i, s in enumerate(seeds)]
        batch = {key: np.concatenate([row[key] for row in rows]) for key in batch}
    for key in TRANSPORT_FLOAT16 + ("teacher_ecg",):
        if key in batch:
            batch[key] = batch[key].astype(np.float16)
    if condition_leads:
        chosen = np.isin(np.array(LEADS), condition_leads)
        batch["cond_leads"] = batch["ecg_mask"] & chosen[None, :]
    return batch


def model_space_dataset(config: LoaderConfig, *, split: str, training: bool):
    """A Ray Dataset of model-space numpy batches for one split; augmentation only when `training`."""
    unknown = sorted(set(config.condition_leads) - set(LEADS))
    if unknown:
        raise UserError(f"data.condition_leads: unknown lead {unknown[0]!r} (expected some of {', '.join(LEADS)})")
    calibrated = calibration_available(config.uris)
    columns = READ_COLUMNS + (CALIBRATION_READ_COLUMNS if calibrated else [])
    # Teacher outputs (distillation) say per window whether the teacher saw its template.
    columns += (["teacher_ecg"] + (["template_hidden"] if calibrated else [])) if config.teacher_ecg else []
    # The shard path rides along so that a corrupt window is named with its shard (`refuse_non_finite`).
    dataset = read_windows(config.uris, columns, split=split, min_quality=config.min_quality, include_paths=True)
    # Ray Data would wrap that UserError in a bare "UDF failed" (its message lost on the way to the driver);
    # this dataset's own context lets it through, so the CLI's one line names the window.
    dataset.context.raise_original_map_exception = True
    return dataset.map_batches(
        convert_block,
        batch_format="pyarrow",
        batch_size=config.block_rows,
        fn_kwargs={"augment": config.augment if training else None, "seed": config.seed,
                   "condition_leads": config.condition_leads},
    )


def training_datasets(config: LoaderConfig, *, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    """`datasets=` for a TorchTrainer: the training split augmented, the others plain. Never `test`."""
    if "test" in splits:
        raise ValueError("the test split is for final evaluation only, never for training or selection")
    return {split: model_space_dataset(config, split=split, training=split == "train") for split in splits}


def torch_batches(shard, config: LoaderConfig, *, training: bool, epoch: int = 0) -> Iterator[dict]:
    """Iterate a Ray Data shard (`get_dataset_shard`) or Dataset as dicts of torch tensors."""
    import torch

    shuffle = config.shuffle_buffer if training and config.shuffle_buffer > 0 else None
    return shard.iter_torch_batches(
        batch_size=config.batch_size,
        dtypes={"ppg": torch.float32, "ecg": torch.float32, "ppg_mask": torch.bool, "ecg_mask": torch.bool,
                "age": torch.float32, "sex": torch.int64, "labels": torch.float32, "subject": torch.int64,
                "scale": torch.float32, "template": torch.float32, "template_mask": torch.bool,
                "upstrokes": torch.int32, "source": torch.int64,
                **({"cond_leads": torch.bool} if config.condition_leads else {}),
                **({"teacher_ecg": torch.float32} if config.teacher_ecg else {})},
        prefetch_batches=config.prefetch_batches,
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=config.seed + epoch if shuffle else None,
        drop_last=training,
        device="cpu",
    )
