"""The one place p2es_dist uses a Ray internal: Ray Train V2's `WorkerGroupCallback`.

Why it is needed: when ASHA stops a trial, Tune kills its driver and with it the Train controller. Ray
Train then removes the workers' placement group from a detached helper that asks the State API, which
needs the dashboard (`ray[default]`); without it the group leaks and its CPUs stay reserved. Releasing it
from the search needs the group's id, and no public Ray API hands a Train run's placement group to code
outside its workers (`ray.train.UserCallback` only sees reports; `ray.util.get_current_placement_group`
answers in a worker, not in the controller). So a controller-side worker-group callback records it.

Everything internal is read here, behind `require_ray_internals()`: a Ray outside the tested range, or one
whose internals moved, fails the search before it starts with a one-line error naming what is missing.
"""

from __future__ import annotations

from typing import Any

import ray
from packaging.version import InvalidVersion, Version

from p2es_dist.errors import UserError

# The Ray this shim was checked against, as pinned in pyproject.toml: widen both after re-checking the
# internals below on a newer Ray.
MIN_RAY, MAX_RAY = Version("2.60"), Version("2.61")
CALLBACK_MODULE = "ray.train.v2._internal.execution.callback"

try:
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback as _WorkerGroupCallback
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # the class below must still be definable for the error to be raised later
    _WorkerGroupCallback, _IMPORT_ERROR = object, str(exc)


def missing_ray_internals(version: str | None = None, callback_base: Any = None) -> list[str]:
    """What this Ray (or the given version and base class, for tests) lacks; empty when the shim fits."""
    version = ray.__version__ if version is None else version
    base = _WorkerGroupCallback if callback_base is None else callback_base
    missing = []
    try:
        if not MIN_RAY <= Version(version) < MAX_RAY:
            missing.append(f"Ray >= {MIN_RAY}, < {MAX_RAY} (found {version})")
    except InvalidVersion:
        missing.append(f"a Ray version this shim can read (found {version!r})")
    if base is object:
        missing.append(f"{CALLBACK_MODULE}.WorkerGroupCallback ({_IMPORT_ERROR})")
    elif not callable(getattr(base, "after_worker_group_start", None)):
        missing.append(f"{CALLBACK_MODULE}.WorkerGroupCallback.after_worker_group_start")
    return missing


def require_ray_internals(version: str | None = None, callback_base: Any = None) -> None:
    """Raise a one-line UserError naming what is missing; called before a search starts any trial."""
    missing = missing_ray_internals(version, callback_base)
    if missing:
        raise UserError("p2es tune releases stopped trials' placement groups through a Ray Train internal (see "
                        f"p2es_dist/tune/ray_compat.py); this Ray lacks: {'; '.join(missing)}")


def worker_group_placement_group_id(worker_group: Any) -> str:
    """The hex id of a started Train worker group's placement group (internal attributes, Ray 2.60)."""
    try:
        handle = worker_group.get_worker_group_state().placement_group_handle
        return handle.placement_group.id.hex()
    except AttributeError as exc:
        raise UserError(f"Ray {ray.__version__}: a Train worker group no longer exposes "
                        f"get_worker_group_state().placement_group_handle.placement_group ({exc})") from exc


# Lives in a Train controller's process (one per Train run): the placement group of the worker group it
# started last, read by the report callback in the same process.
_controller_state: dict[str, str] = {}


def controller_placement_group() -> str | None:
    return _controller_state.get("placement_group")


class RecordPlacementGroup(_WorkerGroupCallback):
    """Runs in the Train controller: remembers the placement group of each worker group it starts.

    Passed in `ray.train.RunConfig(callbacks=...)`: Train hands non-user callbacks to its controller as is.
    """

    def after_worker_group_start(self, worker_group: Any) -> None:
        _controller_state["placement_group"] = worker_group_placement_group_id(worker_group)
