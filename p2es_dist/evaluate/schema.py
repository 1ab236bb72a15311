"""The JSON schema of `metrics.json`, shipped as package data (`p2es_dist/schemas/metrics.schema.json`)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "metrics.schema.json"


@lru_cache(maxsize=1)
def metrics_schema() -> dict[str, Any]:
    return json.loads(resources.files("p2es_dist").joinpath("schemas", SCHEMA_FILE).read_text())


def validate_metrics(document: dict[str, Any]) -> None:
    """Raise ValueError naming the first offending field when `document` does not fit the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(metrics_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ValueError(f"metrics.json does not fit {SCHEMA_FILE} at {where}: {error.message}")
