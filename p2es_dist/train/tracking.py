"""Experiment tracking: TensorBoard event files beside each run, readable by TensorBoard and `p2es runs`.

    tracker = Tracker.for_run("s3://p2es/runs/p2es-1a2b", tracking="tensorboard")
    tracker.log_config(job.as_dict(), step=0)          # YAML text + HParams
    tracker.log_metrics({"train_loss": 0.41, "lr": 3e-4}, step=1)
    tracker.log_artifact("checkpoint", "s3://p2es/runs/p2es-1a2b/step-00000010", step=10)
    tracker.sync()                                     # at each checkpoint: the event files reach storage
    tracker.close()                                    # at the end: flush, upload, clean up

Where: `<run>/tensorboard/`, or `<train.tracking_dir>/<run name>/` to gather many runs under one logdir.
A local destination is written in place (TensorBoard shows the run live; there is nothing to copy); an
s3:// one is written to a local folder and uploaded by `sync`, so a lost node loses at most the events
since the last checkpoint. A restarted worker writes a new event file (SummaryWriter names files by time,
host and pid) with a purge marker at the step it resumed from, so TensorBoard and EventAccumulator drop the
steps the failed attempt logged after its last checkpoint instead of drawing them twice.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import typing
import weakref
from collections.abc import Mapping
from typing import Any, Literal

from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib

log = logging.getLogger("p2es.tracking")

Tracking = Literal["tensorboard", "none"]  # the type of train.tracking (train/config.py)
TRACKING_CHOICES: tuple[str, ...] = typing.get_args(Tracking)
EVENTS_FOLDER = "tensorboard"  # a run's event files: <run>/tensorboard/events.out.tfevents.*
CONFIG_TAG = "p2es/config"  # the resolved config as text; `p2es runs` also takes it as the mark of a p2es run
ARTIFACT_PREFIX = "p2es/artifacts/"  # text tags: where checkpoints and exported files went
TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text stores a text under `<tag>/text_summary`
# Metrics the HParams dashboard links to each run's config (it plots their last value per run).
HPARAM_METRICS = ("val_x0_mse", "val_loss", "train_loss")
MAX_VALUE_CHARS = 200  # longer config values (the population template's beats) are elided from the logs


def events_uri(run_uri: str, tracking_dir: str | None = None) -> str:
    """Where a run's event files end up: `<run_uri>/tensorboard`, or `<tracking_dir>/<run name>`."""
    if tracking_dir:
        return uri_lib.join(tracking_dir, str(run_uri).rstrip("/").rsplit("/", 1)[-1])
    return uri_lib.join(run_uri, EVENTS_FOLDER)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`; leaves are kept as they are (lists included)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def hparam_value(value: Any) -> float | int | str:
    """A config leaf as an HParams value: numbers stay numbers, anything else becomes short text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else f"<{len(text)} characters, elided>"


def _elide(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _elide(item) for key, item in value.items()}
    text = json.dumps(value, default=str)
    return value if len(text) <= MAX_VALUE_CHARS else f"<{len(text)} characters, elided>"


class Tracker:
    """One run's TensorBoard writer (rank 0 of a training run); a disabled one accepts every call and
    writes nothing, so callers need no `if`."""

    def __init__(self, destination: str | None, *, purge_step: int | None = None) -> None:
        self.destination = destination
        self._writer = None
        self._local: str | None = None
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded
        if destination is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        if uri_lib.is_s3(destination):
            self._local = tempfile.mkdtemp(prefix="p2es-tensorboard-")
            # A worker that dies on an exception still removes its staging folder at interpreter exit.
            weakref.finalize(self, shutil.rmtree, self._local, ignore_errors=True)
            logdir = self._local
        else:
            logdir = uri_lib.filesystem(destination)[1]
        self._writer = SummaryWriter(log_dir=logdir, purge_step=purge_step)

    @classmethod
    def for_run(cls, run_uri: str, *, tracking: str = "tensorboard", tracking_dir: str | None = None,
                rank: int = 0, purge_step: int | None = None) -> Tracker:
        """The tracker of a run: enabled on rank 0 when `tracking` is tensorboard, disabled otherwise."""
        if tracking not in TRACKING_CHOICES:
            raise UserError(f"train.tracking: expected one of {', '.join(TRACKING_CHOICES)}, got {tracking!r}")
        if rank != 0 or tracking == "none":
            return cls(None)
        return cls(events_uri(run_uri, tracking_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every number in `metrics` as a scalar at `step` (booleans as 0/1); `step` itself and non-numbers
        (None, text) are skipped: the step is the x axis, not a curve."""
        if self._writer is None:
            return
        for name, value in metrics.items():
            if name == "step" or value is None or isinstance(value, str):
                continue
            if isinstance(value, numbers.Real):
                self._writer.add_scalar(name, float(value), global_step=step)

    def log_config(self, config: Mapping[str, Any], step: int = 0) -> None:
        """The resolved config as YAML text (`CONFIG_TAG`) and as HParams (flattened dotted keys)."""
        if self._writer is None:
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        plain = json.loads(json.dumps(_elide(dict(config)), default=str))  # e.g. a Path: YAML-safe as text
        text = yaml.safe_dump(plain, sort_keys=True, default_flow_style=False)
        # Indented four spaces: TensorBoard renders the text as Markdown, and this keeps it a code block.
        self._writer.add_text(CONFIG_TAG, "\n".join(f"    {line}" for line in text.splitlines()), global_step=step)
        flat = {key: hparam_value(value) for key, value in flatten_config(config).items()}
        experiment, start, _ = hparams(flat, dict.fromkeys(HPARAM_METRICS, math.nan))
        # Into this run's own file: SummaryWriter.add_hparams would open a sub-run for them.
        self._writer.file_writer.add_summary(experiment, global_step=step)
        self._writer.file_writer.add_summary(start, global_step=step)

    def log_artifact(self, name: str, uri: str, step: int) -> None:
        """Where an artifact (a checkpoint, exported weights, an ONNX file) was written, as text."""
        if self._writer is not None:
            self._writer.add_text(f"{ARTIFACT_PREFIX}{name}", str(uri), global_step=step)

    def flush(self) -> None:
        """Write buffered events to the event file (for a local destination: where TensorBoard reads)."""
        if self._writer is not None:
            self._writer.flush()

    def sync(self) -> None:
        """Flush the events; for s3:// also upload every event file that changed since the last sync."""
        if self._writer is not None:
            self._writer.flush()
            self._upload()

    def close(self, *, status: str = "success") -> None:
        """End the HParams session, flush, upload (s3://) and remove the local staging folder."""
        if self._writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        code = api_pb2.Status.STATUS_SUCCESS if status == "success" else api_pb2.Status.STATUS_FAILURE
        content = HParamsPluginData(session_end_info=SessionEndInfo(status=code),
                                    version=metadata.PLUGIN_DATA_VERSION).SerializeToString()
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content)
        self._writer.file_writer.add_summary(Summary(value=[Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))]))
        self._writer.close()
        self._writer = None
        self._upload()
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)

    def _upload(self) -> None:
        """s3:// only: every local event file that changed since its last upload, whole (they only grow).

        A failed upload is logged, not raised: tracking must not stop a training run, and the next sync
        sends the same file again.
        """
        if self._local is None or self.destination is None:
            return
        for folder, _, files in os.walk(self._local):
            for name in files:
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, self._local)
                stat = os.stat(path)
                if self._uploaded.get(relative) == (stat.st_size, stat.st_mtime_ns):
                    continue
                target = uri_lib.join(self.destination, *relative.split(os.sep))
                try:
                    with open(path, "rb") as f:
                        uri_lib.write_bytes_atomic(target, f.read())
                except (UserError, OSError) as exc:
                    log.warning("tracking: could not upload %s to %s (%s); the next sync tries again",
                                relative, target, exc)
                    continue
                self._uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
