"""YAML configs with `--set a.b=value` overrides, checked against small dataclasses.

Every component owns a dataclass of its knobs; `from_dict` builds one from a mapping and raises a
`ConfigError` that names the file, the dotted key and what was expected, so the CLI can print one line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from p2es_dist.errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 insists on a dot: `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def packaged_config_path(name: str) -> Path:
    """Path of a YAML config shipped in `p2es_dist/configs/` (`smoke` or `smoke.yaml`)."""
    file_name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    return Path(str(resources.files("p2es_dist") / "configs" / file_name))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a packaged config may be named without its folder."""
    candidate = Path(path)
    if not candidate.exists() and not candidate.is_absolute():
        candidate = packaged_config_path(str(path))  # `smoke`, `models/p2es`: shipped in the package
    if not candidate.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(candidate.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{candidate}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{candidate}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(config: dict[str, Any], overrides: Iterable[str], *, source: str = "--set") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in place; values are parsed as YAML (`1e-3`, `[1, 2]`, `null`)."""
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} {override!r}: expected KEY=VALUE, e.g. train.max_steps=40")
        try:
            value = parse_yaml(raw_value) if raw_value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"{source} {key}: value {raw_value!r} is not valid YAML") from None
        node = config
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(parts[: depth + 1])
                raise ConfigError(f"{source} {key}: {dotted} is a {type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A YAML config with overrides applied; remembers its origin under `_source` for error messages."""
    config = apply_overrides(load_yaml(path), overrides)
    config["_source"] = str(path)
    return config


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently coerce: int -> float) a value against a dataclass field's annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where=where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise a ConfigError naming the key."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields) - {"_source"})
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        if name == "_source":
            continue
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(instance: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-friendly data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(instance))


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`config[name]` as a dict (empty when missing); errors name the config file."""
    value = config.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        origin = config.get("_source", "config")
        raise ConfigError(f"{origin}: {name}: expected a mapping, got {value!r}")
    return dict(value)
