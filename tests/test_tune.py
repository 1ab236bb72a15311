"""`p2es tune`: search-space files (every distribution, errors naming file and key), best.json from trial
results, and an end-to-end ASHA search over smoke training runs on a local Ray."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from ray import tune

from p2es_dist.cli import run_main
from p2es_dist.config import load_config
from p2es_dist.errors import ConfigError, UserError
from p2es_dist.tune import ray_compat
from p2es_dist.tune.search import TrialRecord, concurrent_trials, run_search, summarise
from p2es_dist.tune.spaces import (
    TuneSettings,
    apply_values,
    load_space,
    resolved_config,
    validate_space,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACES = REPO_ROOT / "tune_spaces"
SMOKE_CONFIG = REPO_ROOT / "p2es_dist" / "configs" / "smoke.yaml"


# ---------------------------------------------------------------------------------------------------------
# search-space files


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_every_distribution_kind_becomes_its_tune_domain(tmp_path):
    space = load_space(write(tmp_path, """
tune: {num_samples: 3, max_concurrent_trials: 1, scheduler: asha, grace_period: 2, reduction_factor: 3, max_t: 9}
model.noise_schedule: {choice: [linear, cosine]}
model.cascades: {grid: [1, 2, 3]}
model.sigma_blur_max: {uniform: [2, 20]}
train.lr: {loguniform: [1.0e-4, 1e-2]}
model.dilation_depth: {randint: [3, 9]}
train.max_steps: 40
"""))
    assert space.settings == TuneSettings(num_samples=3, max_concurrent_trials=1, grace_period=2,
                                          reduction_factor=3, max_t=9)
    assert space.settings.metric == "val_x0_mse" and space.settings.mode == "min"  # reconstruction, not total loss
    params = space.param_space()
    assert params["model.noise_schedule"].categories == ["linear", "cosine"]
    assert params["model.cascades"] == {"grid_search": [1, 2, 3]}
    uniform, loguniform, randint = params["model.sigma_blur_max"], params["train.lr"], params["model.dilation_depth"]
    assert (uniform.lower, uniform.upper) == (2.0, 20.0) and type(uniform.get_sampler()).__name__ == "_Uniform"
    assert (loguniform.lower, loguniform.upper) == (1e-4, 1e-2)
    assert type(loguniform.get_sampler()).__name__ == "_LogUniform"
    assert isinstance(randint, tune.search.sample.Integer) and (randint.lower, randint.upper) == (3, 9)
    assert params["train.max_steps"] == 40
    assert space.searched_keys == ["model.noise_schedule", "model.cascades", "model.sigma_blur_max", "train.lr",
                                   "model.dilation_depth"]
    draws = [randint.sample() for _ in range(200)]
    assert min(draws) == 3 and max(draws) == 8  # upper bound excluded, as in tune.randint
    assert all(1e-4 <= loguniform.sample() <= 1e-2 for _ in range(100))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tune: {num_sample: 4}\ntrain.lr: {choice: [1]}", r"space\.yaml: tune\.num_sample: unknown key"),
        ("tune: {mode: best}\ntrain.lr: {choice: [1]}", r"space\.yaml: tune\.mode: expected one of"),
        ("tune: {grace_period: 5, max_t: 2}\ntrain.lr: {choice: [1]}", r"space\.yaml: tune: grace_period must"),
        ("train.lr: {normal: [0, 1]}", r"space\.yaml: train\.lr: expected exactly one of choice, grid"),
        ("train.lr: {choice: [1], grid: [2]}", r"space\.yaml: train\.lr: expected exactly one of"),
        ("train.lr: [1, 2]", r"space\.yaml: train\.lr: a bare list is ambiguous"),
        ("train.lr: {choice: []}", r"space\.yaml: train\.lr: choice: expected a non-empty list"),
        ("train.lr: {uniform: [1]}", r"space\.yaml: train\.lr: uniform: expected \[low, high\]"),
        ("train.lr: {uniform: [2, 1]}", r"space\.yaml: train\.lr: uniform: expected low < high"),
        ("train.lr: {loguniform: [0, 1]}", r"space\.yaml: train\.lr: loguniform: expected low > 0"),
        ("model.cascades: {randint: [1, 2.5]}", r"space\.yaml: model\.cascades: randint: expected integer"),
        ("train.max_steps: 40", r"space\.yaml: no searched key"),
        ("tune: {search_alg: optuna}\nmodel.cascades: {grid: [1, 2]}",
         r"space\.yaml: model\.cascades: `grid` cannot be used with search_alg: optuna"),
    ],
)
def test_space_errors_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model.dilation_dept: {choice: [2, 3]}", r"space\.yaml: model\.dilation_dept: not a key of .*smoke\.yaml"),
        ("trian.lr: {choice: [1.0e-3]}", r"space\.yaml: trian\.lr: not a key of"),
        ("model.noise_schedule: {choice: [cosine, 3]}", r"space\.yaml: model\.noise_schedule: 3 does not fit"),
        ("model.noise_schedule: {choice: [cosine, quadratic]}",
         r"space\.yaml: model\.noise_schedule='quadratic': .*smoke\.yaml: model\.noise_schedule: expected one of"),
        ("model.dilation_depth: {randint: [0, 3]}", r"space\.yaml: model\.dilation_depth=0: .*must be >= 1"),
    ],
)
def test_keys_and_values_are_checked_against_the_base_config(tmp_path, text, message):
    space = load_space(write(tmp_path, text))
    with pytest.raises(ConfigError, match=message):
        validate_space(space, load_config(SMOKE_CONFIG))


def test_keys_left_to_defaults_can_be_searched():
    config = load_config(SMOKE_CONFIG)
    assert "noise_schedule" not in config["model"]  # smoke.yaml relies on the P2Es default
    resolved = resolved_config(config)
    assert resolved["model"]["noise_schedule"] == "cosine" and resolved["model"]["dilation_depth"] == 3
    assert resolved["train"]["max_failures"] == 1


@pytest.mark.parametrize(("space", "config"), [("smoke", "smoke"), ("noise_schedules", "p2es_bidmc"),
                                               ("dilation_depth", "p2es_bidmc")])
def test_shipped_spaces_fit_their_configs(space, config):
    validate_space(load_space(SPACES / f"{space}.yaml"), load_config(config))


def test_optuna_samples_the_noise_schedule_space():
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(SPACES / "noise_schedules.yaml")
    assert space.settings.search_alg == "optuna"
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("val_loss", "min", space.param_space())
    for trial in range(5):
        values = searcher.suggest(f"t{trial}")
        assert values["model.noise_schedule"] in ("linear", "cosine", "sigmoid")
        assert values["model.timesteps"] in (100, 200, 500, 1000)
        assert 2.0 <= values["model.sigma_blur_max"] <= 20.0 and 1e-4 <= values["model.d_min"] <= 1e-2


def test_apply_values_copies_and_makes_values_plain():
    base = {"model": {"dilation_depth": 3}, "train": {"lr": 1e-3}}
    merged = apply_values(base, {"model.dilation_depth": np.int64(5), "train.lr": np.float64(3e-4)})
    assert merged == {"model": {"dilation_depth": 5}, "train": {"lr": 3e-4}}
    assert type(merged["model"]["dilation_depth"]) is int and base["model"]["dilation_depth"] == 3


def test_concurrency_leaves_a_cpu_to_the_data_pipeline():
    assert concurrent_trials(TuneSettings(), 0.5, 2.0) == 2
    assert concurrent_trials(TuneSettings(), 1.0, 2.0) == 1
    assert concurrent_trials(TuneSettings(), 2.0, 8.0) == 3
    assert concurrent_trials(TuneSettings(max_concurrent_trials=1), 0.5, 2.0) == 1


# ---------------------------------------------------------------------------------------------------------
# best.json from trial results


def trial(trial_id, lr, losses, checkpoints=(), error=None):
    reports = [{"val_x0_mse": loss, "val_loss": 1.0 - loss, "step": 10 * (i + 1), "training_iteration": i + 1}
               for i, loss in enumerate(losses)]
    for index, path in checkpoints:
        reports[index]["checkpoint_path"] = str(path)
    return TrialRecord(trial_id=trial_id, sampled={"train.lr": lr}, reports=reports, error=error)


def test_summary_picks_the_best_report_and_its_surviving_checkpoint(tmp_path):
    kept = tmp_path / "b" / "step-30"
    kept.mkdir(parents=True)
    deleted = tmp_path / "b" / "step-20"  # Train kept only the last checkpoints: this one is gone
    trials = [
        trial("a", 1e-3, [0.5, 0.4, 0.45]),
        trial("b", 3e-3, [0.5, 0.2, 0.3], checkpoints=[(1, deleted), (2, kept)]),
        trial("c", 1e-2, [0.9]),
        trial("d", 1e-1, [float("nan")], error="RuntimeError: diverged"),
    ]
    base = {"train": {"lr": 1e-3, "max_steps": 30}, "_source": "smoke.yaml"}
    best = summarise(trials, settings=TuneSettings(), base_config=base, searched_keys=["train.lr"],
                     storage_root=str(tmp_path), experiment_uri=str(tmp_path / "x"))
    # The default metric is the reconstruction error, not val_loss (which would pick trial c here).
    assert (best["metric"], best["mode"], best["value"], best["step"]) == ("val_x0_mse", "min", 0.2, 20)
    assert best["config"] == {"sampled": {"train.lr": 3e-3}, "full": {"train": {"lr": 3e-3, "max_steps": 30}}}
    assert best["checkpoint"] == str(kept) and best["checkpoint_value"] == 0.3
    assert (best["trials"], best["trials_stopped_early"], best["trials_failed"]) == (4, 1, 1)
    assert [t["best"] for t in best["all_trials"][:3]] == [0.4, 0.2, 0.9]
    assert best["all_trials"][3]["best"] is None
    # c ended at step 10 of 30 without an error: cut short; d also reported once but failed.
    assert [t["stopped_early"] for t in best["all_trials"]] == [False, False, True, False]


def test_stopped_early_is_read_from_the_reports():
    """Tune marks a trial ASHA stopped `done` like a finished one: the summary tells them apart by their
    reports alone (fewer than max_t, ending before the trial's own train.max_steps, no error)."""
    base = {"train": {"max_steps": 40}}
    trials = [
        trial("full", 1e-3, [0.3, 0.2, 0.2, 0.1]),  # steps 10..40: ran its course
        trial("cut", 1e-3, [0.9, 0.8]),  # step 20 of 40, 2 reports < max_t 4
        trial("failed", 1e-3, [0.3, 0.2], error="OSError: store down"),
        TrialRecord("short", {"train.max_steps": 20}, trial("s", 0, [0.4, 0.3]).reports),  # its own end
        TrialRecord("long", {"train.max_steps": 60}, trial("l", 0, [0.5] * 5).reports),  # on past max_t
        trial("silent", 1e-3, []),
    ]
    best = summarise(trials, settings=TuneSettings(max_t=4), base_config=base, searched_keys=[],
                     storage_root="/tmp", experiment_uri="/tmp/x")
    assert best["trials_stopped_early"] == 1
    assert {t["trial_id"] for t in best["all_trials"] if t["stopped_early"]} == {"cut"}
    # Without train.max_steps in the config, fewer reports than max_t is what is left to go by.
    unknown = summarise(trials[:3], settings=TuneSettings(max_t=4), base_config={}, searched_keys=[],
                        storage_root="/tmp", experiment_uri="/tmp/x")
    assert unknown["trials_stopped_early"] == 1
    fifo = summarise(trials, settings=TuneSettings(max_t=4, scheduler="fifo"), base_config=base, searched_keys=[],
                     storage_root="/tmp", experiment_uri="/tmp/x")
    assert fifo["trials_stopped_early"] == 0  # no scheduler stops a trial


def test_summary_in_max_mode_and_without_any_metric():
    settings = TuneSettings(metric="val_pearson", mode="max")
    trials = [TrialRecord("a", {"x": 1}, [{"val_pearson": 0.3}]), TrialRecord("b", {"x": 2}, [{"val_pearson": 0.7}])]
    best = summarise(trials, settings=settings, base_config={}, searched_keys=["x"],
                     storage_root="/tmp", experiment_uri="/tmp/x")
    assert best["value"] == 0.7 and best["config"]["sampled"] == {"x": 2} and best["checkpoint"] is None
    with pytest.raises(RuntimeError, match="no trial reported a finite val_x0_mse .*a: ValueError: boom"):
        summarise([trial("a", 1e-3, [float("nan")], error="ValueError: boom")], settings=TuneSettings(),
                  base_config={}, searched_keys=[], storage_root="/tmp", experiment_uri="/x")


def test_cli_space_error_is_one_line_before_ray_starts(tmp_path, capsys):
    from p2es_dist.jobs.tune import main

    space = write(tmp_path, "model.dilation_dept: {choice: [2, 3]}")
    code = run_main(main, ["--space", str(space), "--config", str(SMOKE_CONFIG)], prog="p2es tune")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "space.yaml: model.dilation_dept: not a key of" in err[0]


def test_ray_compat_accepts_this_ray_and_names_what_another_lacks():
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    assert ray_compat.missing_ray_internals() == []  # the pinned Ray: the shim fits
    assert issubclass(ray_compat.RecordPlacementGroup, WorkerGroupCallback)
    assert ray_compat.missing_ray_internals("2.59.2") == ["Ray >= 2.60, < 2.61 (found 2.59.2)"]
    assert ray_compat.missing_ray_internals("2.61.0") == ["Ray >= 2.60, < 2.61 (found 2.61.0)"]
    assert ray_compat.missing_ray_internals("2.60.1") == []
    missing = ray_compat.missing_ray_internals(callback_base=type("Renamed", (), {}))
    assert missing == ["ray.train.v2._internal.execution.callback.WorkerGroupCallback.after_worker_group_start"]
    with pytest.raises(UserError, match=r"this Ray lacks: Ray >= 2\.60, < 2\.61 \(found 3\.0\.0\); ray\.train\.v2"):
        ray_compat.require_ray_internals("3.0.0", callback_base=object)  # object: the import failed
    with pytest.raises(UserError, match=r"get_worker_group_state\(\)\.placement_group_handle"):
        ray_compat.worker_group_placement_group_id(SimpleNamespace())
    group = SimpleNamespace(id=SimpleNamespace(hex=lambda: "ab12"))
    state = SimpleNamespace(placement_group_handle=SimpleNamespace(placement_group=group))
    assert ray_compat.worker_group_placement_group_id(SimpleNamespace(get_worker_group_state=lambda: state)) == "ab12"


def test_search_on_an_unsupported_ray_fails_before_any_trial(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.59.0")
    with pytest.raises(UserError, match=r"found 2\.59\.0"):
        run_search(SPACES / "smoke.yaml", load_config(SMOKE_CONFIG))  # no Ray runtime is needed to get here


# ---------------------------------------------------------------------------------------------------------
# end to end: ASHA over smoke training runs


@pytest.fixture(scope="module")
def smoke_shards(ray_local, tmp_path_factory):
    from p2es_dist.data.ingest import run_ingest

    output = str(tmp_path_factory.mktemp("tune_shards"))
    run_ingest("synthetic", None, output, {"ingest": {"shard_rows": 200}, "synthetic": {"n_windows": 600, "seed": 1}})
    return output


BAD_LR = 1.0  # Adam moves every weight by ~lr a step: after 10 steps the model is far worse than at 1e-3


@pytest.mark.ray
def test_smoke_search_end_to_end(smoke_shards, tmp_path, capsys):
    """`p2es tune` on the smoke space with one learning rate clearly too high: 4 trials one at a time (the
    smoke space's max_concurrent_trials: 1, each trial's worker holding half of ray_local's 2 CPUs, so Ray
    Data keeps the other), ASHA on val_x0_mse."""
    from ray.util.placement_group import placement_group_table

    from p2es_dist.jobs.tune import main

    smoke_space = (SPACES / "smoke.yaml").read_text()
    assert "train.lr: {grid: [1.0e-3, 3.0e-3]}" in smoke_space
    space_file = tmp_path / "smoke_bad_lr.yaml"
    space_file.write_text(smoke_space.replace("[1.0e-3, 3.0e-3]", f"[1.0e-3, {BAD_LR}]"))
    groups_before = set(placement_group_table())
    out = tmp_path / "out"
    code = main(["--space", str(space_file), "--config", str(SMOKE_CONFIG),
                 "--set", f"data.uris=[{smoke_shards}]", "--set", f"train.storage_path={tmp_path / 'runs'}",
                 "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best = json.loads((out / "best.json").read_text())
    assert printed["value"] == best["value"] and printed["trials"] == best["trials"]
    space = load_space(space_file)
    settings = space.settings
    assert best["metric"] == "val_x0_mse" and best["mode"] == "min" and best["trials"] == 4
    assert best["trials_failed"] == 0 and best["scheduler"]["name"] == "asha"

    # Tune's own record of the experiment, read back from storage: one result.json per trial folder.
    rows = {}
    for result_file in Path(best["experiment_path"]).glob("*/result.json"):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        rows[reports[0]["trial_id"]] = reports
    assert len(rows) == 4
    order = sorted(rows)  # trial ids count up in the order the trials ran (one at a time)
    values = {tid: [r["val_x0_mse"] for r in reports] for tid, reports in rows.items()}
    sampled = {tid: {k: reports[0]["config"][k] for k in space.searched_keys} for tid, reports in rows.items()}
    assert all(c["model.dilation_depth"] in (2, 3) for c in sampled.values())
    # The grid, twice, in order: a good trial first, then one with the bad learning rate, and again.
    assert [sampled[tid]["train.lr"] for tid in order] == [1e-3, BAD_LR, 1e-3, BAD_LR]

    # Best: the lowest val_x0_mse any trial reported, with that trial's sampled values.
    lowest = min((v, tid) for tid, vs in values.items() for v in vs)
    assert best["value"] == pytest.approx(lowest[0]) and best["trial_id"] == lowest[1]
    assert best["config"]["sampled"] == sampled[lowest[1]]
    merged = best["config"]["full"]
    assert merged["model"]["dilation_depth"] == sampled[lowest[1]]["model.dilation_depth"]
    assert merged["data"]["uris"] == [smoke_shards]

    # ASHA stops a trial whose first validation is worse than the median of those before it there. Which
    # trials that is depends on timing (a 1.0 learning rate was not always worse after 10 steps), so this
    # checks only that the summary's early stops are exactly what the results show: the trials that
    # reported fewer than max_t times (the counting rules: test_stopped_early_is_read_from_the_reports).
    full = len(values[order[0]])
    assert full == settings.max_t == 2  # smoke.yaml: max_steps 20, eval_every 10
    short = {tid for tid, vs in values.items() if len(vs) < settings.max_t}
    stopped = {t["trial_id"] for t in best["all_trials"] if t["stopped_early"]}
    assert stopped == short and best["trials_stopped_early"] == len(short), values
    assert all(len(values[tid]) == full for tid in values if tid not in stopped)

    # The checkpoint is the best trial's, from its Ray Train run in the experiment folder.
    checkpoint = Path(best["checkpoint"])
    assert checkpoint.is_dir() and checkpoint.parent.name == f"train-{best['trial_id']}"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] in (10, 20)
    assert any(math.isclose(best["checkpoint_value"], v) for v in values[best["trial_id"]])

    # No trial left a placement group holding CPUs (stopped trials' Train runs are killed mid-run).
    leftover = {pg: info["state"] for pg, info in placement_group_table().items() if pg not in groups_before}
    assert leftover and all(state == "REMOVED" for state in leftover.values()), leftover
