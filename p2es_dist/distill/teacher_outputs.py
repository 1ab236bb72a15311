"""The teacher's outputs for the distillation windows: Ray Data batch inference, cached as Parquet shards.

    manifest = ensure_teacher_outputs(teacher_uri=..., teacher_digest=loaded.digest, data_uris=[...],
                                      distill=DistillSection(...))
    # manifest["uri"] is a shard folder like an ingest output: its shards carry every column the loader
    # reads plus `teacher_ecg` (fixed_size_list<float16>[12*L], model space), for windows with PPG only.

Layout: `<cache_root>/<key>/manifest.json` plus `<key>/shards-<run id>/*.parquet`. The key hashes the
teacher's weights digest, sampler, steps, seed, n_samples, splits and the sha256 of every data manifest,
so a re-run with the same teacher, sampler settings and data finds the manifest and computes nothing,
while any change lands in a new folder. The manifest is written last and lists the shards of the run
that finished, so shards of an interrupted run are never read.

Inference runs in a Ray Data actor pool (`map_batches(TeacherPredictor, compute=ActorPoolStrategy(size=
actors))`): each actor loads the teacher once and keeps it. A batch's noise comes from `seed`, so the
draws depend on how Ray Data groups windows; the cache is what makes them fixed once computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2es_dist import __version__
from p2es_dist.constants import FS, N_LEADS, SCHEMA_VERSION, SHARD_SCHEMA_VERSION, WINDOW
from p2es_dist.data.loader import CALIBRATION_READ_COLUMNS, READ_COLUMNS
from p2es_dist.data.read import calibration_available, iter_tables, manifest_bytes, read_windows
from p2es_dist.distill.config import DistillSection
from p2es_dist.models.base import Batch, GenerationOptions
from p2es_dist.storage import uri as uri_lib

log = logging.getLogger("p2es.distill")
TEACHER_COLUMN = "teacher_ecg"
HIDDEN_COLUMN = "template_hidden"
FLOAT16_LIMIT = 65000.0  # an untrained teacher may stray far; float16 would turn it into inf


def cache_key(*, teacher_digest: str, data_uris: list[str], distill: DistillSection) -> dict[str, Any]:
    """What the teacher's outputs depend on (the data by its manifests' bytes, not its location)."""
    data = [hashlib.sha256(manifest_bytes(u)).hexdigest() for u in data_uris]
    return {"teacher_digest": teacher_digest, "sampler": distill.sampler, "steps": distill.steps,
            "seed": distill.seed, "n_samples": distill.n_samples, "splits": sorted(distill.splits), "data": data,
            "template_dropout": distill.template_dropout}


def cache_folder(cache_root: str, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return uri_lib.join(cache_root, f"{key['teacher_digest'][:12]}-{key['sampler']}{key['steps']}-{digest}")


def generation_options(distill: DistillSection) -> GenerationOptions:
    """How the teacher draws (a deterministic teacher, e.g. a regressor, ignores all but the seed)."""
    return GenerationOptions(seed=distill.seed, sampler=distill.sampler, steps=distill.steps,
                             n_samples=distill.n_samples)


def hidden_templates(window_ids: list[str], fraction: float) -> np.ndarray:
    """(n,) bool: windows whose calibration template is hidden, a stable `fraction` of them by window id.

    Distillation decides this once, in the data, so the teacher answers each window in the mode (zero-shot
    or calibrated) the student then sees it in (the student trains with `template_dropout: 0`).
    """
    draws = [int.from_bytes(hashlib.blake2b(f"template:{w}".encode(), digest_size=8).digest(), "big") / 2**64
             for w in window_ids]
    return np.asarray(draws) < fraction


def predict_table(model: Any, table: pa.Table, *, options: GenerationOptions, device: str = "cpu",
                  template_dropout: float = 0.5) -> pa.Table:
    """Shard rows -> the rows with PPG, plus the teacher's `teacher_ecg` column (model space, float16).

    Shards with calibration columns also get `template_hidden`: the windows whose template neither the
    teacher nor the student sees (`hidden_templates`)."""
    import torch

    from p2es_dist.data.batches import table_to_batch

    table = table.filter(pc.is_valid(table.column("ppg")))
    if len(table) == 0:
        empty = pa.array([], type=pa.list_(pa.float16(), N_LEADS * WINDOW))
        return table.append_column(TEACHER_COLUMN, empty)
    numpy_batch = table_to_batch(table)
    hidden = None
    if "template_mask" in numpy_batch:
        hidden = hidden_templates(table.column("window_id").to_pylist(), template_dropout)
        numpy_batch["template_mask"] = numpy_batch["template_mask"] & ~hidden[:, None]
    # np.array copies: Arrow buffers are read-only, and torch must not alias memory it could write to.
    batch = {key: torch.from_numpy(np.array(value)).to(device) for key, value in numpy_batch.items()}
    with torch.no_grad():
        ecg = model.generate(batch, options).float().cpu().numpy()
    flat = np.clip(np.nan_to_num(ecg), -FLOAT16_LIMIT, FLOAT16_LIMIT).astype(np.float16).reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), N_LEADS * WINDOW)
    table = table.append_column(TEACHER_COLUMN, column)
    if hidden is not None:
        table = table.append_column(HIDDEN_COLUMN, pa.array(hidden))
    return table


def cache_columns(cache_uri: str) -> list[str]:
    """The columns a batch of the cached teacher outputs is read with: what the loader reads for training
    (`data.loader.model_space_dataset` with `teacher_ecg`), so a consumer sees each window with the same
    template, and the same per-window hidden/kept choice, as the student's training did."""
    calibrated = calibration_available([cache_uri])
    return (READ_COLUMNS + (CALIBRATION_READ_COLUMNS if calibrated else []) + [TEACHER_COLUMN]
            + ([HIDDEN_COLUMN] if calibrated else []))


def cached_batches(cache_uri: str, *, windows: int, batch_size: int = 64, split: str = "train") -> Iterator[Batch]:
    """Up to `windows` windows of the cached shards' `split` as torch Batches (a plain pyarrow read), templates
    and `template_hidden` applied: pruning's significance and the export check read these."""
    import torch

    from p2es_dist.data.batches import table_to_batch

    for table in iter_tables([cache_uri], cache_columns(cache_uri), split=split, limit=windows,
                             batch_size=batch_size):
        batch = table_to_batch(table)
        yield {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}


class TeacherPredictor:
    """A Ray Data actor: loads the teacher once, then turns Arrow batches into batches with `teacher_ecg`."""

    def __init__(self, *, teacher_uri: str, options: GenerationOptions, threads: int = 1,
                 device: str = "cpu", template_dropout: float = 0.5) -> None:
        import torch

        from p2es_dist.models.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(teacher_uri).model.to(device)
        self.options, self.device, self.template_dropout = options, device, template_dropout

    def __call__(self, table: pa.Table) -> pa.Table:
        return predict_table(self.model, table, options=self.options, device=self.device,
                             template_dropout=self.template_dropout)


def infer_with_ray(*, teacher_uri: str, data_uris: list[str], distill: DistillSection, shard_folder: str) -> None:
    """Teacher outputs for the configured splits of `data_uris`, written as Parquet under `shard_folder`."""
    import ray.data

    columns = READ_COLUMNS + (CALIBRATION_READ_COLUMNS if calibration_available(data_uris) else [])
    dataset = read_windows(data_uris, columns, split=distill.splits)
    use_gpu = distill.gpus_per_actor > 0
    dataset = dataset.map_batches(
        TeacherPredictor,
        batch_size=distill.teacher_batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"teacher_uri": teacher_uri, "options": generation_options(distill),
                               "threads": max(1, round(distill.cpus_per_actor)),
                               "device": "cuda" if use_gpu else "cpu",
                               "template_dropout": distill.template_dropout},
        compute=ray.data.ActorPoolStrategy(size=distill.actors),
        num_cpus=distill.cpus_per_actor,
        **({"num_gpus": distill.gpus_per_actor} if use_gpu else {}),
    )
    filesystem, path = uri_lib.pyarrow_filesystem(shard_folder)
    dataset.write_parquet(path, filesystem=filesystem)


def _describe_shards(cache_uri: str, shard_folder: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(shards as the manifest lists them, windows per split), from the written files themselves."""
    import pyarrow.parquet as pq

    shards, n_windows = [], {}
    for shard_uri in uri_lib.ls(shard_folder, suffix=".parquet", missing_ok=True):
        data = uri_lib.read_bytes(shard_uri)
        table = pq.read_table(pa.BufferReader(data), columns=["split"])
        if len(table) == 0:
            continue
        for split, count in zip(*np.unique(table.column("split").to_numpy(zero_copy_only=False),
                                           return_counts=True), strict=True):
            n_windows[str(split)] = n_windows.get(str(split), 0) + int(count)
        shards.append({"path": shard_uri[len(cache_uri):].lstrip("/"), "rows": len(table),
                       "sha256": hashlib.sha256(data).hexdigest()})
    return shards, n_windows


Compute = Callable[..., None]


def ensure_teacher_outputs(*, teacher_uri: str, teacher_digest: str, data_uris: list[str],
                           distill: DistillSection, compute: Compute = infer_with_ray) -> dict[str, Any]:
    """The cached teacher outputs' manifest (with `uri` and `reused`), computing them only when missing."""
    key = cache_key(teacher_digest=teacher_digest, data_uris=data_uris, distill=distill)
    folder = cache_folder(distill.cache_root, key)
    manifest_uri = uri_lib.join(folder, "manifest.json")
    if uri_lib.exists(manifest_uri):
        manifest = json.loads(uri_lib.read_text(manifest_uri))
        if manifest.get("key") == key:
            log.info("teacher outputs: reusing %s (%s windows)", folder, manifest["n_windows"])
            return {**manifest, "uri": folder, "reused": True}
    if uri_lib.is_s3(folder):
        uri_lib.ensure_bucket(folder)
    shard_folder = uri_lib.join(folder, f"shards-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    begin = time.perf_counter()
    compute(teacher_uri=teacher_uri, data_uris=data_uris, distill=distill, shard_folder=shard_folder)
    shards, n_windows = _describe_shards(folder, shard_folder)
    if not shards:
        from p2es_dist.errors import UserError

        raise UserError(f"data.uris {data_uris}: no window with PPG in splits {distill.splits}; nothing to distil")
    manifest = {
        "schema_version": SHARD_SCHEMA_VERSION if calibration_available(data_uris) else SCHEMA_VERSION,
        "kind": "teacher_outputs", "fs": FS, "window": WINDOW,
        "key": key, "teacher_uri": teacher_uri, "column": TEACHER_COLUMN, "space": "model",
        "n_windows": n_windows, "shards": shards, "seconds": round(time.perf_counter() - begin, 2),
        "version": __version__,
    }
    uri_lib.write_text_atomic(manifest_uri, json.dumps(manifest, indent=2))
    return {**manifest, "uri": folder, "reused": False}
