"""Config loading: overrides parsed as YAML, and errors that name the key."""

from dataclasses import dataclass, field

import pytest

from p2es_dist.config import apply_overrides, from_dict, load_config
from p2es_dist.errors import ConfigError


@dataclass
class Inner:
    depth: int = 4
    rates: tuple[float, float] = (0.5, 40.0)


@dataclass
class Outer:
    name: str = "x"
    lr: float = 1e-3
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_overrides_are_parsed_as_yaml():
    config = apply_overrides({}, ["train.max_steps=40", "model.lr=1e-3", "data.uris=[a, b]", "x.flag=true"])
    assert config == {"train": {"max_steps": 40}, "model": {"lr": 1e-3}, "data": {"uris": ["a", "b"]},
                      "x": {"flag": True}}


def test_override_without_equals_names_it():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"])


def test_override_into_a_scalar_names_the_key():
    with pytest.raises(ConfigError, match="train.max_steps is a int"):
        apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps.x=1"])


def test_from_dict_builds_nested_and_coerces():
    outer = from_dict(Outer, {"lr": 1, "inner": {"depth": 6, "rates": [1, 2]}, "tags": ["a"]})
    assert outer.lr == 1.0 and isinstance(outer.lr, float)
    assert outer.inner == Inner(depth=6, rates=(1.0, 2.0))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"dpeth": 3}}, r"model\.inner\.dpeth: unknown key"),
        ({"inner": {"depth": "deep"}}, r"model\.inner\.depth: expected an integer, got 'deep'"),
        ({"lr": "fast"}, r"model\.lr: expected a number"),
        ({"tags": "a"}, r"model\.tags: expected a list"),
    ],
)
def test_from_dict_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data, where="model")


def test_load_config_reports_bad_yaml_with_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ is not valid YAML"):
        load_config(path)


def test_load_config_finds_packaged_configs():
    config = load_config("ingest", ["synthetic.n_windows=7"])
    assert config["synthetic"]["n_windows"] == 7
    assert config["preprocess"]["hop"] == 512


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")
