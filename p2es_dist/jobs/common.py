"""What every job entrypoint shares: common arguments, config loading, Ray connection."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from p2es_dist.config import apply_overrides, load_config

log = logging.getLogger("p2es")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line via the CLI) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from p2es_dist.errors import UserError

        raise UserError(f"{message} (see `{self.prog} --help`)")


def parser(prog: str, description: str, *, config: bool = True) -> argparse.ArgumentParser:
    """The shared arguments; `config=False` for commands that read no config (they must not offer one)."""
    p = _Parser(prog=prog, description=description)
    if config:
        p.add_argument("--config", help="YAML config (a path, or the name of one shipped in p2es_dist/configs)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, value parsed as YAML (repeatable), e.g. train.max_steps=40")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--out", help="folder for the job's summary files")
    return p


def apply_common(args: argparse.Namespace) -> dict[str, Any]:
    """Load the config with overrides, export the S3 endpoint, set up logging."""
    logging.basicConfig(level=os.environ.get("P2ES_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    if getattr(args, "config", None):
        return load_config(args.config, args.overrides)
    return apply_overrides({"_source": "--set"}, getattr(args, "overrides", []))


PROGRESS_ENV = "RAY_DATA_DISABLE_PROGRESS_BARS"


def quiet_progress_when_logged() -> None:
    """No Ray Data progress bars when stderr is not a terminal (`ray job submit`, `make demo > log`).

    Redrawn bars become thousands of lines in a log file; the jobs print their own summaries. Set before
    Ray starts so that local workers inherit it; `connect_ray` forwards it to a cluster's workers.
    """
    import sys

    if sys.stderr.isatty():
        return
    os.environ.setdefault(PROGRESS_ENV, "1")
    if os.environ[PROGRESS_ENV] == "1" and "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def connect_ray(*, num_cpus: int | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray.

    Returns True when this call started Ray, so the caller knows it owns the shutdown.
    """
    quiet_progress_when_logged()
    import ray

    if ray.is_initialized():
        return False
    # Workers of a local Ray inherit this process's environment (credentials included). On a cluster the
    # endpoint is forwarded; credentials come from the nodes' own AWS chain and never travel in runtime_env,
    # which Ray shows in its job listings.
    env_vars = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", PROGRESS_ENV)
                if k in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
             configure_logging=False)
    return True


@contextmanager
def ray_session(*, num_cpus: int | None = None) -> Iterator[None]:
    """`connect_ray` for the length of a block; shuts down only a Ray this call started."""
    started = connect_ray(num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
