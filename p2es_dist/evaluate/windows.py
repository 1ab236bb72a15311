"""The windows an evaluation runs on: a plain pyarrow read of the shards, split filter pushed down.

Why pyarrow and not Ray Data here: evaluation runs every model in this one (driver) process, over the
same windows, in the same order, several times (the model, each baseline, the figures' re-generation).
A pyarrow scan of the manifest-listed shards with the split filter pushed into the Parquet reader gives
exactly that without starting Ray, and a deterministic window order (sorted by `window_id`), which
stochastic models need to be reproducible under `--seed`: their noise depends on batch composition.
Signals stay float16 Arrow (about 26 KB per window) until a batch is converted, so tens of thousands
of windows fit in memory; `--max-windows` caps larger evaluations. Training-scale reading stays with
`p2es_dist.data.read.read_windows` (Ray Data).

Batches go through `p2es_dist.data.loader.convert_block`, the same conversion training uses, so a model
sees exactly the inputs it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2es_dist.constants import LEADS, SPLITS
from p2es_dist.data.loader import convert_block
from p2es_dist.data.read import calibration_available, read_table
from p2es_dist.data.schema import CALIBRATION_COLUMNS
from p2es_dist.errors import UserError
from p2es_dist.evaluate.templates import template_renders

EVAL_COLUMNS = ["window_id", "subject_id", "split", "ppg", "ecg", "ecg_mask", "age", "sex", "labels"]


def read_eval_windows(uris: list[str], *, split: str = "test", max_windows: int | None = None) -> pa.Table:
    """Rows of `split` ("all" for every split), sorted by `window_id`; with `max_windows`, the deterministic
    subset of `data.read.read_table` (the windows whose ids hash lowest)."""
    if split != "all" and split not in SPLITS:
        raise UserError(f"--split: expected all, {', '.join(SPLITS)}; got {split!r}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows: expected a positive number, got {max_windows}")
    timing_columns = ["start", "record", "source", *CALIBRATION_COLUMNS]
    columns = EVAL_COLUMNS + (timing_columns if calibration_available(uris) else [])
    table = read_table(uris, columns, split=split, subset=max_windows, option="--data")
    if not len(table):
        raise UserError(f"--data {','.join(uris)}: no windows in split {split!r}")
    return table.take(pc.sort_indices(table, sort_keys=[("window_id", "ascending")]))


def parse_condition(leads: list[str] | None) -> list[str]:
    """`--condition II,V1` -> ["II", "V1"] (checked against the lead names)."""
    leads = [lead.strip() for lead in leads or [] if lead.strip()]
    unknown = [lead for lead in leads if lead not in LEADS]
    if unknown:
        raise UserError(f"--condition: unknown lead {unknown[0]!r} (expected some of {', '.join(LEADS)})")
    return leads


def iter_batches(table: pa.Table, *, batch_size: int, condition: list[str] | None = None,
                 start: int = 0, stop: int | None = None, protocol: str = "zero-shot",
                 population=None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first row, model-space numpy batch) for consecutive slices of `table`; signals widened to float32.

    Under the zero-shot protocol models get no calibration template (`template_mask` all false); under
    the calibrated one they get the patient's. Template baselines' renders ride along when the shards
    carry beat timing (`evaluate/templates.py`).
    """
    stop = len(table) if stop is None else stop
    for lo in range(start, stop, batch_size):
        rows = table.slice(lo, min(batch_size, stop - lo))
        batch = convert_block(rows, condition_leads=condition or None)
        for key in ("ecg", "ppg", "template"):
            if key in batch:
                batch[key] = batch[key].astype(np.float32)
        if "template" in batch:
            batch.update(template_renders(rows, population, protocol))
            if protocol == "zero-shot":
                batch.pop("pat_s", None)
                batch["template_mask"] = np.zeros_like(batch["template_mask"])
                batch["template"] = np.zeros_like(batch["template"])
        yield lo, batch


def target_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(B, 12) leads the metrics score: recorded, and not handed to the model as input."""
    mask = batch["ecg_mask"].astype(bool)
    if "cond_leads" in batch:
        mask = mask & ~batch["cond_leads"].astype(bool)
    return mask


def to_torch(batch: dict[str, np.ndarray]) -> dict:
    import torch

    # np.require copies only arrays that are read-only (Arrow-backed) or not C-contiguous.
    return {key: torch.from_numpy(np.require(value, requirements=["C", "W"])) for key, value in batch.items()}
