"""`p2es <command> ...`: one entry point over the job modules (each also runs as `python -m p2es_dist.jobs.<name>`).

User errors (bad arguments, unreadable URIs, malformed configs) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import importlib
import sys

from p2es_dist.errors import run_main  # re-exported: the job modules call `p2es_dist.cli.run_main`

# command -> (module with main(argv), one-line help). Modules load lazily: `p2es --help` must not import Ray.
COMMANDS: dict[str, tuple[str, str]] = {
    "objectstore": ("p2es_dist.storage.objectstore", "start|stop|status the embedded S3 store (SeaweedFS)"),
    "ingest": ("p2es_dist.jobs.ingest", "raw records -> Parquet window shards (a Ray job)"),
    "pretrain": ("p2es_dist.jobs.pretrain", "foundation-style encoder pretraining (Ray Train + DeepSpeed)"),
    "train": ("p2es_dist.jobs.train", "train P2Es or a baseline (Ray Train + DeepSpeed)"),
    "tune": ("p2es_dist.jobs.tune", "Ray Tune search over Ray Train runs"),
    "distill": ("p2es_dist.jobs.distill", "teacher -> mobile student"),
    "evaluate": ("p2es_dist.jobs.evaluate", "metrics, report and figures on shards"),
    "export": ("p2es_dist.jobs.export", "publishable bundle"),
    "calibrate": ("p2es_dist.jobs.calibrate", "paired ECG + PPG of a patient -> calibration profile (JSON)"),
    "translate": ("p2es_dist.jobs.translate", "PPG file -> 12-lead WFDB record"),
    "bench": ("p2es_dist.bench.cli", "data|synth|train|infer measurements, one JSON line each"),
    "quickstart": ("p2es_dist.jobs.quickstart", "the whole pipeline, small, on the embedded defaults"),
}


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
