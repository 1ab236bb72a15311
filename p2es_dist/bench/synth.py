"""Throughput of the synthetic source on one core: windows generated into shard tables per second.

    p2es bench synth [--windows 20000] [--chunk-size 2048] [--set synthetic.seed=1] [--breakdown]

Measures `synthetic.generate` end to end (physiology, signals, quality index, `build_table`) in this one
process with every BLAS/OpenMP pool held to one thread, after one warm-up chunk, over consecutive chunks
of the size ingest writes. `--breakdown` also times the stages on their own and prints them to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from p2es_dist.config import from_dict, section
from p2es_dist.jobs.common import apply_common, parser

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _single_threaded() -> contextlib.AbstractContextManager[Any]:
    """One thread per BLAS/OpenMP pool: via the environment when numpy is not loaded yet (the CLI), and
    via threadpoolctl, when installed, for pools already up (e.g. inside a test process)."""
    if "numpy" not in sys.modules:
        for variable in _THREAD_VARIABLES:
            os.environ[variable] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _threads_in_use() -> int:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return 1
    return max([pool["num_threads"] for pool in threadpool_info()] or [1])


def _time_chunks(run, n_chunks: int) -> tuple[float, float]:
    """Wall and CPU seconds of run(1) ... run(n_chunks); chunk 0 is the warm-up."""
    wall, cpu = time.perf_counter(), time.process_time()
    for chunk_index in range(1, n_chunks + 1):
        run(chunk_index)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es bench synth", "synthetic windows -> shard tables per second, one core")
    p.add_argument("--windows", type=int, default=20_000, help="windows to generate (default 20000)")
    p.add_argument("--chunk-size", type=int, default=2048, help="windows per generate() call (ingest's shard_rows)")
    p.add_argument("--breakdown", action="store_true", help="also time each stage, printed to stderr")
    args = p.parse_args(argv)
    if args.windows < 1 or args.chunk_size < 1:
        p.error("--windows and --chunk-size must be >= 1")
    config_dict = apply_common(args)
    limit_threads = _single_threaded()  # before the imports below load numpy

    from p2es_dist.data.quality import quality_index
    from p2es_dist.data.sources.synthetic import SyntheticConfig, generate, generate_arrays, table_from_arrays

    n_chunks = -(-args.windows // args.chunk_size)
    settings = section(config_dict, "synthetic")
    settings["n_windows"] = (n_chunks + 1) * args.chunk_size
    config = from_dict(SyntheticConfig, settings, where="synthetic")
    windows = n_chunks * args.chunk_size

    with limit_threads:
        threads = _threads_in_use()
        if threads != 1:
            print(f"p2es bench synth: warning: a thread pool still runs {threads} threads", file=sys.stderr)
        generate(config, chunk_index=0, chunk_size=args.chunk_size)  # warm-up: imports, noise bank, caches
        seconds, cpu_seconds = _time_chunks(
            lambda i: generate(config, chunk_index=i, chunk_size=args.chunk_size), n_chunks)
        if args.breakdown:
            _print_breakdown(config, args.chunk_size, n_chunks, seconds, cpu_seconds,
                             generate_arrays, quality_index, table_from_arrays)

    cores = 1
    rate = windows / seconds
    print(json.dumps({"bench": "synth", "windows": windows, "windows_per_s": round(rate, 1),
                      "windows_per_s_per_core": round(rate / cores, 1), "cores": cores}))
    return 0


def _print_breakdown(config, chunk_size, n_chunks, seconds, cpu_seconds, generate_arrays, quality_index,
                     table_from_arrays) -> None:
    """Each stage timed on its own pass over the same chunks. CPU seconds well below wall seconds mean other
    processes took this core, so the wall rate is then a floor."""
    arrays, quality = {}, {}

    def signals(i: int) -> None:
        arrays[i] = generate_arrays(config, chunk_index=i, chunk_size=chunk_size)

    def index(i: int) -> None:
        quality[i] = quality_index(arrays[i]["ecg"], arrays[i]["ecg_mask"], arrays[i]["ppg"])

    stages = {"generate": (seconds, cpu_seconds), "generate_arrays": _time_chunks(signals, n_chunks),
              "quality_index": _time_chunks(index, n_chunks),
              "table_from_arrays_without_quality": _time_chunks(
                  lambda i: table_from_arrays(config, arrays[i], quality[i]), n_chunks)}
    windows = n_chunks * chunk_size
    report = {name: {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "windows_per_cpu_s": round(windows / cpu)}
              for name, (wall, cpu) in stages.items()}
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
