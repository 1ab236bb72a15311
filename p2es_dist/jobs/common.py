"""What every job entrypoint shares: common arguments, config loading, Ray connection."""

from __future__ import annotations

import argparse
import json
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


# What `start_local_ray` changed, so that `stop_local_ray` can put it back: the previous RAY_ADDRESS and
# the instance's own temp dir.
_LOCAL_RAY: dict[str, Any] = {}
RAY_ADDRESS_ENV = "RAY_ADDRESS"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by the head node that ray.init starts (ray/_private/node.py)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def start_local_ray(*, num_cpus: int | None = None, runtime_env: dict | None = None,
                    log_to_driver: bool = True) -> str:
    """Start a private Ray on this machine and make every address lookup find it; returns its address.

    Ray's own helpers look a cluster up by address when not told one: Ray Train's placement-group cleaner
    asks the State API through `ray.util.state`, which takes RAY_ADDRESS, else the cluster of the last
    `ray start`, else any GCS process on the machine. With a second Ray here (another user's, a `ray start
    --head`) it then fails ("multiple active Ray instances") or asks the other cluster, finds no controller
    there and removes the live run's placement group. So the head's port is chosen first and RAY_ADDRESS
    names it before Ray starts: the raylet, hence every worker and actor, and this driver's children inherit
    it. The instance also gets its own temp dir (sessions, sockets, logs) and its State API (the dashboard
    process, which serves it).
    """
    import tempfile

    import ray

    # A job that shut its Ray down with ray.shutdown() left RAY_ADDRESS naming it; its logs stay.
    _forget_local_ray(keep_logs=True)
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    temp_dir = tempfile.mkdtemp(prefix="p2es-ray-")
    previous = os.environ.get(RAY_ADDRESS_ENV)
    os.environ[RAY_ADDRESS_ENV] = address
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        # address="local": start a new instance even though RAY_ADDRESS is set.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=None, dashboard_port=_free_port(),
                 runtime_env=runtime_env, log_to_driver=log_to_driver, configure_logging=False,
                 _temp_dir=temp_dir)
    except BaseException:
        _restore_address(previous)
        _remove_tree(temp_dir)
        raise
    finally:
        os.environ.pop(GCS_PORT_ENV, None)
    _LOCAL_RAY.update(previous_address=previous, temp_dir=temp_dir)
    started = ray.get_runtime_context().gcs_address
    if started != address:
        # Ray chose another interface: this process and its children get the right address, but the
        # workers already inherited `address`, so the cleaner may still pick another Ray on this machine.
        log.warning("local Ray started at %s, not at %s as planned", started, address)
        os.environ[RAY_ADDRESS_ENV] = started
    return started


def stop_local_ray(*, keep_logs: bool = False) -> None:
    """Shut down the Ray that `start_local_ray` started, put RAY_ADDRESS back as it was and remove the
    instance's temp dir, unless `keep_logs` (after a failure its logs are the details)."""
    import ray

    ray.shutdown()
    _forget_local_ray(keep_logs=keep_logs)


def _forget_local_ray(*, keep_logs: bool) -> None:
    if not _LOCAL_RAY:
        return
    _restore_address(_LOCAL_RAY.pop("previous_address"))
    temp_dir = _LOCAL_RAY.pop("temp_dir")
    if not keep_logs:
        _remove_tree(temp_dir)


def _restore_address(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(RAY_ADDRESS_ENV, None)
    else:
        os.environ[RAY_ADDRESS_ENV] = previous


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", PROGRESS_ENV)
# Set by `ray job submit` for the job's driver: the job's runtime env, which ray.init merges with its own.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def forwarded_env_vars() -> dict[str, str]:
    """The variables of this process that `connect_ray` passes to every worker, less those the submitted
    job's own runtime env sets: Ray refuses to start a driver whose ray.init repeats a job's variable
    ("Failed to merge the Job's runtime env ... because of a conflict"), and the user's value is the job's."""
    job_env: dict = {}
    if os.environ.get(JOB_CONFIG_ENV):
        job_env = (json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}).get("env_vars") or {}
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ and name not in job_env}


def connect_ray(*, num_cpus: int | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a private local Ray
    (`start_local_ray`).

    Returns True when this call started Ray, so the caller knows it owns the shutdown (`stop_local_ray`).
    """
    quiet_progress_when_logged()
    import ray

    if ray.is_initialized():
        return False
    _forget_local_ray(keep_logs=True)  # see start_local_ray
    # Workers of a local Ray inherit this process's environment (credentials included). On a cluster the
    # endpoint is forwarded; credentials come from the nodes' own AWS chain and never travel in runtime_env,
    # which Ray shows in its job listings.
    env_vars = forwarded_env_vars()
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = os.environ.get(RAY_ADDRESS_ENV)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return False
    start_local_ray(num_cpus=num_cpus, runtime_env=runtime_env)
    return True


@contextmanager
def ray_session(*, num_cpus: int | None = None) -> Iterator[None]:
    """`connect_ray` for the length of a block; shuts down only a Ray this call started."""
    started = connect_ray(num_cpus=num_cpus)
    try:
        yield
    except BaseException as exc:
        if started:
            exc.add_note(f"Ray's logs: {_LOCAL_RAY.get('temp_dir')}/session_latest/logs")
            stop_local_ray(keep_logs=True)
        raise
    if started:
        stop_local_ray()
