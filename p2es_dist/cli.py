"""`p2es <command> ...`: one entry point over the job modules (each also runs as `python -m p2es_dist.jobs.<name>`).

User errors (bad arguments, unreadable URIs, malformed configs) print one line and exit 2, no traceback.
Any other failure, and a user error that wrapped another (a storage error, one raised in a Ray task or Train
worker), prints one line too, the root cause under Ray's wrappers, and the file its full traceback went to
(`$P2ES_LOG_DIR`, default `<tmp>/p2es-logs`): exit 2 for a user error, 1 otherwise.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from p2es_dist.errors import UserError, root_cause

LOG_DIR_ENV = "P2ES_LOG_DIR"

# command -> (module with main(argv), one-line help). Modules load lazily: `p2es --help` must not import Ray.
COMMANDS: dict[str, tuple[str, str]] = {
    "objectstore": ("p2es_dist.storage.objectstore", "start|stop|status the embedded S3 store (SeaweedFS)"),
    "ingest": ("p2es_dist.jobs.ingest", "raw records -> Parquet window shards (a Ray job)"),
    "pretrain": ("p2es_dist.jobs.pretrain", "foundation-style encoder pretraining (Ray Train + DeepSpeed)"),
    "train": ("p2es_dist.jobs.train", "train P2Es or a baseline (Ray Train + DeepSpeed)"),
    "tune": ("p2es_dist.jobs.tune", "Ray Tune search over Ray Train runs"),
    "runs": ("p2es_dist.jobs.runs", "compare tracked runs (TensorBoard events): metrics, differing config, curves"),
    "distill": ("p2es_dist.jobs.distill", "teacher -> mobile student"),
    "evaluate": ("p2es_dist.jobs.evaluate", "metrics, report and figures on shards"),
    "thresholds": ("p2es_dist.jobs.thresholds", "per-label classifier thresholds, chosen on validation"),
    "export": ("p2es_dist.jobs.export", "publishable bundle"),
    "calibrate": ("p2es_dist.jobs.calibrate", "paired ECG + PPG of a patient -> calibration profile (JSON)"),
    "translate": ("p2es_dist.jobs.translate", "PPG file -> 12-lead WFDB record"),
    "bench": ("p2es_dist.bench.cli", "data|synth|train|infer measurements, one JSON line each"),
    "quickstart": ("p2es_dist.jobs.quickstart", "the whole pipeline, small, on the embedded defaults"),
}


def one_line(error: BaseException) -> str:
    """A UserError's message on one line, else `Type: line` (the last line of a message that holds a
    traceback, as Ray's do, else the first)."""
    text = str(error)
    if isinstance(error, UserError):
        return " ".join(text.split())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = (lines[-1] if "Traceback (most recent call last)" in text else lines[0]) if lines else ""
    return f"{type(error).__name__}: {line}".rstrip(": ")


def write_traceback(error: BaseException, prog: str) -> Path:
    """The full traceback of `error` (and of its root cause, when Ray holds it apart) in a new log file."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "p2es-logs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prog.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(error))
    cause = root_cause(error)
    if cause is not error:
        text += "\nRoot cause:\n" + "".join(traceback.format_exception(cause))
    path.write_text(text)
    return path


def format_error(error: BaseException, *, prog: str, log_path: Path | str | None) -> str:
    """`<prog>: error: <root cause, one line> (full traceback: <log_path>)`."""
    where = f" (full traceback: {log_path})" if log_path else ""
    return f"{prog}: error: {one_line(root_cause(error))}{where}"


def _wraps_nothing(error: BaseException) -> bool:
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def run_main(entry: Callable[[list[str]], int | None], argv: list[str], *, prog: str) -> int:
    """Call a job's main: any failure becomes one line on stderr (see the module docstring)."""
    try:
        return int(entry(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = root_cause(exc)
        if cause is exc and isinstance(exc, UserError) and _wraps_nothing(exc):
            print(f"{prog}: error: {exc}", file=sys.stderr)  # a bad argument or config: nothing more to show
            return 2
        try:
            log_path: Path | str | None = write_traceback(exc, prog)
        except OSError as unwritable:
            traceback.print_exception(exc)
            log_path = f"not written: {unwritable}"
        print(format_error(exc, prog=prog, log_path=log_path), file=sys.stderr)
        return 2 if isinstance(cause, UserError) else 1


def _usage() -> str:
    lines = ["usage: p2es <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`p2es <command> --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("--version", "version"):
        from p2es_dist import __version__

        print(__version__)
        return 0
    if command not in COMMANDS:
        print(f"p2es: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"p2es {command}: not implemented yet in this version ({module_name} is missing)", file=sys.stderr)
            return 3
        raise
    return run_main(module.main, rest, prog=f"p2es {command}")


if __name__ == "__main__":
    sys.exit(main())
