"""Ray Data into torch tensors vs. a bare pyarrow read of the same shards into numpy.

    p2es bench data --input s3://p2es/synthetic [--batch-size 256] [--max-windows 20000]

Both sides decode the same shards to the same model-space arrays (`table_to_batch`); Ray Data does it in
parallel `map_batches` and hands torch tensors over, pyarrow does it in this one process. Each side runs
twice, alternating, and the faster pass counts, so neither gains from a warm object-store cache alone.
"""

from __future__ import annotations

import json
import time

from p2es_dist.jobs.common import apply_common, connect_ray, parser


def pyarrow_pass(uris: list[str], batch_size: int, max_windows: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from p2es_dist.data.batches import table_to_batch
    from p2es_dist.data.loader import READ_COLUMNS
    from p2es_dist.data.read import shard_paths

    filesystem, paths = shard_paths(uris)
    windows = 0
    for path in paths:
        with filesystem.open_input_file(path) as handle:
            for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=READ_COLUMNS):
                windows += len(table_to_batch(pa.Table.from_batches([record_batch]))["ecg"])
                if windows >= max_windows:
                    return windows
    return windows


def ray_pass(uris: list[str], batch_size: int, max_windows: int) -> int:
    from p2es_dist.data.augment import AugmentConfig
    from p2es_dist.data.loader import LoaderConfig, model_space_dataset, torch_batches

    config = LoaderConfig(uris=uris, batch_size=batch_size, augment=AugmentConfig(enabled=False))
    dataset = model_space_dataset(config, split="all", training=False)
    windows = 0
    for batch in torch_batches(dataset, config, training=False):
        windows += len(batch["ecg"])
        if windows >= max_windows:
            break
    return windows


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es bench data", "Ray Data -> torch vs bare pyarrow -> numpy on the same shards", config=False)
    p.add_argument("--input", action="append", required=True, help="shard folder (repeatable)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=50_000)
    args = p.parse_args(argv)
    apply_common(args)
    started = connect_ray()
    try:
        best = {"ray": (0, float("inf")), "pyarrow": (0, float("inf"))}
        for _ in range(2):
            for name, run in (("pyarrow", pyarrow_pass), ("ray", ray_pass)):
                begin = time.perf_counter()
                windows = run(args.input, args.batch_size, args.max_windows)
                elapsed = time.perf_counter() - begin
                if elapsed < best[name][1]:
                    best[name] = (windows, elapsed)
    finally:
        if started:
            from p2es_dist.jobs.common import stop_local_ray

            stop_local_ray()
    ray_rate = best["ray"][0] / best["ray"][1]
    arrow_rate = best["pyarrow"][0] / best["pyarrow"][1]
    print(json.dumps({"bench": "data", "windows": best["ray"][0], "ray_windows_per_s": round(ray_rate, 1),
                      "pyarrow_windows_per_s": round(arrow_rate, 1), "ratio": round(ray_rate / arrow_rate, 3)}))
    return 0
