"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback (`run_main`)."""

import sys


class UserError(Exception):
    """A bad argument, unreadable URI or malformed config; the message names what and where."""


class ConfigError(UserError):
    """A config file or `--set` override that does not fit the expected schema."""


def run_main(entry, argv: list[str], *, prog: str) -> int:
    """Call a job's main, turning UserError into one line on stderr and exit code 2.

    Here rather than in `cli` so that any layer's `python -m` entry point (the object store's, in `storage`)
    can use it without importing upwards; `p2es_dist.cli.run_main` is this function.
    """
    try:
        return int(entry(argv) or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
