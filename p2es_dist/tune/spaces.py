"""Search spaces for `p2es tune`: a YAML file -> a Ray Tune param space and the search's settings.

    tune:                          # how to search (every key optional)
      num_samples: 8
      max_concurrent_trials: 2
      metric: val_x0_mse           # reported by the trainer on the `val` split (train.config.SELECTION_METRIC)
      mode: min
      scheduler: asha              # asha | fifo
      grace_period: 1              # ASHA, in reported iterations (one per `train.eval_every` steps)
      reduction_factor: 2
      max_t: 20
      search_alg: random           # random | optuna
    model.noise_schedule: {choice: [linear, cosine, sigmoid]}
    model.dilation_depth: {randint: [4, 9]}      # upper bound excluded, as in tune.randint
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
    model.cascades: {grid: [2, 3]}               # every value, repeated num_samples times
    train.max_steps: 200                         # a plain value: the same for every trial

Every other top-level key is a dotted key of the job config. A trial's sampled values are applied to a
copy of the base config as overrides, so `validate_space` insists that each key exists there (written,
or filled in by the trainer's defaults) and that each value passes the trainer's checks: a typo would
otherwise be searched over silently, and a bad value would fail trials one by one on the cluster.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from p2es_dist.config import from_dict, load_yaml
from p2es_dist.errors import ConfigError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SETTINGS_KEY = "tune"


@dataclass(kw_only=True)
class TuneSettings:
    num_samples: int = 1  # samples of the space; with `grid` keys, repeats of the whole grid
    max_concurrent_trials: int | None = None  # None: as many as leave a CPU to the data pipeline
    # The validation reconstruction error, which `p2es train` also selects checkpoints by
    # (`train.config.SELECTION_METRIC`); `val_loss` would rank P2Es mostly by its contrastive term.
    metric: str = "val_x0_mse"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # ASHA never stops a trial before this many reports
    reduction_factor: int = 2
    max_t: int = 100  # ASHA stops every trial at this many reports
    search_alg: Literal["random", "optuna"] = "random"
    seed: int = 0  # seeds the random and Optuna samplers: the same file searches the same points

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(f"max_concurrent_trials must be >= 1 or null, got {self.max_concurrent_trials}")
        if not 1 <= self.grace_period <= self.max_t:
            raise ValueError(f"grace_period must be in [1, max_t={self.max_t}], got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) config key: `kind` is a name from DISTRIBUTIONS, or `fixed`."""

    key: str
    kind: str
    values: tuple[Any, ...]  # the choices / grid points, the [lo, hi] bounds, or the one fixed value

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def candidates(self) -> tuple[Any, ...]:
        """Values a trial may get, as far as type checks go (bounds stand for their range)."""
        return self.values


@dataclass(frozen=True)
class SearchSpace:
    source: str  # the YAML file, for error messages
    settings: TuneSettings
    dimensions: dict[str, Dimension]

    @property
    def searched_keys(self) -> list[str]:
        return [key for key, dim in self.dimensions.items() if dim.kind != "fixed"]

    @property
    def has_grid(self) -> bool:
        return any(dim.kind == "grid" for dim in self.dimensions.values())

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param space: flat, keyed by the dotted config keys."""
        return {key: dim.to_tune() for key, dim in self.dimensions.items()}

    def check_against(self, config: Mapping[str, Any]) -> None:
        """Every key must exist in the base config, and every candidate value fit the type found there."""
        origin = config.get("_source", "the base config")
        for key, dim in self.dimensions.items():
            found, current = lookup(config, key)
            if not found:
                raise ConfigError(f"{self.source}: {key}: not a key of {origin} (a space can only vary existing keys)")
            for value in dim.candidates():
                if not _same_kind(current, value):
                    raise ConfigError(
                        f"{self.source}: {key}: {value!r} does not fit {origin}'s value {current!r} "
                        f"(expected {_kind_name(current)})"
                    )


def resolved_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The base config with every default filled in, so a space may vary keys the YAML leaves implicit."""
    from p2es_dist.train.config import parse_job_config

    job = parse_job_config(dict(config))
    return {**job.as_dict(), "_source": config.get("_source", "config")}


def validate_space(space: SearchSpace, base_config: Mapping[str, Any]) -> None:
    """Before any trial starts: every key exists (explicitly or as a default), and every value a key may
    take, set alone on the base config, passes the trainer's own checks."""
    from p2es_dist.train.config import parse_job_config

    space.check_against(resolved_config(base_config))
    for key, dim in space.dimensions.items():
        values = dim.candidates()
        if dim.kind == "randint":
            values = (values[0], values[1] - 1)  # the upper bound is excluded
        for value in values:
            try:
                parse_job_config(apply_values(base_config, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"{space.source}: {key}={value!r}: {exc}") from None


def lookup(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of `a.b.c` in nested mappings."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def apply_values(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `config` with each dotted key set to its value (numpy scalars made plain)."""
    merged = copy.deepcopy(dict(config))
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = plain(value)
    return merged


def plain(value: Any) -> Any:
    """Tune samples numpy scalars; configs and best.json want Python ones."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space YAML (a path, or a name under `tune_spaces/`)."""
    candidate = Path(path)
    if not candidate.exists() and not candidate.is_absolute():
        shipped = Path(__file__).resolve().parents[2] / "tune_spaces" / candidate.with_suffix(".yaml").name
        if shipped.exists():
            candidate = shipped
    if not candidate.exists():
        raise ConfigError(f"{path}: search space file not found")
    return parse_space(load_yaml(candidate), source=str(path))


def parse_space(data: Mapping[str, Any], *, source: str) -> SearchSpace:
    settings = from_dict(TuneSettings, data.get(SETTINGS_KEY) or {}, where=f"{source}: {SETTINGS_KEY}")
    dimensions = {
        str(key): _parse_dimension(str(key), spec, source)
        for key, spec in data.items()
        if key != SETTINGS_KEY
    }
    space = SearchSpace(source=source, settings=settings, dimensions=dimensions)
    if not space.searched_keys:
        raise ConfigError(f"{source}: no searched key (expected e.g. `train.lr: {{loguniform: [1.0e-4, 1.0e-2]}}`)")
    if settings.search_alg == "optuna" and space.has_grid:
        grid_key = next(k for k, d in dimensions.items() if d.kind == "grid")
        raise ConfigError(f"{source}: {grid_key}: `grid` cannot be used with search_alg: optuna (use choice)")
    return space


def _parse_dimension(key: str, spec: Any, source: str) -> Dimension:
    where = f"{source}: {key}"
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: expected a dotted config key such as model.dilation_depth")
    if isinstance(spec, list):
        raise ConfigError(f"{where}: a bare list is ambiguous; write {{choice: [...]}} or {{grid: [...]}}")
    if not isinstance(spec, Mapping):
        return Dimension(key=key, kind="fixed", values=(spec,))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        found = ", ".join(map(str, spec)) or "nothing"
        raise ConfigError(f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)}, got {found}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind}: expected a non-empty list of values, got {args!r}")
        return Dimension(key=key, kind=kind, values=tuple(args))
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(f"{where}: {kind}: expected [low, high] numbers, got {args!r}")
    lo, hi = args
    if not lo < hi:
        raise ConfigError(f"{where}: {kind}: expected low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform: expected low > 0, got {lo}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint: expected integer bounds, got {args!r}")
    if kind != "randint":
        lo, hi = float(lo), float(hi)
    return Dimension(key=key, kind=kind, values=(lo, hi))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _same_kind(current: Any, value: Any) -> bool:
    """Loose type check (numbers with numbers, strings with strings...); YAML writes `10` for 10.0."""
    if current is None or value is None:
        return True  # nullable keys: the trainer's own config checks decide
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, (int, float)):
        return _is_number(value)
    if isinstance(current, str):
        return isinstance(value, str)
    if isinstance(current, (list, dict)):
        return isinstance(value, type(current))
    return True
