"""Window shards (any URI) -> Ray Data -> model-space torch batches for Ray Train workers.

    datasets = training_datasets(LoaderConfig(uris=["s3://p2es/bidmc", "s3://p2es/synthetic"]))
    trainer = TorchTrainer(..., datasets=datasets)
    # inside the worker loop:
    for batch in torch_batches(ray.train.get_dataset_shard("train"), config, training=True): ...

Shards are read by `data/read.py` (through each folder's manifest, the split filter pushed down into the
Parquet scan). Conversion to model space (and augmentation, for training) runs in Ray Data's parallel
`map_batches` on whole Arrow blocks, so no per-row Python touches the signals.

Lead conditioning. `condition_leads: [II]` gives every window the same recorded leads as input;
`condition_subsets` trains one model for any subset: each window (train and val alike) gets one of

    condition_subsets:
      - [II]            # these leads
      - [I, II]         # (also written "I,II")
      - [II, V1, V5]
      - single          # any one recorded lead
      - limb_pair       # any two recorded limb leads (I, II, III, aVR, aVL, aVF)
      - none            # no lead: the PPG alone (where the window has one)

drawn by `draw_condition_leads` from a seed of its window id, so the same window gets the same subset
however Ray Data groups rows (and in every epoch, as its augmentation), and validation is reproducible.
A window draws only among the entries it can take: every lead of the subset recorded, and at least one
recorded lead left over to be a target.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from p2es_dist.constants import LEAD_INDEX, LEADS, N_LEADS
from p2es_dist.data.augment import AugmentConfig, augment_batch
from p2es_dist.data.batches import table_to_batch
from p2es_dist.data.read import calibration_state, read_windows
from p2es_dist.data.schema import CALIBRATION_COLUMNS
from p2es_dist.errors import ConfigError, UserError

BLOCK_BYTES = 32 * 1024**2  # Ray Data blocks of model-space windows (~300 with templates, ~600 without)
# Columns a model batch needs; `window_id` only seeds augmentation and is dropped after conversion.
READ_COLUMNS = ["window_id", "split", "subject_id", "ppg", "ecg", "ecg_mask", "age", "sex", "labels", "quality"]
# Read besides when every manifest is of shard schema 2 or later; batches then carry `upstrokes`, `source`
# (each source has its own zero-shot population, `models/base.PopulationTemplate`) and, where some shard
# holds a calibration beat, `template(_mask)`.
TIMING_READ_COLUMNS = ["start", "source", "ppg_upstrokes"]
CALIBRATION_READ_COLUMNS = TIMING_READ_COLUMNS + [c for c in CALIBRATION_COLUMNS if c not in TIMING_READ_COLUMNS]


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
    # One model, any subset: each window gets one of these (see the module docstring); not with condition_leads.
    condition_subsets: list[list[str] | str] = field(default_factory=list)
    teacher_ecg: bool = False  # shards carry a `teacher_ecg` column (distillation) that batches pass on
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.condition_leads and self.condition_subsets:
            raise ConfigError("data.condition_leads and data.condition_subsets: set one (a fixed subset for "
                              "every window, or subsets drawn per window), not both")
        parse_condition_subsets(self.condition_subsets)

    @property
    def conditions(self) -> bool:
        """Whether batches carry `cond_leads`."""
        return bool(self.condition_leads or self.condition_subsets)


SubsetSpec = tuple[str, ...] | str  # leads in LEADS order, or one of CONDITION_KEYWORDS
CONDITION_KEYWORDS = ("single", "limb_pair", "none")


def parse_condition_subsets(entries: list[list[str] | str]) -> list[SubsetSpec]:
    """`data.condition_subsets` checked and normalised (leads deduplicated, in `LEADS` order)."""
    specs: list[SubsetSpec] = []
    for i, entry in enumerate(entries):
        where = f"data.condition_subsets[{i}]"
        if isinstance(entry, str) and entry.strip() in CONDITION_KEYWORDS:
            specs.append(entry.strip())
            continue
        leads = [lead.strip() for lead in (entry.split(",") if isinstance(entry, str) else entry)]
        leads = [lead for lead in leads if lead]
        unknown = [lead for lead in leads if lead not in LEAD_INDEX]
        if not leads or unknown:
            raise ConfigError(f"{where}: expected a list of leads (some of {', '.join(LEADS)}) or one of "
                              f"{', '.join(CONDITION_KEYWORDS)}; got {entry!r}")
        if len(set(leads)) == N_LEADS:
            raise ConfigError(f"{where}: all 12 leads leave nothing to generate")
        specs.append(tuple(sorted(set(leads), key=LEAD_INDEX.__getitem__)))
    return specs


# Lead sets as bit masks (bit i: LEADS[i]): a window's draw is a few integer operations, not numpy calls.
_LIMB_BITS = 0b111111  # I, II, III, aVR, aVL, aVF


def _bits(leads: tuple[str, ...]) -> int:
    return sum(1 << LEAD_INDEX[lead] for lead in leads)


def _members(bits: int) -> list[int]:
    return [i for i in range(N_LEADS) if bits >> i & 1]


def _fits(spec: SubsetSpec, recorded: int) -> bool:
    """Whether a window with these recorded leads can take `spec` and keep a lead to be a target."""
    count = recorded.bit_count()
    if spec == "none":
        return True
    if spec == "single":
        return count >= 2
    if spec == "limb_pair":
        return (recorded & _LIMB_BITS).bit_count() >= 2 and count >= 3
    wanted = _bits(spec)
    return recorded & wanted == wanted and count > wanted.bit_count()


def _realise(spec: SubsetSpec, recorded: int, rng: random.Random) -> int:
    if spec == "single":
        return 1 << rng.choice(_members(recorded))
    if spec == "limb_pair":
        return sum(1 << i for i in rng.sample(_members(recorded & _LIMB_BITS), 2))
    return 0 if spec == "none" else _bits(spec)


def draw_condition_leads(window_ids: list[str], recorded: np.ndarray, subsets: list[SubsetSpec],
                         seed: int) -> np.ndarray:
    """(n, 12) bool: the leads each window gets as input, one of `subsets` per window.

    The draw depends on the window's id, its recorded leads and `seed` only (not on its neighbours in a
    block). It is uniform over the entries the window can take (`_fits`: leads recorded, one recorded lead
    left as a target). When it can take none, it falls back to the recorded part of a fixed subset that
    still leaves a target, else to one recorded lead, else (one recorded lead or none) to no lead at all.
    """
    rows = (np.asarray(recorded, dtype=np.int64) << np.arange(N_LEADS)).sum(axis=1).tolist()
    fixed = [_bits(spec) for spec in subsets if spec not in CONDITION_KEYWORDS]
    chosen = []
    # Salted apart from the augmentation's seeds of the same windows.
    for bits, window_seed in zip(rows, window_seeds([f"condition:{w}" for w in window_ids], seed), strict=True):
        rng = random.Random(window_seed)
        fitting = [spec for spec in subsets if _fits(spec, bits)]
        if fitting:
            chosen.append(_realise(fitting[rng.randrange(len(fitting))], bits, rng))
            continue
        parts = [part for part in (wanted & bits for wanted in fixed) if 0 < part.bit_count() < bits.bit_count()]
        if parts:
            chosen.append(parts[rng.randrange(len(parts))])
        else:
            chosen.append(_realise("single", bits, rng) if bits.bit_count() >= 2 else 0)
    return (np.asarray(chosen, dtype=np.int64).reshape(-1, 1) >> np.arange(N_LEADS)) & 1 == 1


def window_seeds(window_ids: list[str], seed: int) -> list[int]:
    """One seed per window from its id, so augmentation is the same however Ray Data groups rows."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{w}".encode(), digest_size=8).digest(), "big") >> 1
            for w in window_ids]


def convert_block(table: pa.Table, *, augment: AugmentConfig | None = None, seed: int = 0,
                  condition_leads: list[str] | None = None,
                  condition_subsets: list[SubsetSpec] | None = None) -> dict[str, np.ndarray]:
    """Arrow rows -> model-space numpy batch (optionally augmented). Runs inside `map_batches`.

    `condition_leads`: the same input leads for every window; `condition_subsets` (normalised by
    `parse_condition_subsets`): one drawn per window (`draw_condition_leads`). Either sets `cond_leads`.

    Signals leave as float32, what the models read. Shipping model-space ECG as float16 (a second rounding
    of every sample) would save ~10 % of `p2es bench data`'s time on 2 cores: not worth the precision.
    """
    batch = table_to_batch(table)
    if augment is not None and augment.enabled and len(table):
        # Per window, not per block: Ray Data's block boundaries differ between runs.
        seeds = window_seeds(table.column("window_id").to_pylist(), seed)
        rows = [augment_batch({k: v[i : i + 1] for k, v in batch.items()}, augment, seed=s)
                for i, s in enumerate(seeds)]
        batch = {key: np.concatenate([row[key] for row in rows]) for key in batch}
    if condition_leads:
        chosen = np.isin(np.array(LEADS), condition_leads)
        batch["cond_leads"] = batch["ecg_mask"] & chosen[None, :]
    elif condition_subsets:
        window_ids = table.column("window_id").to_pylist()
        batch["cond_leads"] = draw_condition_leads(window_ids, batch["ecg_mask"], condition_subsets, seed)
    return batch


def read_columns(config: LoaderConfig) -> list[str]:
    """The shard columns a model batch is made from (`convert_block`), for these shard folders."""
    # Without a beat in any shard (ECG-only sets, synthetic) every template would be zeros: 49 KB a window
    # through the object store for nothing, a quarter of `p2es bench data`'s time.
    timed, calibrated = calibration_state(config.uris)
    columns = READ_COLUMNS + (CALIBRATION_READ_COLUMNS if calibrated else TIMING_READ_COLUMNS if timed else [])
    # Teacher outputs (distillation) say per window whether the teacher saw its template.
    return columns + ((["teacher_ecg"] + (["template_hidden"] if calibrated else [])) if config.teacher_ecg else [])


def model_space_dataset(config: LoaderConfig, *, split: str, training: bool):
    """A Ray Dataset of model-space numpy batches for one split; augmentation only when `training`."""
    unknown = sorted(set(config.condition_leads) - set(LEADS))
    if unknown:
        raise UserError(f"data.condition_leads: unknown lead {unknown[0]!r} (expected some of {', '.join(LEADS)})")
    columns = read_columns(config)
    # The shard path rides along so that a corrupt window is named with its shard (`refuse_non_finite`).
    dataset = read_windows(config.uris, columns, split=split, min_quality=config.min_quality, include_paths=True)
    # Ray Data would wrap that UserError in a bare "UDF failed" (its message lost on the way to the driver);
    # this dataset's own context lets it through, so the CLI's one line names the window.
    dataset.context.raise_original_map_exception = True
    # Ray holds a task's output until 128 MiB have gathered: ~3 shards of model-space windows (100 KB each),
    # so every epoch waited ~1.5 s for its first batch. At 16 MiB it is ~0.6 s, but a 500-window shard then
    # split into two blocks of odd sizes and most batches were copied together from pieces of several: 32 MiB
    # keeps a shard in one block (`p2es bench data`, 100 shards: 0.79 -> 0.94 of pyarrow; 1,000 unchanged).
    dataset.context.target_max_block_size = BLOCK_BYTES
    return dataset.map_batches(
        convert_block,
        batch_format="pyarrow",
        batch_size=config.block_rows,
        fn_kwargs={"augment": config.augment if training else None, "seed": config.seed,
                   "condition_leads": config.condition_leads,
                   "condition_subsets": parse_condition_subsets(config.condition_subsets)},
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
                "upstrokes": torch.int32, "source": torch.int64, "pat_s": torch.float32,
                **({"cond_leads": torch.bool} if config.conditions else {}),
                **({"teacher_ecg": torch.float32} if config.teacher_ecg else {})},
        prefetch_batches=config.prefetch_batches,
        local_shuffle_buffer_size=shuffle,
        local_shuffle_seed=config.seed + epoch if shuffle else None,
        drop_last=training,
        device="cpu",
    )
