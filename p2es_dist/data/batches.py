"""Shard rows (Arrow) -> model-space numpy batches, without per-row Python. Used by the Ray Data loader.

The output keys are the Batch layout documented in `p2es_dist.models.base`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa

from p2es_dist.constants import LABEL_INDEX, LABELS, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.normalize import ecg_to_model_space, ppg_to_model_space
from p2es_dist.data.splits import subject_hash
from p2es_dist.errors import UserError


def _fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int, dtype=np.float32) -> np.ndarray:
    """A fixed_size_list column as an (n, width) array; null rows become zeros."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = np.empty((len(column), width), dtype=dtype)
    row = 0
    for chunk in chunks:
        n = len(chunk)
        # .values skips nothing for fixed-size lists: null rows still own `width` slots.
        flat = chunk.values.to_numpy(zero_copy_only=False)[chunk.offset * width : (chunk.offset + n) * width]
        _cast_into(out[row : row + n], flat.reshape(n, width))
        if chunk.null_count:
            out[row : row + n][~chunk.is_valid().to_numpy(zero_copy_only=False)] = 0
        row += n
    return out


def _cast_into(out: np.ndarray, values: np.ndarray) -> None:
    """out[...] = values, cast. float16 -> float32 goes through torch, whose F16C conversion is ~4x numpy's
    (the signals are float16 in the shards: this cast was the largest step of converting a block)."""
    if values.dtype == np.float16 and out.dtype == np.float32 and values.size:
        import torch

        with warnings.catch_warnings():  # Arrow's buffers are read-only; torch only reads this one
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(values)
        torch.from_numpy(out).copy_(source)
    else:
        np.copyto(out, values, casting="unsafe")


def labels_multi_hot(labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<string> -> (n, 13) float32 multi-hot over `constants.LABELS`."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    n = len(labels)
    out = np.zeros((n, len(LABELS)), dtype=np.float32)
    offsets = labels.offsets.to_numpy()
    values = labels.flatten().to_numpy(zero_copy_only=False)
    if values.size:
        rows = np.repeat(np.arange(n), np.diff(offsets))
        cols = np.array([LABEL_INDEX.get(v, -1) for v in values])
        known = cols >= 0
        out[rows[known], cols[known]] = 1.0
    return out


def table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """Shard rows -> model-space batch (ppg, ppg_mask, ecg, ecg_mask, age, sex, labels, subject, scale;
    source, template, template_mask and pat_s when they carry calibration columns; teacher_ecg when they carry it)."""
    ecg = _fixed_list_to_numpy(table.column("ecg"), N_LEADS * WINDOW).reshape(-1, N_LEADS, WINDOW)
    ecg_mask = _fixed_list_to_numpy(table.column("ecg_mask"), N_LEADS, dtype=bool)
    ppg_column = table.column("ppg")
    ppg_mask = ppg_column.is_valid().to_numpy(zero_copy_only=False) if len(table) else np.zeros(0, bool)
    ppg = _fixed_list_to_numpy(ppg_column, WINDOW)
    refuse_non_finite(table, ecg, ppg)
    ecg_model, scale = ecg_to_model_space(ecg, ecg_mask)
    age = table.column("age").to_numpy(zero_copy_only=False)
    subjects = table.column("subject_id").to_pylist()
    batch = {
        "ppg": ppg_to_model_space(ppg, ppg_mask),
        "ppg_mask": np.asarray(ppg_mask, dtype=bool),
        "ecg": ecg_model,
        "ecg_mask": ecg_mask,
        "age": np.asarray(age, dtype=np.float32),  # nulls arrive as NaN
        "sex": table.column("sex").to_numpy().astype(np.int64),
        "labels": labels_multi_hot(table.column("labels")),
        "subject": np.array([subject_hash(s) for s in subjects], dtype=np.int64),
        "scale": scale,
    }
    if "source" in table.column_names:
        names, rows = np.unique(np.asarray(table.column("source").to_pylist(), dtype=object), return_inverse=True)
        batch["source"] = np.array([subject_hash(name) for name in names], dtype=np.int64)[rows.reshape(-1)]
    if "ppg_upstrokes" in table.column_names:
        batch["upstrokes"] = upstroke_array(table.column("ppg_upstrokes"))
    if "calib_beat" in table.column_names:
        batch["template"], batch["template_mask"] = calibration_templates(table, batch["upstrokes"])
        # The record's PAT (NaN: none measured); only training reads it (`PopulationTemplate.jitter_targets`).
        batch["pat_s"] = table.column("calib_pat_s").to_numpy(zero_copy_only=False).astype(np.float32)
        if "template_hidden" in table.column_names:  # distillation: the teacher answered without it
            hidden = table.column("template_hidden").to_numpy(zero_copy_only=False).astype(bool)
            batch["template_mask"] &= ~hidden[:, None]
    if "teacher_ecg" in table.column_names:  # distillation shards: the teacher's output, already in model space
        teacher = _fixed_list_to_numpy(table.column("teacher_ecg"), N_LEADS * WINDOW)
        batch["teacher_ecg"] = teacher.reshape(-1, N_LEADS, WINDOW)
    return batch


def refuse_non_finite(table: pa.Table, ecg: np.ndarray, ppg: np.ndarray) -> None:
    """UserError naming the first window (and its shard, when the rows carry Ray Data's `path`) whose ECG or
    PPG holds NaN or inf: one such window makes every loss NaN, and a run would go on training on it."""
    bad = ~np.isfinite(ecg).all(axis=(1, 2)) | ~np.isfinite(ppg).all(axis=1)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    window = table.column("window_id")[i].as_py() if "window_id" in table.column_names else f"row {i}"
    shard = f"shard {table.column('path')[i].as_py()}" if "path" in table.column_names else "its shard"
    raise UserError(f"window {window} in {shard} holds NaN or inf samples ({int(bad.sum())} such windows in "
                    "this batch); ingest its records again with this version, which turns them into gaps")


def calibration_templates(table: pa.Table, upstrokes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12, L) float32 calibrated templates in model space and their (n, 12) bool masks.

    `upstrokes`: the rows' `upstroke_array`.
    Each window's template is its record's calibration beat placed at the window's PPG upstrokes minus
    the record's PAT (`timing.template_from_upstrokes`), scaled to unit peak over its leads. Windows that
    start inside the calibration segment (`start < calib_end`) get none: a template made from a
    window's own ECG would tell the model the answer.
    """
    n = len(table)
    beats = _fixed_list_to_numpy(table.column("calib_beat"), N_LEADS * timing.BEAT_SAMPLES)
    beats = beats.reshape(n, N_LEADS, timing.BEAT_SAMPLES)
    beat_mask = _fixed_list_to_numpy(table.column("calib_beat_mask"), N_LEADS, dtype=bool)
    pat = table.column("calib_pat_s").to_numpy(zero_copy_only=False).astype(np.float64)
    end = table.column("calib_end").to_numpy(zero_copy_only=False).astype(np.float64)
    start = table.column("start").to_numpy().astype(np.float64) if "start" in table.column_names else end * 0
    usable = np.isfinite(pat) & np.isfinite(end) & (start >= np.nan_to_num(end, nan=np.inf))
    usable &= upstrokes[:, 0] != timing.UPSTROKE_PAD
    templates = np.zeros((n, N_LEADS, WINDOW), dtype=np.float32)
    mask = beat_mask & usable[:, None]
    rows = np.flatnonzero(mask.any(axis=1))
    for i in rows:
        # Padding lies past any window, so rendering leaves it out.
        templates[i] = timing.template_from_upstrokes(beats[i], upstrokes[i], pat[i], WINDOW)
    # Rows without a template stay zeros: only the others are scaled (the costliest pass over the block).
    templates[rows] = timing.normalise_template(templates[rows], mask[rows]) * mask[rows][:, :, None]
    return templates, mask


MAX_UPSTROKES = 48  # per window with its margins (~10 s): 4.8 pulses/s would be 288 bpm


def upstroke_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<int32> upstrokes per window -> (n, MAX_UPSTROKES) int32, padded with `timing.UPSTROKE_PAD`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    out = np.full((len(column), MAX_UPSTROKES), timing.UPSTROKE_PAD, dtype=np.int32)
    # Null rows (no PPG) have zero length, so the offsets place every value without per-row Python.
    offsets = column.offsets.to_numpy()
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(column)), lengths)
    position = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], lengths)
    values = column.flatten().to_numpy(zero_copy_only=False)
    keep = position < MAX_UPSTROKES
    out[rows[keep], position[keep]] = values[keep]
    return out
