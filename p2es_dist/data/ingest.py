"""Raw records -> Parquet window shards, record-parallel on Ray.

Output layout under `--output`:

    shards/<fingerprint>-<task id>-p<part>.parquet bounded size, row groups sized for streaming
    _work/<fingerprint>/task-<task id>.json        a task's records, shards, quarantine lines and counts
    _work/<fingerprint>/inputs.json                record key -> content hash of the last run's input
    _work/file_digests.json                        input file hashes by path, size and mtime (a cache)
    quarantine.jsonl                               one JSON object per rejected record or window
    manifest.json                                  written last, only by an ingest that succeeded

Crash safety: a shard is one atomic write (a rename locally, a single PUT on S3) and only a finished
task writes its marker, so a re-run redoes exactly the unfinished tasks. Readers go by the manifest,
so a shard of an interrupted task is never seen. The fingerprint ties all of this to the config: an
output folder never mixes two preprocessing settings. A task id hashes its records' keys and contents,
so a record added, removed or changed since an earlier (interrupted or finished) run redoes the tasks
it touches and no other; the manifest's `input_fingerprint` says which input set it describes.
Recordings with the same content under two keys (a copy in another folder) are ingested once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2es_dist import __version__
from p2es_dist.config import from_dict, section, to_dict
from p2es_dist.constants import FS, SHARD_SCHEMA_VERSION, SPLITS, WINDOW
from p2es_dist.data.ingest_core import file_digests, ingest_record, record_digest, record_files
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.data.sources import READERS, RECORDS_PER_TASK, SOURCES, reader
from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib

log = logging.getLogger("p2es.ingest")
DICTIONARY_COLUMNS = ["source", "record", "subject_id", "split"]


@dataclass
class IngestConfig:
    shard_rows: int = 2048  # ~55 MB of float16 signals per shard before compression
    row_group_rows: int = 256  # what one streaming read pulls at a time
    records_per_task: int | None = None  # default: sources.RECORDS_PER_TASK for the source
    compression: str = "lz4"  # decodes ~1.5x faster than zstd for ~10 % more bytes
    max_in_flight: int = 8  # tasks submitted ahead of completion (bounds driver memory)

    def __post_init__(self) -> None:
        if self.shard_rows < 1 or self.row_group_rows < 1 or (self.records_per_task or 1) < 1:
            raise ValueError("shard_rows, row_group_rows and records_per_task must be >= 1")


@dataclass
class IngestPlan:
    source: str
    input_uri: str
    output_uri: str
    preprocess: PreprocessConfig
    ingest: IngestConfig
    synthetic: Any  # SyntheticConfig when source == "synthetic"
    fingerprint: str
    tasks: list[list[str]]  # record keys per task; for synthetic, one chunk index per task
    reader_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. ptbxl.resolution
    records: dict[str, str] = dataclasses.field(default_factory=dict)  # every listed key -> content hash
    duplicates: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"record", "same_as"}
    task_ids: list[str] = dataclasses.field(default_factory=list)  # per task: hash of its keys and contents
    input_fingerprint: str = ""  # hash of `records`: the input set


def plan_ingest(source: str, input_uri: str | None, output_uri: str, config: dict[str, Any]) -> IngestPlan:
    if source not in SOURCES:
        raise UserError(f"--source: expected one of {', '.join(SOURCES)}, got {source!r}")
    preprocess = from_dict(PreprocessConfig, section(config, "preprocess"), where="preprocess")
    ingest = from_dict(IngestConfig, section(config, "ingest"), where="ingest")
    synthetic, reader_options = None, {}
    if source == "synthetic":
        from p2es_dist.data.sources.synthetic import SyntheticConfig

        synthetic = from_dict(SyntheticConfig, section(config, "synthetic"), where="synthetic")
        n_chunks = math.ceil(synthetic.n_windows / ingest.shard_rows)
        tasks = [[str(i)] for i in range(n_chunks)]
        input_uri = input_uri or "synthetic"
    else:
        if not input_uri:
            raise UserError(f"--input is required for --source {source}")
        if uri_lib.is_s3(input_uri):
            raise UserError(f"--input {input_uri}: raw records are read from a local folder; "
                            "stage them first (e.g. `aws s3 sync`), shards can go to s3://")
        root = Path(input_uri.removeprefix("file://")).expanduser().resolve()
        input_uri = str(root)
        reader_options = section(config, source)
        keys = _call_reader(source, "list_records", root, options=reader_options)
    identity = {"source": source, "input": input_uri, "preprocess": to_dict(preprocess),
                "shard_rows": ingest.shard_rows, "reader": reader_options,
                "synthetic": to_dict(synthetic) if synthetic else None, "schema_version": SHARD_SCHEMA_VERSION}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    plan = IngestPlan(source, input_uri, output_uri, preprocess, ingest, synthetic, fingerprint, [], reader_options)
    if source == "synthetic":
        plan.tasks = tasks
        plan.task_ids = [_digest([fingerprint, task]) for task in tasks]
        plan.input_fingerprint = fingerprint
        return plan
    plan.records = _content_hashes(plan, keys)
    first: dict[str, str] = {}
    for key in keys:  # sorted, so the same copy is kept on every run
        same_as = first.setdefault(plan.records[key], key)
        if same_as != key:
            plan.duplicates.append({"record": key, "same_as": same_as})
    kept = [key for key in keys if first[plan.records[key]] == key]
    per_task = ingest.records_per_task or RECORDS_PER_TASK[source]
    plan.tasks = [kept[i : i + per_task] for i in range(0, len(kept), per_task)]
    plan.task_ids = [_digest([fingerprint, [[key, plan.records[key]] for key in task]]) for task in plan.tasks]
    plan.input_fingerprint = _digest(sorted(plan.records.items()))
    return plan


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _content_hashes(plan: IngestPlan, keys: list[str]) -> dict[str, str]:
    """Record key -> hash of the files it is read from; file hashes are cached in the output folder."""
    cache_uri = uri_lib.join(plan.output_uri, "_work", "file_digests.json")
    cache = json.loads(uri_lib.read_text(cache_uri)) if uri_lib.exists(cache_uri) else {}
    before = json.dumps(cache, sort_keys=True)
    root, listings = Path(plan.input_uri), {}
    files = {key: record_files(plan.source, root, key, plan.reader_options, listings) for key in keys}
    digests = file_digests([f for paths, _ in files.values() for f in paths], cache)
    cache = {str(path): cache[str(path)] for path in digests}  # files no longer there leave the cache
    if json.dumps(cache, sort_keys=True) != before:
        if uri_lib.is_s3(plan.output_uri):
            uri_lib.ensure_bucket(plan.output_uri)
        uri_lib.write_text_atomic(cache_uri, json.dumps(cache))
    return {key: record_digest(key, paths, inside, digests) for key, (paths, inside) in files.items()}


def _call_reader(source: str, function: str, *args: Any, options: dict[str, Any] | None = None) -> Any:
    """A reader function with the source's own options (`--set ptbxl.resolution=records100`)."""
    try:
        return getattr(reader(source), function)(*args, **(options or {}))
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            problem = exc.args[0].split("() ")[-1]
            raise UserError(f"{source}: {problem} (check the `{source}:` config section)") from None
        raise


def _write_shards(table: pa.Table, plan: IngestPlan, task_id: int) -> list[dict]:
    shards = []
    for part, offset in enumerate(range(0, table.num_rows, plan.ingest.shard_rows)):
        chunk = table.slice(offset, plan.ingest.shard_rows)
        buffer = io.BytesIO()
        # Dictionary-encoding float16 signal lists costs 6x in decode speed and saves nothing.
        pq.write_table(chunk, buffer, row_group_size=plan.ingest.row_group_rows,
                       compression=plan.ingest.compression, use_dictionary=DICTIONARY_COLUMNS)
        data = buffer.getvalue()
        relative = f"shards/{plan.fingerprint}-{plan.task_ids[task_id]}-p{part:03d}.parquet"
        uri_lib.write_bytes_atomic(uri_lib.join(plan.output_uri, relative), data)
        # Rows with a calibration beat: readers skip the beat columns (and a 49 KB template per window in
        # every batch) where no shard has one, as for ECG-only sets (`data/read.calibration_present`).
        calibrated = chunk.num_rows - chunk.column("calib_beat").null_count
        shards.append({"path": relative, "rows": chunk.num_rows, "sha256": hashlib.sha256(data).hexdigest(),
                       "calibrated_rows": calibrated})
    return shards


def run_task(plan: IngestPlan, task_id: int) -> dict:
    """One task: read/generate, window, write shards, then the marker. Runs as a Ray task."""
    quarantine: list[dict] = []
    units: dict[str, Any] = {}
    n_ok = 0
    if plan.source == "synthetic":
        from p2es_dist.data.sources.synthetic import UNITS, generate

        # The generator stops at n_windows itself, so the last chunk is simply shorter.
        table = generate(plan.synthetic, chunk_index=int(plan.tasks[task_id][0]), chunk_size=plan.ingest.shard_rows)
        n_ok = 1
        units = dict(UNITS)
    else:
        tables = []
        for key in plan.tasks[task_id]:
            result = ingest_record(plan.source, plan.input_uri, key, plan.preprocess, plan.reader_options)
            tables.append(result["table"])
            quarantine.extend(result["quarantine"])
            n_ok += int(result["ok"])
            if result["ok"]:
                units = result["units"]
        table = pa.concat_tables(tables)
    counts = {}
    for split in SPLITS:
        mask = pc.equal(table.column("split"), split)
        subset = table.filter(mask).column("subject_id")
        counts[split] = {"n_windows": len(subset), "subjects": sorted(set(subset.to_pylist()))}
    records = [[key, plan.records.get(key)] for key in plan.tasks[task_id]] if plan.records else plan.tasks[task_id]
    marker = {"task": plan.task_ids[task_id], "fingerprint": plan.fingerprint, "records": records,
              "shards": _write_shards(table, plan, task_id),
              "quarantine": quarantine, "n_records_ok": n_ok,
              "n_records_quarantined": len(plan.tasks[task_id]) - n_ok if plan.source != "synthetic" else 0,
              "splits": counts, "units": units}
    uri_lib.write_text_atomic(_marker_uri(plan, task_id), json.dumps(marker))
    return {"task": task_id, "rows": table.num_rows, "ok": n_ok}


def _marker_uri(plan: IngestPlan, task_id: int) -> str:
    return uri_lib.join(plan.output_uri, "_work", plan.fingerprint, f"task-{plan.task_ids[task_id]}.json")


def pending_tasks(plan: IngestPlan) -> list[int]:
    """Tasks without a marker. Markers are named by task id (records and their contents), not position."""
    work = uri_lib.join(plan.output_uri, "_work", plan.fingerprint)
    done = {Path(p).name for p in uri_lib.ls(work, suffix=".json", missing_ok=True)}
    return [i for i, task_id in enumerate(plan.task_ids) if f"task-{task_id}.json" not in done]


def check_output(plan: IngestPlan) -> dict | None:
    """The existing manifest when this exact ingest of this input set already finished; an error for one
    made with other settings. A manifest of another input set is removed: the run that replaces it writes
    a new one only if it succeeds."""
    manifest_uri = uri_lib.join(plan.output_uri, "manifest.json")
    if not uri_lib.exists(manifest_uri):
        return None
    manifest = json.loads(uri_lib.read_text(manifest_uri))
    if manifest.get("fingerprint") != plan.fingerprint:
        raise UserError(f"--output {plan.output_uri}: already holds a {manifest.get('source')} ingest made with "
                        "other settings; choose an empty --output")
    if manifest.get("input_fingerprint") == plan.input_fingerprint:
        return manifest
    log.warning("--output %s: its manifest describes another set of input records; ingesting again",
                plan.output_uri)
    uri_lib.rm(manifest_uri)
    return None


def _remove_if_other_settings(plan: IngestPlan) -> None:
    manifest_uri = uri_lib.join(plan.output_uri, "manifest.json")
    if not uri_lib.exists(manifest_uri):
        return
    if json.loads(uri_lib.read_text(manifest_uri)).get("fingerprint") != plan.fingerprint:
        log.warning("%s was ingested with other settings (an older version?): deleting it and ingesting again",
                    plan.output_uri)
        uri_lib.rm(plan.output_uri, recursive=True)


def input_changes(plan: IngestPlan) -> dict[str, list[str]]:
    """Records added, removed and changed since the last run into this output (interrupted or not); the
    current input set becomes the one the next run compares with."""
    inputs_uri = uri_lib.join(plan.output_uri, "_work", plan.fingerprint, "inputs.json")
    previous = json.loads(uri_lib.read_text(inputs_uri)) if uri_lib.exists(inputs_uri) else None
    uri_lib.write_text_atomic(inputs_uri, json.dumps(plan.records))
    if previous is None:
        return {}
    return {"added": sorted(plan.records.keys() - previous.keys()),
            "removed": sorted(previous.keys() - plan.records.keys()),
            "changed": sorted(k for k in plan.records.keys() & previous.keys() if plan.records[k] != previous[k])}


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _subject_note(source: str) -> str | None:
    """What a reader says about its subjects (`SUBJECT_NOTE`), for the manifest; None when it says nothing."""
    return getattr(reader(source), "SUBJECT_NOTE", None) if source in READERS else None


def write_manifest(plan: IngestPlan, config: dict[str, Any]) -> dict:
    """quarantine.jsonl, then manifest.json; an ingest where every record failed writes no manifest."""
    markers = [json.loads(uri_lib.read_text(_marker_uri(plan, i))) for i in range(len(plan.tasks))]
    subjects = {split: set() for split in SPLITS}
    n_windows = dict.fromkeys(SPLITS, 0)
    for marker in markers:
        for split in SPLITS:
            subjects[split].update(marker["splits"][split]["subjects"])
            n_windows[split] += marker["splits"][split]["n_windows"]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = subjects[a] & subjects[b]
        if shared:  # a bug in a reader's split logic, never something to write down and train on
            raise RuntimeError(f"subjects in both {a} and {b}: {sorted(shared)[:5]}")
    quarantine = [line for marker in markers for line in marker["quarantine"]]
    units = next((m["units"] for m in markers if m["units"]), {})
    public_config = {k: v for k, v in config.items() if not k.startswith("_")}
    manifest = {
        "schema_version": SHARD_SCHEMA_VERSION, "source": plan.source, "fs": FS, "window": WINDOW,
        "hop": plan.preprocess.hop, "units": units, "fingerprint": plan.fingerprint,
        "input_fingerprint": plan.input_fingerprint,
        "n_windows": n_windows, "n_subjects": {s: len(subjects[s]) for s in SPLITS},
        "n_records_ok": sum(m["n_records_ok"] for m in markers),
        "n_records_quarantined": sum(m["n_records_quarantined"] for m in markers),
        "n_windows_quarantined": sum(1 for q in quarantine if "start" in q),
        "duplicates": plan.duplicates,  # recordings also found under another key, ingested once as `same_as`
        "shards": [shard for m in markers for shard in m["shards"]],
        "config": {"preprocess": to_dict(plan.preprocess), "ingest": to_dict(plan.ingest),
                   **({"synthetic": to_dict(plan.synthetic)} if plan.synthetic else {}), "input": public_config},
        "version": __version__,
    }
    note = _subject_note(plan.source)  # e.g. "one record = one subject" where a dataset has no patient ids
    if note:
        manifest["subjects_note"] = note
    lines = "".join(json.dumps(line) + "\n" for line in quarantine)
    uri_lib.write_text_atomic(uri_lib.join(plan.output_uri, "quarantine.jsonl"), lines)
    if manifest["n_records_ok"] == 0:
        raise UserError(f"ingest of {plan.input_uri}: every record failed; reasons in "
                        f"{uri_lib.join(plan.output_uri, 'quarantine.jsonl')}")
    uri_lib.write_text_atomic(uri_lib.join(plan.output_uri, "manifest.json"), json.dumps(manifest, indent=2))
    return manifest


def run_ingest(source: str, input_uri: str | None, output_uri: str, config: dict[str, Any], *,
               replace_other_settings: bool = False) -> dict:
    """Plan, run the pending tasks on Ray with a progress bar, then write quarantine.jsonl and the manifest.

    `replace_other_settings`: an output made with other settings is deleted and ingested again instead of
    refused (for outputs a command owns, such as quickstart's demo bucket after an upgrade)."""
    import ray
    from tqdm.auto import tqdm

    if uri_lib.is_s3(output_uri):
        uri_lib.ensure_bucket(output_uri)
    plan = plan_ingest(source, input_uri, output_uri, config)
    for duplicate in plan.duplicates:
        log.warning("duplicate recording: %s has the same content as %s (under %s); ingested once, as %s",
                    duplicate["record"], duplicate["same_as"], plan.input_uri, duplicate["same_as"])
    if replace_other_settings:
        _remove_if_other_settings(plan)
    existing = check_output(plan)
    changes = input_changes(plan) if plan.records else {}
    if any(changes.values()):
        log.warning("input changed since the last ingest into %s: %s", output_uri,
                    "; ".join(f"{kind} {_names(keys)}" for kind, keys in changes.items() if keys))
    if existing is not None:
        log.info("ingest already complete at %s (%d windows); nothing to do", output_uri,
                 sum(existing["n_windows"].values()))
        return existing
    pending = pending_tasks(plan)
    if len(pending) < len(plan.tasks):
        log.info("resuming: %d of %d tasks already done", len(plan.tasks) - len(pending), len(plan.tasks))
    # Crashed workers and storage that stopped answering for a while are retried; other errors are not.
    remote_task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[uri_lib.UnreachableError])(run_task)
    plan_ref = ray.put(plan)
    queue, in_flight, rows = list(pending), [], 0
    with tqdm(total=len(plan.tasks), initial=len(plan.tasks) - len(pending), unit="task",
              desc=f"ingest {source}") as bar:
        while queue or in_flight:
            while queue and len(in_flight) < plan.ingest.max_in_flight:
                in_flight.append(remote_task.remote(plan_ref, queue.pop(0)))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            rows += ray.get(done[0])["rows"]
            bar.update(1)
            bar.set_postfix(windows=rows)
    return write_manifest(plan, config)


def shard_uris(manifest_dir: str) -> list[str]:
    """Full URIs of the shards a manifest lists (readers never glob the folder)."""
    manifest = json.loads(uri_lib.read_text(uri_lib.join(manifest_dir, "manifest.json")))
    return [uri_lib.join(manifest_dir, shard["path"]) for shard in manifest["shards"]]

