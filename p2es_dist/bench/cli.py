"""`p2es bench <name> ...`: each benchmark prints exactly one JSON line on stdout (README "Benchmarks")."""

from __future__ import annotations

import importlib

from p2es_dist.errors import UserError

BENCHES = {
    "data": "p2es_dist.bench.data",
    "synth": "p2es_dist.bench.synth",
    "train": "p2es_dist.bench.train",
    "infer": "p2es_dist.bench.infer",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] not in BENCHES:
        raise UserError(f"expected one of {', '.join(BENCHES)} (e.g. `p2es bench data --input s3://p2es/bidmc`)")
    try:
        module = importlib.import_module(BENCHES[argv[0]])
    except ModuleNotFoundError as exc:
        if exc.name == BENCHES[argv[0]]:
            raise UserError(f"bench {argv[0]}: not implemented yet in this version") from None
        raise
    return int(module.main(argv[1:]) or 0)
