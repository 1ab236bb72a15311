"""`p2es runs`: compare tracked training runs (their TensorBoard event files) under storage paths.

    p2es runs runs/                                   # every run under the local storage path
    p2es runs s3://p2es/runs/tune-smoke-20250101 --plot out/loss.png --metric val_loss --out out/runs

Each folder holding event files that a p2es run wrote (train, pretrain, distill stages, Tune trials: see
`p2es_dist/train/tracking.py`) is one run. The table shows its steps, the final and best (lowest) value of
each key metric, and the config keys whose values differ between the runs; `--plot` draws the metrics'
curves of every run; `--out` writes the same as `runs.json`. s3:// paths are listed and their event files
read through `p2es_dist.storage` (endpoint and credentials as for every command). Event folders that p2es
did not write (Ray Tune's own trial logs) are counted and left out. The last line is the `tensorboard`
command that shows the same runs in TensorBoard's UI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser
from p2es_dist.storage import uri as uri_lib
from p2es_dist.train.tracking import ARTIFACT_PREFIX, CONFIG_TAG, EVENTS_FOLDER, TEXT_SUFFIX

DEFAULT_METRICS = ("train_loss", "val_x0_mse")
# Keys that differ between any two runs by construction: the run column already names each run.
IGNORED_KEYS = ("train.run_name",)
EVENTS_MARK = ".tfevents."


@dataclass
class Run:
    name: str
    logdir: str  # the event folder, in the user's spelling (local path or s3:// URI)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    config: dict[str, Any] = field(default_factory=dict)  # flattened, as logged to HParams
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> last URI logged

    @property
    def steps(self) -> int:
        return max((step for curve in self.curves.values() for step, _ in curve), default=0)

    def final(self, metric: str) -> float | None:
        curve = self.curves.get(metric)
        return curve[-1][1] if curve else None

    def best(self, metric: str) -> float | None:
        values = [value for _, value in self.curves.get(metric, []) if math.isfinite(value)]
        return min(values) if values else None


def event_folders(root: str) -> list[str]:
    """The folders under `root` (relative, '/'-separated, '' for root itself) that hold event files."""
    fs, path = uri_lib.filesystem(root)
    with uri_lib.storage_errors(root):
        if not uri_lib.is_s3(root) and not fs.exists(path):
            raise UserError(f"{root}: no such folder")
        files = [str(f) for f in fs.find(path)] if fs.isdir(path) or uri_lib.is_s3(root) else []
    base = path.rstrip("/")
    folders = set()
    for file in files:
        name = file.rsplit("/", 1)[-1]
        if EVENTS_MARK in name and not name.endswith(uri_lib.TMP_SUFFIX):
            folders.add(file[len(base):].strip("/").rpartition("/")[0])
    return sorted(folders)


def _run_name(root: str, relative: str) -> str:
    parts = [part for part in relative.split("/") if part]
    if parts and parts[-1] == EVENTS_FOLDER:
        parts.pop()  # <run>/tensorboard: the run's own folder names it
    return "/".join(parts) or str(root).rstrip("/").rsplit("/", 1)[-1]


def _local_copy(logdir: str, scratch: str) -> str:
    """A local folder with the event files of `logdir` (itself when local; downloaded from S3)."""
    if not uri_lib.is_s3(logdir):
        return uri_lib.filesystem(logdir)[1]
    target = tempfile.mkdtemp(dir=scratch)
    for uri in uri_lib.ls(logdir):
        name = uri.rsplit("/", 1)[-1]
        if EVENTS_MARK in name:
            Path(target, name).write_bytes(uri_lib.read_bytes(uri))
    return target


def read_run(name: str, logdir: str, local: str) -> Run | None:
    """One event folder as a Run; None when p2es did not write it (no `CONFIG_TAG`)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from tensorboard.util import tensor_util

    guidance = {**ea.DEFAULT_SIZE_GUIDANCE, ea.SCALARS: 0, ea.TENSORS: 0}  # 0: keep every point, not a sample
    accumulator = ea.EventAccumulator(local, size_guidance=guidance)
    accumulator.Reload()
    tags = accumulator.Tags()
    if CONFIG_TAG + TEXT_SUFFIX not in tags.get(ea.TENSORS, []):
        return None
    run = Run(name=name, logdir=logdir)
    for tag in tags.get(ea.SCALARS, []):
        run.curves[tag] = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    for tag in tags.get(ea.TENSORS, []):
        if tag.startswith(ARTIFACT_PREFIX) and tag.endswith(TEXT_SUFFIX):
            text = tensor_util.make_ndarray(accumulator.Tensors(tag)[-1].tensor_proto).reshape(-1)[0]
            name = tag[len(ARTIFACT_PREFIX):-len(TEXT_SUFFIX)]
            run.artifacts[name] = text.decode() if isinstance(text, bytes) else str(text)
    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME).get(metadata.SESSION_START_INFO_TAG)
    if content:
        hparams = HParamsPluginData.FromString(content).session_start_info.hparams
        run.config = {key: getattr(value, value.WhichOneof("kind")) for key, value in hparams.items()
                      if value.WhichOneof("kind")}
    return run


def collect_runs(paths: list[str], scratch: str) -> tuple[list[Run], int]:
    """(the p2es runs under `paths`, sorted by name; how many other event folders were left out)."""
    runs, foreign = [], 0
    for root in paths:
        for relative in event_folders(root):
            logdir = uri_lib.join(root, *relative.split("/")) if relative else root
            run = read_run(_run_name(root, relative), logdir, _local_copy(logdir, scratch))
            if run is None:
                foreign += 1
            else:
                runs.append(run)
    names = [run.name for run in runs]
    for run in runs:  # the same relative name under two roots: tell them apart by the whole path
        if names.count(run.name) > 1:
            run.name = run.logdir
    return sorted(runs, key=lambda r: r.name), foreign


def differing_keys(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(config keys every run has, with different values; keys only some runs have).

    The second kind tells runs of different kinds apart (a distillation's record beside its stages, a
    U-Net beside P2Es) with dozens of keys at once, so the table leaves them to runs.json.
    """
    keys = sorted({key for run in runs for key in run.config} - set(IGNORED_KEYS))
    shared = [key for key in keys if all(key in run.config for run in runs)]
    partial = [key for key in keys if key not in shared]
    return [key for key in shared if len({json.dumps(run.config[key]) for run in runs}) > 1], partial


def comparison(runs: list[Run], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per run: name, steps, `<metric> final` and `<metric> best`, then the differing config keys."""
    differing = differing_keys(runs)[0] if len(runs) > 1 else []
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "steps": run.steps}
        for metric in metrics:
            row[f"{metric} final"], row[f"{metric} best"] = run.final(metric), run.best(metric)
        row.update({key: run.config.get(key) for key in differing})
        rows.append(row)
    return rows


MAX_CELL = 40  # characters of a config value in the table (a list of shard folders); runs.json has it whole


def format_table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."

    # object dtype: a column mixing numbers and None keeps None (shown "-") instead of becoming NaN.
    table = pd.DataFrame(rows, dtype=object)
    shown = table.drop(columns="run").map(cell)
    shown.insert(0, "run", table["run"])  # names whole: they are what tells the runs apart
    return shown.to_string(index=False)


def plot_curves(runs: list[Run], metrics: list[str], out: str) -> None:
    """One panel per metric, one line per run, saved as an image at `out` (a local path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [metric for metric in metrics if any(run.curves.get(metric) for run in runs)]
    if not shown:
        raise UserError(f"--plot: no run logged any of {', '.join(metrics)}")
    # Legend labels without the folders every run shares (a Tune experiment's, the storage path's).
    common = os.path.commonprefix([run.name.split("/") for run in runs]) if len(runs) > 1 else []
    labels = {run.name: "/".join(run.name.split("/")[len(common):]) or run.name for run in runs}
    figure, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.5), squeeze=False)
    for axis, metric in zip(axes[0], shown, strict=True):
        values = []
        for index, run in enumerate(runs):
            if curve := run.curves.get(metric):
                marker = "." if len(curve) < 30 else None  # a few points (validations) stay visible
                axis.plot([s for s, _ in curve], [v for _, v in curve], label=labels[run.name], marker=marker,
                          color=f"C{index % 10}")  # a run's colour is the same in every panel
                values += [v for _, v in curve if math.isfinite(v)]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            axis.set_yscale("log")  # a diverging run's spike would flatten every other curve
        axis.set(title=metric, xlabel="step", ylabel=metric)
        axis.grid(alpha=0.3)
    legend = {name: handle for axis in axes[0] for handle, name in zip(*axis.get_legend_handles_labels(), strict=True)}
    handles, names = list(legend.values()), list(legend)
    figure.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0.06 * (1 + (len(names) - 1) // 3), 1, 1))
    Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(Path(out).expanduser(), dpi=120)
    plt.close(figure)


def tensorboard_command(paths: list[str]) -> str:
    """The command that opens the same runs in TensorBoard (which reads s3:// itself, through boto3)."""
    if len(paths) == 1:
        command = f"tensorboard --logdir {shlex.quote(paths[0])}"
    else:
        spec = ",".join(f"{i}-{str(p).rstrip('/').rsplit('/', 1)[-1]}:{p}" for i, p in enumerate(paths))
        command = f"tensorboard --logdir_spec {shlex.quote(spec)}"
    endpoint = uri_lib.endpoint()
    if endpoint and any(uri_lib.is_s3(p) for p in paths):
        command = f"S3_ENDPOINT={shlex.quote(endpoint)} {command}"  # TensorBoard's name for a non-AWS endpoint
    return command


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es runs", "compare tracked runs (TensorBoard event files) under storage paths: steps, final and "
               "best metrics, the config keys that differ; optionally plot their curves", config=False)
    p.add_argument("paths", nargs="*", default=["runs"], metavar="PATH",
                   help="storage paths to search (local or s3://; default: runs, train.storage_path's default)")
    p.add_argument("--metric", dest="metrics", action="append", metavar="NAME",
                   help=f"a metric to compare (repeatable; default: {', '.join(DEFAULT_METRICS)})")
    p.add_argument("--plot", metavar="PNG", help="save the metrics' curves of every run to this image")
    args = p.parse_args(argv)
    apply_common(args)
    # One INFO line per event file read, a warning per resumed run (its purge of the failed attempt: expected).
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    metrics = args.metrics or list(DEFAULT_METRICS)
    with tempfile.TemporaryDirectory(prefix="p2es-runs-") as scratch:
        runs, foreign = collect_runs(args.paths, scratch)
    if not runs:
        raise UserError(f"no tracked runs under {', '.join(args.paths)} (training writes them unless "
                        f"train.tracking=none; {foreign} event folder(s) not written by p2es)")
    rows = comparison(runs, metrics)
    print(format_table(rows))
    partial = differing_keys(runs)[1]
    if partial:
        print(f"\n({len(partial)} config key(s) set in only some runs, e.g. {partial[0]}: all in runs.json with --out)")
    if foreign:
        print(f"\n({foreign} event folder(s) not written by p2es left out, e.g. Ray Tune's own trial logs)")
    if args.plot:
        plot_curves(runs, metrics, args.plot)
        print(f"\ncurves: {args.plot}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        records = [{**row, "logdir": run.logdir, "config": run.config, "artifacts": run.artifacts}
                   for row, run in zip(rows, runs, strict=True)]
        (Path(args.out) / "runs.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
    print(f"\nTensorBoard: {tensorboard_command(args.paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es runs"))
