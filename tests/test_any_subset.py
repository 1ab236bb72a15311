"""One model, any subset of leads -> 12 leads: the per-window subset draw, training and generating with
per-window condition masks (P2Es and the U-Net), lead physics at the output, `p2es translate --condition`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import require_data

from p2es_dist.config import load_config
from p2es_dist.constants import LEAD_INDEX, LEADS, N_LEADS, WINDOW
from p2es_dist.errors import ConfigError, UserError
from p2es_dist.models.base import GenerationOptions
from p2es_dist.models.common import regression_target_mask
from p2es_dist.models.leads import einthoven_residual, impose_given_leads
from p2es_dist.models.p2es import P2Es, P2EsConfig
from p2es_dist.models.registry import build_model

SUBSETS = [["II"], ["I", "II"], ["II", "V1", "V5"], "single"]
TINY_P2ES = dict(timesteps=20, hidden_channels=16, embed_dim=32, dilation_depth=2, cascades=1, lead_features=2,
                 ppg_channels=8, cond_channels=8, affinity=False, sample_steps=4)
TINY_UNET = {"name": "unet", "channels": [8, 16, 16], "groups": 4, "condition_dim": 16}
# Per window of `batch_with_masks`: which leads are given (the last window gets none).
GIVEN = [("I", "II"), ("II", "III"), ("II", "V1", "V5"), ("aVR", "aVL"), ("V2",), ()]


def draw(window_ids, recorded, subsets=SUBSETS, seed=0):
    from p2es_dist.data.loader import draw_condition_leads, parse_condition_subsets

    return draw_condition_leads(list(window_ids), np.asarray(recorded), parse_condition_subsets(subsets), seed)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# --- the draw -------------------------------------------------------------------------------------
def test_draw_is_per_window_whatever_the_blocks() -> None:
    rng = np.random.default_rng(0)
    ids = [f"rec{i // 7}:{i % 7}" for i in range(200)]
    recorded = rng.random((200, N_LEADS)) < 0.7
    whole = draw(ids, recorded)
    order = rng.permutation(200)
    # The same windows in another order, cut into uneven blocks as Ray Data might.
    pieces = [draw([ids[i] for i in block], recorded[block]) for block in np.split(order, [3, 50, 51, 140])]
    again = np.empty_like(whole)
    again[order] = np.concatenate(pieces)
    assert np.array_equal(whole, again)
    assert np.array_equal(whole, draw(ids, recorded))  # and the same on every call (validation)
    assert not np.array_equal(whole, draw(ids, recorded, seed=1))  # the seed matters


def test_draw_covers_the_configured_subsets_uniformly() -> None:
    ids = [f"w{i}" for i in range(2000)]
    chosen = draw(ids, np.ones((2000, N_LEADS), dtype=bool))
    fixed = {tuple(np.flatnonzero(row)) for row in chosen}
    as_index = [tuple(LEAD_INDEX[lead] for lead in subset) for subset in SUBSETS[:3]]
    counts = {subset: sum(tuple(np.flatnonzero(row)) == subset for row in chosen) for subset in as_index}
    singles = chosen.sum(axis=1) == 1
    single_draws = singles.sum() - counts[as_index[0]]  # "single" may land on II as well
    for subset in as_index[1:]:
        assert 0.2 < counts[subset] / 2000 < 0.3, (subset, counts)
    assert 0.2 < single_draws / 2000 < 0.3 and 0.25 < counts[as_index[0]] / 2000 < 0.35
    # "single" reaches every lead, and nothing outside the configured forms is drawn.
    assert set(np.flatnonzero(chosen[singles].any(axis=0))) == set(range(N_LEADS))
    assert fixed <= set(as_index) | {(i,) for i in range(N_LEADS)}


def test_draw_never_gives_unrecorded_leads_nor_all_of_them() -> None:
    rng = np.random.default_rng(3)
    recorded = rng.random((500, N_LEADS)) < rng.random((500, 1))
    chosen = draw([f"w{i}" for i in range(500)], recorded, SUBSETS + ["limb_pair"])
    assert not (chosen & ~recorded).any()
    count = recorded.sum(axis=1)
    assert (chosen.sum(axis=1)[count >= 2] < count[count >= 2]).all()
    assert not chosen[count <= 1].any()  # one recorded lead (or none) is a target, never an input
    assert chosen[count >= 2].any(axis=1).all()  # "single" always fits two recorded leads


def test_draw_falls_back_to_the_recorded_part_of_a_subset() -> None:
    recorded = np.zeros((3, N_LEADS), dtype=bool)
    recorded[0, [LEAD_INDEX["II"], LEAD_INDEX["V1"]]] = True  # [I, II] does not fit: II is its recorded part
    recorded[1, [LEAD_INDEX["I"], LEAD_INDEX["II"]]] = True  # [I, II] would leave no target: one lead of it
    recorded[2, LEAD_INDEX["V3"]] = True  # one lead: nothing to give
    chosen = draw(["a", "b", "c"], recorded, [["I", "II"]])
    assert [LEADS[i] for i in np.flatnonzero(chosen[0])] == ["II"]
    assert chosen[1].sum() == 1 and (chosen[1] <= recorded[1]).all()
    assert not chosen[2].any()


def test_convert_block_draws_by_window_id() -> None:
    from p2es_dist.data.loader import convert_block, parse_condition_subsets
    from p2es_dist.data.schema import build_table

    n = 12
    rng = np.random.default_rng(0)
    table = build_table(source="t", record=["r"] * n, subject_id=["s"] * n, split=["train"] * n,
                        start=np.arange(n) * WINDOW, ecg=rng.standard_normal((n, N_LEADS, WINDOW)),
                        ecg_mask=np.ones((n, N_LEADS), dtype=bool), ppg=None, age=np.full(n, 50.0),
                        sex=np.ones(n), labels=[[]] * n, quality=np.ones(n))
    subsets = parse_condition_subsets(SUBSETS)
    whole = convert_block(table, condition_subsets=subsets, seed=4)["cond_leads"]
    halves = np.concatenate([convert_block(table.slice(0, 5), condition_subsets=subsets, seed=4)["cond_leads"],
                             convert_block(table.slice(5), condition_subsets=subsets, seed=4)["cond_leads"]])
    assert whole.shape == (n, N_LEADS) and np.array_equal(whole, halves) and whole.any(axis=1).all()
    ids = table.column("window_id").to_pylist()
    assert np.array_equal(whole, draw(ids, np.ones((n, N_LEADS), dtype=bool), seed=4))


@pytest.mark.parametrize(("data", "message"), [
    ({"condition_subsets": [["II", "V7"]]}, r"condition_subsets\[0\]: expected a list of leads"),
    ({"condition_subsets": ["pairs"]}, r"condition_subsets\[0\]"),
    ({"condition_subsets": [list(LEADS)]}, "all 12 leads"),
    ({"condition_subsets": [["II"]], "condition_leads": ["II"]}, "set one"),
])
def test_bad_condition_subsets_are_config_errors(data, message) -> None:
    from p2es_dist.config import from_dict
    from p2es_dist.data.loader import LoaderConfig

    with pytest.raises(ConfigError, match=message):
        from_dict(LoaderConfig, {"uris": ["x"], **data}, where="data")


@pytest.mark.parametrize("name", ["p2es_anysubset", "unet_anysubset"])
def test_anysubset_configs_parse(name) -> None:
    from p2es_dist.data.loader import parse_condition_subsets
    from p2es_dist.train.config import parse_job_config

    job = parse_job_config(load_config(name))
    specs = parse_condition_subsets(job.data.condition_subsets)
    assert ("II",) in specs and ("I", "II") in specs and ("II", "V1", "V5") in specs and "single" in specs
    assert not job.data.condition_leads and job.data.conditions


# --- models with per-window masks -----------------------------------------------------------------
def batch_with_masks(seed: int = 0, batch_size: int = len(GIVEN)) -> dict[str, torch.Tensor]:
    """12-lead windows that obey lead physics, PPG in half of them, a different given subset in each."""
    from p2es_dist.models.leads import expand_leads

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(WINDOW) / 125.0
    independent = torch.stack([torch.sin(2 * torch.pi * (1 + 0.3 * k) * t + k) for k in range(8)])
    independent = 0.5 * independent[None] * (1 + 0.2 * torch.randn(batch_size, 8, 1, generator=g))
    given = torch.zeros(batch_size, N_LEADS, dtype=torch.bool)
    for row, leads in enumerate(GIVEN[:batch_size]):
        given[row, [LEAD_INDEX[lead] for lead in leads]] = True
    return {"ppg": torch.sin(2 * torch.pi * 1.2 * t).repeat(batch_size, 1),
            "ppg_mask": torch.arange(batch_size) % 2 == 0, "ecg": expand_leads(independent),
            "ecg_mask": torch.ones(batch_size, N_LEADS, dtype=torch.bool), "cond_leads": given,
            "age": torch.full((batch_size,), 60.0), "sex": torch.zeros(batch_size, dtype=torch.int64),
            "labels": torch.zeros(batch_size, 13), "subject": torch.arange(batch_size)}


def tiny(kind: str):
    torch.manual_seed(0)
    model = P2Es(config=P2EsConfig(**TINY_P2ES)) if kind == "p2es" else build_model(TINY_UNET)
    with torch.no_grad():  # zero-initialised heads: give every output a say
        for parameter in model.parameters():
            if torch.all(parameter == 0):
                parameter.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("kind", ["p2es", "unet"])
def test_training_on_per_window_masks_decreases_the_loss(kind: str) -> None:
    model = tiny(kind)
    batch = batch_with_masks()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = torch.full((len(GIVEN),), 8)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same timesteps and noise each step: an objective that can only go down
        return model.loss(batch, t=t)[0] if kind == "p2es" else model.loss(batch)[0]

    losses = []
    for _ in range(12):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0] and max(losses[6:]) < losses[0], losses


def test_given_leads_are_no_target_per_window() -> None:
    batch = batch_with_masks()
    mask = regression_target_mask(batch, with_leads=True)
    expected = batch["ecg_mask"] & ~batch["cond_leads"]
    expected[5] = False  # no PPG and no lead given: a regressor has nothing to map from
    assert torch.equal(mask, expected)
    # Each window's loss mask follows its own subset: the P2Es loss ignores a given lead's target.
    model = tiny("p2es")
    changed = {**batch, "ecg": batch["ecg"].clone()}
    torch.manual_seed(0)
    first = model.loss(batch)[0]
    changed["ecg"][5, LEAD_INDEX["V3"]] += 1.0  # window 5 is given nothing: V3 is its target
    torch.manual_seed(0)
    assert not torch.equal(first, model.loss(changed)[0])


def lead(out: torch.Tensor, row: int, name: str) -> torch.Tensor:
    return out[..., row, LEAD_INDEX[name], :]


@pytest.mark.parametrize("kind", ["p2es", "unet"])
def test_generate_keeps_given_leads_and_derives_the_limb_leads(kind: str) -> None:
    model = tiny(kind).eval()
    batch = batch_with_masks()
    ecg = batch["ecg"]
    outputs = [model.generate(batch, GenerationOptions(seed=0))]
    if kind == "p2es":  # several draws: each one obeys the same rules
        samples = model.generate(batch, GenerationOptions(seed=0, n_samples=2), return_samples=True)
        assert samples.shape == (2, len(GIVEN), N_LEADS, WINDOW)
        outputs += [samples[0], samples[1]]
    for out in outputs:
        given = batch["cond_leads"]
        assert torch.equal(out[given], ecg[given])  # the input comes back exactly
        # I + II given: the other four limb leads by Einthoven/Goldberger, bit for bit.
        i, ii = lead(out, 0, "I"), lead(out, 0, "II")
        assert torch.equal(lead(out, 0, "III"), ii - i)
        assert torch.equal(lead(out, 0, "aVR"), -(i + ii) / 2)
        assert torch.equal(lead(out, 0, "aVL"), i - ii / 2)
        assert torch.equal(lead(out, 0, "aVF"), ii - i / 2)
        # II + III given: I = II - III, and the augmented leads from that I and II.
        i, ii, iii = lead(out, 1, "I"), lead(out, 1, "II"), lead(out, 1, "III")
        assert torch.equal(i, ecg[1, LEAD_INDEX["II"]] - ecg[1, LEAD_INDEX["III"]])
        assert torch.equal(lead(out, 1, "aVR"), -(i + ii) / 2)
        assert torch.equal(lead(out, 1, "aVF"), ii - i / 2)
        assert (iii - (ii - i)).abs().max() < 1e-6  # III is the recorded one; II - I rounds once more
        # aVR + aVL (another pair): I and II solved from them; the windows obey physics, so they come back.
        torch.testing.assert_close(lead(out, 3, "I"), ecg[3, LEAD_INDEX["I"]], atol=1e-5, rtol=0)
        torch.testing.assert_close(lead(out, 3, "aVF"), ecg[3, LEAD_INDEX["aVF"]], atol=1e-5, rtol=0)
        # One limb lead (II, window 2): the limb leads still obey physics through it.
        assert einthoven_residual(out[2]).abs().max() < 1e-6
        # Only V2 (window 4) or nothing (window 5): the limb leads are the network's own.
        assert torch.isfinite(out).all()


def test_impose_given_leads_leaves_ungiven_windows_alone() -> None:
    g = torch.Generator().manual_seed(0)
    generated, ecg = torch.randn(3, N_LEADS, 64, generator=g), torch.randn(3, N_LEADS, 64, generator=g)
    given = torch.zeros(3, N_LEADS, dtype=torch.bool)
    given[1, LEAD_INDEX["V4"]] = True
    out = impose_given_leads(generated, ecg, given)
    assert torch.equal(out[0], generated[0]) and torch.equal(out[2], generated[2])
    assert torch.equal(out[1, LEAD_INDEX["V4"]], ecg[1, LEAD_INDEX["V4"]])
    others = [k for k in range(N_LEADS) if k != LEAD_INDEX["V4"]]
    assert torch.equal(out[1, others], generated[1, others])


def test_p2es_sampling_keeps_the_leads_the_given_ones_fix() -> None:
    model = tiny("p2es").eval()
    batch = batch_with_masks()
    fixed, values = model.known_state(batch, batch["cond_leads"])
    # State rows: I, II, V1..V6. I + II (window 0) and II + III (window 1) fix I and II; window 2 fixes II, V1, V5.
    assert fixed[0, :2].all() and fixed[1, :2].all() and not fixed[0, 2:].any()
    assert fixed[2].tolist() == [False, True, True, False, False, False, True, False]
    assert torch.equal(values[1, 0], batch["ecg"][1, LEAD_INDEX["II"]] - batch["ecg"][1, LEAD_INDEX["III"]])


# --- translate ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    from p2es_dist.models.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("unet") / "ckpt"
    save_checkpoint(tiny("unet"), TINY_UNET, folder)
    return folder


def test_translate_condition_writes_twelve_leads_with_the_given_ones(unet_checkpoint, tmp_path, capsys) -> None:
    import wfdb

    from p2es_dist.cli import main as cli_main
    from p2es_dist.data.preprocess import PreprocessConfig, condition_signal

    record = require_data("ptbxl", "records500", "00000", "00001_hr.hea").with_suffix("")
    out = tmp_path / "ecg12"
    assert cli_main(["translate", "--model", str(unet_checkpoint), "--input", str(record),
                     "--condition", "I,II", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["condition"] == ["I", "II"] and summary["limb_leads_derived_from"] == ["I", "II"]
    written = wfdb.rdrecord(str(out))
    assert written.sig_name == list(LEADS) and written.fs == 125 and written.sig_len == 1250
    raw = wfdb.rdrecord(str(record))
    config = PreprocessConfig()
    for name in ("I", "II"):
        expected, valid = condition_signal(raw.p_signal[:, raw.sig_name.index(name)], 500.0, config.ecg_band_hz, config)
        assert valid.all()
        got = written.p_signal[:, LEADS.index(name)]
        step = 1.0 / written.adc_gain[LEADS.index(name)]  # one ADC step of the written record
        np.testing.assert_allclose(got, expected, rtol=0, atol=step)
    signal = {name: written.p_signal[:, LEADS.index(name)] for name in LEADS}
    steps = max(1.0 / g for g in written.adc_gain)
    np.testing.assert_allclose(signal["III"], signal["II"] - signal["I"], rtol=0, atol=3 * steps)
    np.testing.assert_allclose(signal["aVR"], -(signal["I"] + signal["II"]) / 2, rtol=0, atol=3 * steps)


def test_translate_condition_errors(unet_checkpoint, tmp_path) -> None:
    from p2es_dist.models.checkpoint import save_checkpoint
    from p2es_dist.translate.from_leads import translate_leads_file

    record = require_data("ludb", "data", "1.hea").with_suffix("")
    with pytest.raises(UserError, match="no usable lead V7|unknown lead 'V7'"):
        translate_leads_file(model=str(unet_checkpoint), input=str(record), out=str(tmp_path / "o"), condition=["V7"])
    only_ii = require_data("wfdb_samples", "3000003_0003.hea").with_suffix("")
    with pytest.raises(UserError, match=r"has no usable lead I \(its leads: II\)"):
        translate_leads_file(model=str(unet_checkpoint), input=str(only_ii), out=str(tmp_path / "o"),
                             condition=["I", "II"])
    ppg_only = tmp_path / "dct"
    section = {"name": "dct"}
    save_checkpoint(build_model(section), section, ppg_only)
    with pytest.raises(UserError, match="does not take ECG leads as input"):
        translate_leads_file(model=str(ppg_only), input=str(record), out=str(tmp_path / "o"), condition=["II"])
