"""Ray Data into torch tensors vs. a bare pyarrow read of the same shards into numpy.

    p2es bench data --input s3://p2es/synthetic [--batch-size 256] [--max-windows 20000]

Both sides decode the same columns of the same shards to the same model-space arrays (`table_to_batch`);
Ray Data does it in parallel tasks and hands torch tensors over, pyarrow does it in this one process. Each
side runs `--passes` times, alternating, and the faster pass counts, so neither gains from a warm cache
alone. The Ray dataset is built once and iterated once per pass, as a training run does per epoch:
`ray_first_batch_s` per pass shows what re-planning an epoch costs (compare 100 and 1,000 shards).
"""

from __future__ import annotations

import json
import time

from p2es_dist.jobs.common import apply_common, connect_ray, parser


def pyarrow_pass(uris: list[str], batch_size: int, max_windows: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from p2es_dist.data.batches import table_to_batch
    from p2es_dist.data.loader import LoaderConfig, read_columns
    from p2es_dist.data.read import shard_paths

    columns = read_columns(LoaderConfig(uris=uris))  # exactly what the Ray side reads
    filesystem, paths = shard_paths(uris)
    windows = 0
    for path in paths:
        with filesystem.open_input_file(path) as handle:
            for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns):
                windows += len(table_to_batch(pa.Table.from_batches([record_batch]))["ecg"])
                if windows >= max_windows:
                    return windows
    return windows


def ray_pass(dataset, config, max_windows: int) -> tuple[int, float]:
    """Windows through `torch_batches` (one epoch of what a Ray Train worker does) and seconds to the
    first batch: planning the epoch's execution plus the first read."""
    from p2es_dist.data.loader import torch_batches

    windows, begin, first = 0, time.perf_counter(), None
    for batch in torch_batches(dataset, config, training=False):
        first = first if first is not None else time.perf_counter() - begin
        windows += len(batch["ecg"])
        if windows >= max_windows:
            break
    return windows, first or 0.0


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es bench data", "Ray Data -> torch vs bare pyarrow -> numpy on the same shards", config=False)
    p.add_argument("--input", action="append", required=True, help="shard folder (repeatable)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=50_000)
    p.add_argument("--passes", type=int, default=2, help="passes of each side, alternating; the fastest counts")
    args = p.parse_args(argv)
    apply_common(args)
    from p2es_dist.data.augment import AugmentConfig
    from p2es_dist.data.loader import LoaderConfig, model_space_dataset
    from p2es_dist.data.read import shard_paths

    started = connect_ray()
    try:
        config = LoaderConfig(uris=args.input, batch_size=args.batch_size, augment=AugmentConfig(enabled=False))
        begin = time.perf_counter()
        dataset = model_space_dataset(config, split="all", training=False)  # built once, like a training run's
        plan_s = time.perf_counter() - begin
        best = {"ray": (0, float("inf")), "pyarrow": (0, float("inf"))}
        first_batch_s = []
        for _ in range(args.passes):
            begin = time.perf_counter()
            windows = pyarrow_pass(args.input, args.batch_size, args.max_windows)
            best["pyarrow"] = min(best["pyarrow"], (windows, time.perf_counter() - begin), key=lambda b: b[1])
            begin = time.perf_counter()
            windows, first = ray_pass(dataset, config, args.max_windows)
            best["ray"] = min(best["ray"], (windows, time.perf_counter() - begin), key=lambda b: b[1])
            first_batch_s.append(round(first, 2))
    finally:
        if started:
            from p2es_dist.jobs.common import stop_local_ray

            stop_local_ray()
    ray_rate = best["ray"][0] / best["ray"][1]
    arrow_rate = best["pyarrow"][0] / best["pyarrow"][1]
    print(json.dumps({"bench": "data", "windows": best["ray"][0], "shards": len(shard_paths(args.input)[1]),
                      "ray_windows_per_s": round(ray_rate, 1), "pyarrow_windows_per_s": round(arrow_rate, 1),
                      "ratio": round(ray_rate / arrow_rate, 3), "plan_s": round(plan_s, 2),
                      "ray_first_batch_s": first_batch_s}))
    return 0
