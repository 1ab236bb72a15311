"""Ray Data loader: manifests, split filter, model space, augmentation determinism, never `test`."""

from pathlib import Path

import numpy as np
import pytest
import torch

from p2es_dist.data.augment import AugmentConfig
from p2es_dist.data.ingest import run_ingest
from p2es_dist.data.loader import LoaderConfig, model_space_dataset, torch_batches, training_datasets
from p2es_dist.errors import UserError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def synthetic_shards(ray_local, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("loader") / "syn")
    run_ingest("synthetic", None, output, {"ingest": {"shard_rows": 200}, "synthetic": {"n_windows": 600, "seed": 1}})
    return output


def _collect(dataset):
    return [batch for batch in dataset.iter_batches(batch_size=None, batch_format="numpy")]


def test_split_filter_and_model_space(synthetic_shards):
    config = LoaderConfig(uris=[synthetic_shards], augment=AugmentConfig(enabled=False))
    counts = {}
    for split in ("train", "val", "test"):
        batches = _collect(model_space_dataset(config, split=split, training=False))
        counts[split] = sum(len(b["ecg"]) for b in batches)
        for b in batches:
            assert b["ecg"].shape[1:] == (12, 1024) and b["ecg"].dtype == np.float32
            assert np.abs(b["ecg"]).max() <= 1.0 + 1e-6 and np.abs(b["ppg"]).max() <= 1.0 + 1e-6
    assert sum(counts.values()) == 600 and counts["train"] > counts["val"] > 0


@pytest.mark.parametrize(("split", "min_quality"), [("all", 0.0), ("train", 0.0), (["val", "test"], 0.5)])
def test_ray_source_reads_exactly_the_rows_pyarrow_reads(synthetic_shards, split, min_quality):
    """`read_windows` (planned from the manifests) and `read_table` (pyarrow) agree row for row, every shard
    read once, in at most 2 tasks per CPU, and each row names its shard."""
    import pyarrow.dataset as ds

    from p2es_dist.data.ray_source import read_task_count
    from p2es_dist.data.read import read_table, read_windows, shard_paths

    columns = ["window_id", "split", "quality"]
    dataset = read_windows([synthetic_shards], columns, split=split, min_quality=min_quality, include_paths=True)
    rows = [row for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow") for row in block.to_pylist()]
    where = ds.field("quality") >= min_quality if min_quality else None
    expected = read_table([synthetic_shards], columns, split=split, where=where).to_pylist()
    assert 0 < len(rows) == len(expected)
    assert sorted(r["window_id"] for r in rows) == sorted(r["window_id"] for r in expected)  # none twice
    assert {(r["window_id"], r["split"], r["quality"]) for r in rows} == \
        {(r["window_id"], r["split"], r["quality"]) for r in expected}
    _, paths = shard_paths([synthetic_shards])
    assert {r["path"] for r in rows} <= set(paths)
    assert read_task_count(len(paths)) == min(len(paths), 2 * 2)  # ray_local has 2 CPUs


def test_a_shard_without_a_read_column_is_a_clear_error(synthetic_shards):
    from p2es_dist.data.read import read_windows

    with pytest.raises(UserError, match="no column 'teacher_ecg'"):
        read_windows([synthetic_shards], ["window_id", "teacher_ecg"])


def test_training_datasets_never_include_test(synthetic_shards):
    config = LoaderConfig(uris=[synthetic_shards])
    assert set(training_datasets(config)) == {"train", "val"}
    with pytest.raises(ValueError, match="test split"):
        training_datasets(config, splits=("train", "test"))


def test_torch_batches_and_augmentation_are_deterministic(synthetic_shards):
    config = LoaderConfig(uris=[synthetic_shards], batch_size=16, shuffle_buffer=64, seed=5)
    runs = []
    for _ in range(2):
        dataset = model_space_dataset(config, split="train", training=True)
        runs.append(list(torch_batches(dataset, config, training=True)))
    assert len(runs[0]) == len(runs[1]) > 0
    first = runs[0][0]
    assert isinstance(first["ecg"], torch.Tensor) and first["ecg"].shape == (16, 12, 1024)
    assert first["ecg"].dtype == torch.float32 and first["ecg_mask"].dtype == torch.bool
    assert set(first) >= {"ppg", "ppg_mask", "ecg", "ecg_mask", "age", "sex", "labels", "subject"}
    total = [sum(float(b["ecg"].abs().sum()) for b in run) for run in runs]
    assert total[0] == pytest.approx(total[1], rel=1e-6)


def test_augmentation_changes_training_batches_only(synthetic_shards):
    plain = LoaderConfig(uris=[synthetic_shards], augment=AugmentConfig(enabled=False))
    augmented = LoaderConfig(uris=[synthetic_shards], augment=AugmentConfig(star_p=1.0, amp_scale_p=1.0))
    a = np.concatenate([b["ppg"] for b in _collect(model_space_dataset(plain, split="train", training=True))])
    b = np.concatenate([b["ppg"] for b in _collect(model_space_dataset(augmented, split="train", training=True))])
    c = np.concatenate([b["ppg"] for b in _collect(model_space_dataset(augmented, split="val", training=False))])
    d = np.concatenate([b["ppg"] for b in _collect(model_space_dataset(plain, split="val", training=False))])
    assert a.shape == b.shape and not np.allclose(np.sort(a.ravel()), np.sort(b.ravel()))
    np.testing.assert_array_equal(np.sort(c.ravel()), np.sort(d.ravel()))


def test_shards_without_a_calibration_beat_ship_no_template(synthetic_shards, tmp_path):
    """Synthetic windows have no calibration: their manifest counts none, so batches carry upstrokes but no
    all-zero template; a manifest that does not count them is read with the beat columns, as before."""
    import json
    import shutil

    from p2es_dist.data.loader import read_columns

    manifest = json.loads((Path(synthetic_shards) / "manifest.json").read_text())
    assert all(shard["calibrated_rows"] == 0 for shard in manifest["shards"])
    config = LoaderConfig(uris=[synthetic_shards], augment=AugmentConfig(enabled=False))
    columns = read_columns(config)
    assert "ppg_upstrokes" in columns and "calib_beat" not in columns
    batch = next(iter(torch_batches(model_space_dataset(config, split="val", training=False), config,
                                    training=False)))
    assert "upstrokes" in batch and "template" not in batch and "template_mask" not in batch
    uncounted = tmp_path / "uncounted"
    shutil.copytree(synthetic_shards, uncounted)
    for shard in manifest["shards"]:
        del shard["calibrated_rows"]
    (uncounted / "manifest.json").write_text(json.dumps(manifest))
    assert "calib_beat" in read_columns(LoaderConfig(uris=[str(uncounted)]))


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        model_space_dataset(LoaderConfig(uris=[str(tmp_path)]), split="train", training=False)
