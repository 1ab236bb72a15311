"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback (`run_main`)."""

import sys


class UserError(Exception):
    """A bad argument, unreadable URI or malformed config; the message names what and where."""


class ConfigError(UserError):
    """A config file or `--set` override that does not fit the expected schema."""


def run_main(entry, argv: list[str], *, prog: str) -> int:
    """Call a job's main, turning UserError into one line on stderr and exit code 2.

    Here rather than in `cli` so that any layer's `python -m` entry point (the object store's, in `storage`)
    can use it without importing upwards; `p2es_dist.cli.run_main` adds Ray's wrappers and a log file.
    """
    try:
        return int(entry(argv) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def root_cause(error: BaseException) -> BaseException:
    """The error under Ray's wrappers: a task's exception (RayTaskError), a Train controller's failure
    (ControllerError), the lowest failing rank's error (WorkerGroupError), a worker's own exception."""
    current, seen = error, set()
    while type(current).__module__.startswith("ray.") and id(current) not in seen:
        seen.add(id(current))
        workers = getattr(current, "worker_failures", None)
        inner = ((workers[min(workers)] if workers else None) or getattr(current, "controller_failure", None)
                 or getattr(current, "_base_exc", None) or getattr(current, "cause", None) or current.__cause__)
        if inner is None:
            break
        current = inner
    return current
