"""Name -> (config dataclass, model class). `parse_model` types a config's `model:` section (no module is
built); `build_model` turns it into a module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from p2es_dist.config import from_dict, to_dict
from p2es_dist.errors import ConfigError

_REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {}


def register(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register("unet", UNetConfig)`; the model is built as `cls(config=cfg)`."""

    def wrap(model_cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = (config_cls, model_cls)
        model_cls.name = name
        return model_cls

    return wrap


def _load_all() -> None:
    # Importing the modules runs their @register decorators.
    from p2es_dist.models import _catalogue  # noqa: F401


def model_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ModelSpec(Mapping):
    """A `model:` section parsed once: the registered name and that model's own config dataclass.

    It also reads as the plain mapping `{"name": ..., **fields}`, so code that spreads or indexes a
    model section (`{**spec, "key": value}`, `spec["name"]`) keeps working on the typed form.
    """

    name: str
    config: Any

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **to_dict(self.config)}

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


def parse_model(model_section: Mapping[str, Any]) -> ModelSpec:
    """`{"name": "p2es", ...fields of its config}` -> a ModelSpec; a wrong name or key raises ConfigError."""
    if isinstance(model_section, ModelSpec):
        return model_section
    _load_all()
    section = dict(model_section)
    name = section.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError(f"model.name: expected one of {', '.join(sorted(_REGISTRY))}, got {name!r}")
    return ModelSpec(name=name, config=from_dict(_REGISTRY[name][0], section, where="model"))


def build_model(model_section: Mapping[str, Any]) -> nn.Module:
    """A `model:` section (a mapping or a ModelSpec) -> an initialised model."""
    spec = parse_model(model_section)
    return _REGISTRY[spec.name][1](config=spec.config)
