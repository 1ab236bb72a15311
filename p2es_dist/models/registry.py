"""Name -> (config dataclass, model class); `build_model` turns a config's `model:` section into a module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from p2es_dist.config import from_dict
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


def build_model(model_section: Mapping[str, Any]) -> nn.Module:
    """`{"name": "p2es", ...fields of its config}` -> an initialised model."""
    _load_all()
    section = dict(model_section)
    name = section.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError(f"model.name: expected one of {', '.join(sorted(_REGISTRY))}, got {name!r}")
    config_cls, model_cls = _REGISTRY[name]
    return model_cls(config=from_dict(config_cls, section, where="model"))
