"""Calibration template as a model input, and no loss on leads given as input (issue 13).

Every PPG-conditioned model takes `template` / `template_mask` when built with `use_template: true`:
its output then depends on the template where the mask says the template is there, and on nothing of
it where the mask is all false; training hides it in a `template_dropout` fraction of windows. Built
without it (the default, and every config from before), the template keys are never read.
"""

from __future__ import annotations

import pytest
import torch

from p2es_dist.constants import LABELS, LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.models import build_model
from p2es_dist.models.base import hide_templates

II = LEAD_INDEX["II"]
# Small sections of each PPG-conditioned model, so that a few dozen CPU steps overfit a batch.
SECTIONS = {
    "p2es": dict(name="p2es", timesteps=20, hidden_channels=16, embed_dim=32, dilation_depth=2, cascades=1,
                 lead_features=2, ppg_channels=8, ppg_dilations=[1, 2, 4], cond_channels=8, affinity=False,
                 sample_steps=3),
    "unet": dict(name="unet", channels=[16, 32], groups=8, condition_dim=16),
    "li2021": dict(name="li2021", channels=16, c1_channels=8, fem_dilations=[2, 2], attention_hidden=8),
    "student": dict(name="student", channels=16, c1_channels=8, module_dilation=2, attention_hidden=4),
}
MODELS = list(SECTIONS)
LEADS_AS_INPUT = ["p2es", "unet", "li2021"]  # the student reads PPG (and a template) only


def build(name: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({**SECTIONS[name], **overrides})


def randomise_zero_init(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Output layers start at zero; give them weights so an untrained model's output shows its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.all(parameter == 0):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=g))
    return model


def batch_with_templates(batch_size: int = 4, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """PPG windows with lead II (and some others) recorded; each has a template of II and V5, but the
    last window's mask is all false (no calibration); the template is the recorded ECG, blurred."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(WINDOW) / 125.0
    beats = torch.sin(2 * torch.pi * 1.2 * t) ** 31  # a spiky pulse train, one "QRS" per beat
    ecg = beats * (0.5 + torch.rand(batch_size, N_LEADS, 1, generator=g))
    ecg_mask = torch.rand(batch_size, N_LEADS, generator=g) < 0.5
    ecg_mask[:, II] = True
    template_mask = torch.zeros(batch_size, N_LEADS, dtype=torch.bool)
    template_mask[:, [II, LEAD_INDEX["V5"]]] = True
    template_mask[-1] = False
    template = torch.nn.functional.avg_pool1d(ecg, 5, stride=1, padding=2)
    template = template / template.abs().amax(dim=(1, 2), keepdim=True)
    return {
        "ppg": torch.roll(beats, 70).repeat(batch_size, 1) + 0.05 * torch.randn(batch_size, WINDOW, generator=g),
        "ppg_mask": torch.ones(batch_size, dtype=torch.bool),
        "ecg": torch.where(ecg_mask[:, :, None], ecg, torch.zeros_like(ecg)),
        "ecg_mask": ecg_mask,
        "template": torch.where(template_mask[:, :, None], template, torch.zeros_like(template)),
        "template_mask": template_mask,
        "age": torch.full((batch_size,), 60.0),
        "sex": torch.zeros(batch_size, dtype=torch.int64),
        "labels": torch.zeros(batch_size, len(LABELS)),
        "subject": torch.arange(batch_size),
    }


def perturbed_template(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with every template sample moved, in every window (masked in or not)."""
    g = torch.Generator().manual_seed(7)
    return {**batch, "template": batch["template"] + torch.randn(batch["template"].shape, generator=g)}


@pytest.mark.parametrize("name", MODELS)
def test_output_depends_on_the_template_only_where_its_mask_is_set(name: str) -> None:
    model = randomise_zero_init(build(name, use_template=True)).eval()
    batch = batch_with_templates()
    before = model.generate(batch)
    after = model.generate(perturbed_template(batch))
    calibrated = batch["template_mask"].any(dim=1)
    assert not calibrated.all() and calibrated.any()
    for window in range(len(calibrated)):
        if calibrated[window]:
            assert (before[window] - after[window]).abs().max() > 1e-4, window
        else:  # all-false mask: zero-shot, whatever the template holds
            assert torch.equal(before[window], after[window]), window
    # A batch without the keys (old shards, 12-lead corpora) reads as no calibration anywhere.
    without = {k: v for k, v in batch.items() if k not in ("template", "template_mask")}
    zero_shot = {**batch, "template_mask": torch.zeros_like(batch["template_mask"])}
    torch.testing.assert_close(model.generate(without), model.generate(zero_shot), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_training_with_templates_overfits_a_batch(name: str) -> None:
    model = build(name, use_template=True, template_dropout=0.5).train()
    batch = batch_with_templates()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        loss, _ = model.loss(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (name, first, last)


@pytest.mark.parametrize("name", MODELS)
def test_without_use_template_the_keys_are_ignored(name: str) -> None:
    model = randomise_zero_init(build(name)).eval()
    assert not any("template" in key for key in model.state_dict())
    batch = batch_with_templates()
    without = {k: v for k, v in batch.items() if k not in ("template", "template_mask")}
    expected = model.generate(without)
    assert torch.equal(model.generate(batch), expected)
    assert torch.equal(model.generate(perturbed_template(batch)), expected)
    torch.manual_seed(3)
    loss, _ = model.loss(batch)
    torch.manual_seed(3)
    assert torch.equal(loss, model.loss(without)[0])


def test_template_dropout_hides_whole_windows() -> None:
    batch = batch_with_templates(batch_size=64)
    assert hide_templates(batch, 0.0) is batch
    assert not hide_templates(batch, 1.0)["template_mask"].any()
    torch.manual_seed(0)
    hidden = hide_templates(batch, 0.5)["template_mask"]
    kept = hidden.any(dim=1)
    assert torch.equal(hidden[kept], batch["template_mask"][kept])  # a window keeps all its leads or none
    assert 15 < int(kept.sum()) < 50
    no_keys = {k: v for k, v in batch.items() if k not in ("template", "template_mask")}
    assert hide_templates(no_keys, 0.5) is no_keys


# --- leads given as input are no target ------------------------------------------------------------
def only_lead_given(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Window 0 records lead II only, and gets it as input."""
    ecg_mask = batch["ecg_mask"].clone()
    ecg_mask[0] = False
    ecg_mask[0, II] = True
    cond_leads = torch.zeros_like(ecg_mask)
    cond_leads[0, II] = True
    return {**batch, "ecg_mask": ecg_mask, "cond_leads": cond_leads}


@pytest.mark.parametrize("name", LEADS_AS_INPUT)
def test_a_window_whose_only_recorded_lead_is_given_adds_no_loss(name: str) -> None:
    model = randomise_zero_init(build(name)).train()
    batch = only_lead_given(batch_with_templates())
    alone = {key: value[:1] for key, value in batch.items()}
    _, parts = model.loss(alone)
    main = "x0_mse" if name == "p2es" else "mse"
    assert parts[main].item() == 0.0
    if name == "p2es":
        assert parts["diffusion"].item() == 0.0
        return
    # Regressors are deterministic: window 0 leaves the mean over the others' pairs as it is.
    rest = {key: value[1:] for key, value in batch.items()}
    torch.testing.assert_close(model.loss(batch)[1]["mse"], model.loss(rest)[1]["mse"])
    # ...while a lead the window records but is not given does count.
    batch["cond_leads"][0, II] = False
    assert model.loss({key: value[:1] for key, value in batch.items()})[1][main].item() > 0


def test_student_takes_the_template_beside_ppg_but_does_not_export_it_yet(tmp_path) -> None:
    from p2es_dist.export.onnx_io import export_onnx

    model = randomise_zero_init(build("student", use_template=True)).eval()
    batch = batch_with_templates()
    masked = torch.where(batch["template_mask"][:, :, None], batch["template"], torch.zeros_like(batch["template"]))
    # The mask-free path (what an app would call): absent leads are the all-zero ones.
    torch.testing.assert_close(model.forward_ppg(batch["ppg"], masked), model.generate(batch))
    with pytest.raises(NotImplementedError, match="template"):
        export_onnx(model, tmp_path / "model.onnx")


@pytest.mark.parametrize("section", [
    {"name": "p2es", "timesteps": 20, "hidden_channels": 16, "embed_dim": 32, "dilation_depth": 2, "cascades": 1,
     "affinity": False, "sample_steps": 4, "use_template": True},
    {"name": "unet", "channels": [8, 16], "use_template": True},
    {"name": "li2021", "use_template": True},
    {"name": "student", "use_template": True},
])
def test_untrained_residual_model_answers_with_the_template(section):
    """`template_residual`: the output head starts at zero, so an untrained model returns the template on
    the leads it has (P2Es through lead physics: lead II exactly, as the template has only II)."""
    from p2es_dist.constants import LEAD_INDEX
    from p2es_dist.models import build_model
    from p2es_dist.models.base import GenerationOptions

    torch.manual_seed(0)
    model = build_model(section).eval()
    batch = _residual_batch()
    out = model.generate(batch, GenerationOptions(seed=0))
    ii = LEAD_INDEX["II"]
    torch.testing.assert_close(out[:, ii], batch["template"][:, ii], atol=1e-5, rtol=0)
    off = dict(section, template_residual=False)
    torch.manual_seed(0)
    plain = build_model(off).eval().generate(batch, GenerationOptions(seed=0))
    assert not torch.allclose(plain[:, ii], batch["template"][:, ii], atol=1e-2)


def _residual_batch(size: int = 2):
    from p2es_dist.constants import LABELS, LEAD_INDEX, N_LEADS, WINDOW

    generator = torch.Generator().manual_seed(1)
    template = torch.zeros(size, N_LEADS, WINDOW)
    template[:, LEAD_INDEX["II"]] = torch.randn(size, WINDOW, generator=generator)
    mask = torch.zeros(size, N_LEADS, dtype=torch.bool)
    mask[:, LEAD_INDEX["II"]] = True
    return {"ppg": torch.randn(size, WINDOW, generator=generator), "ppg_mask": torch.ones(size, dtype=torch.bool),
            "ecg": torch.zeros(size, N_LEADS, WINDOW), "ecg_mask": torch.zeros(size, N_LEADS, dtype=torch.bool),
            "age": torch.full((size,), 50.0), "sex": torch.zeros(size, dtype=torch.int64),
            "labels": torch.zeros(size, len(LABELS)), "subject": torch.zeros(size, dtype=torch.int64),
            "template": template, "template_mask": mask}


def test_population_template_fills_windows_without_calibration():
    """Zero-shot windows get the training population's beat at their upstrokes minus its PAT: the same
    placement as data.timing (numpy) renders, and an untrained residual P2Es answers with it."""
    import numpy as np

    from p2es_dist.constants import LEAD_INDEX, WINDOW
    from p2es_dist.data import timing
    from p2es_dist.models.base import GenerationOptions, PopulationTemplate

    beat = np.sin(np.linspace(0, 3 * np.pi, timing.BEAT_SAMPLES)).astype(np.float32)
    population = {"fs": 125, "pat_s": 0.56, "beat": {"II": beat.tolist()}}
    upstrokes = np.array([[-40, 60, 170, 290, 400, 520, 640, 760, 880, 1000, 1100]
                          + [timing.UPSTROKE_PAD] * 5], dtype=np.int32)
    expected = timing.template_from_upstrokes(beat[None], upstrokes[0][upstrokes[0] < timing.UPSTROKE_PAD], 0.56,
                                              WINDOW)[0]
    expected = expected / np.abs(expected).max()
    rendered = PopulationTemplate(population).render(torch.from_numpy(upstrokes), WINDOW)
    np.testing.assert_allclose(rendered[0, LEAD_INDEX["II"]].numpy(), expected, atol=1e-6)

    batch = _residual_batch(size=2)
    batch["template_mask"][0] = False  # window 0: no calibration -> population; window 1 keeps its own
    batch["upstrokes"] = torch.from_numpy(np.repeat(upstrokes, 2, axis=0))
    filled = PopulationTemplate(population).fill(batch)
    assert filled["template_calibrated"].tolist() == [False, True]
    torch.testing.assert_close(filled["template"][1], batch["template"][1])
    torch.testing.assert_close(filled["template"][0, LEAD_INDEX["II"]], rendered[0, LEAD_INDEX["II"]])

    section = {"name": "p2es", "timesteps": 20, "hidden_channels": 16, "embed_dim": 32, "dilation_depth": 2,
               "cascades": 1, "affinity": False, "sample_steps": 4, "use_template": True, "population": population}
    torch.manual_seed(0)
    out = build_model(section).eval().generate(batch, GenerationOptions(seed=0))
    torch.testing.assert_close(out[0, LEAD_INDEX["II"]], rendered[0, LEAD_INDEX["II"]], atol=1e-5, rtol=0)


def test_hedged_beat_is_the_matched_guess_under_pat_spread():
    """Blurring the population beat by the population's PAT spread raises the mean Pearson against ECGs
    whose QRS sit at upstroke - (a PAT drawn from that spread), and shrinks rRMSE below the sharp beat's."""
    import numpy as np

    from p2es_dist.constants import WINDOW
    from p2es_dist.data import timing
    from p2es_dist.data.calibration import IQR_PER_SIGMA, hedged_beat
    from p2es_dist.evaluate.metrics import pointwise_errors

    t = np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE
    beat = (np.exp(-0.5 * (t / 1.5) ** 2) - 0.2 * np.exp(-0.5 * ((t - 30) / 6.0) ** 2)).astype(np.float32)[None]
    spread_s = 0.064
    np.testing.assert_allclose(hedged_beat(beat, 0.0), beat / np.abs(beat).max())
    assert hedged_beat(beat, spread_s).max() < hedged_beat(beat, spread_s / 4).max() < 1.0

    rng = np.random.default_rng(0)
    upstrokes = np.arange(60, WINDOW + 70, 110)
    truth, sharp, hedged = [], [], []
    for _ in range(200):
        pat = 0.56 + rng.normal(0, spread_s / IQR_PER_SIGMA)
        truth.append(timing.template_from_upstrokes(beat, upstrokes, pat, WINDOW)[0])
        sharp.append(timing.template_from_upstrokes(beat, upstrokes, 0.56, WINDOW)[0])
        hedged.append(timing.template_from_upstrokes(hedged_beat(beat, spread_s), upstrokes, 0.56, WINDOW)[0])
    mask = np.ones((200, 1), bool)
    scores = {name: pointwise_errors(np.array(truth)[:, None], np.array(guess)[:, None], mask)
              for name, guess in (("sharp", sharp), ("hedged", hedged))}
    assert np.mean(scores["hedged"]["pearson"]) > np.mean(scores["sharp"]["pearson"]) + 0.1
    assert np.mean(scores["hedged"]["rrmse"]) < 1.0 < np.mean(scores["sharp"]["rrmse"])


def test_population_template_per_source():
    """Each window gets its own source's population (its PAT), a source never seen gets the pooled one."""
    import numpy as np

    from p2es_dist.constants import LEAD_INDEX, WINDOW
    from p2es_dist.data import timing
    from p2es_dist.data.splits import subject_hash
    from p2es_dist.models.base import PopulationTemplate

    t = np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE
    beat = np.exp(-0.5 * (t / 1.5) ** 2).tolist()
    population = {"fs": 125, "pat_s": 0.8, "beat": {"II": beat},
                  "by_source": {"bidmc": {"fs": 125, "pat_s": 0.56, "beat": {"II": beat}},
                                "cinc2015": {"fs": 125, "pat_s": 1.1, "beat": {"II": beat}}}}
    upstrokes = torch.tensor([[500] + [timing.UPSTROKE_PAD] * 3] * 4, dtype=torch.int32)
    batch = {"ppg": torch.zeros(4, 1, WINDOW), "ppg_mask": torch.ones(4, dtype=torch.bool),
             "ecg_mask": torch.ones(4, 12, dtype=torch.bool), "upstrokes": upstrokes,
             "source": torch.tensor([subject_hash(s) for s in ("cinc2015", "bidmc", "elsewhere", "bidmc")])}
    filled = PopulationTemplate(population).fill(batch)
    peaks = filled["template"][:, LEAD_INDEX["II"]].argmax(dim=1).tolist()
    assert peaks == [500 - round(1.1 * 125), 500 - round(0.56 * 125), 500 - round(0.8 * 125), 500 - 70]
    assert filled["template_mask"][:, LEAD_INDEX["II"]].all()
    no_source = {key: value for key, value in batch.items() if key != "source"}
    assert PopulationTemplate(population).fill(no_source)["template"][:, LEAD_INDEX["II"]].argmax(dim=1).tolist() \
        == [400] * 4


def test_verdict_holds_the_model_against_the_strongest_template():
    from p2es_dist.evaluate.templates import lead_ii_verdict

    def section(pearson: float) -> dict:
        return {"spaces": {"window": {"leads": {"II": {"pearson": pearson}}}}}

    sections = {"p2es": section(0.30), "template_population": section(0.20),
                "template_population_hedged": section(0.35)}
    verdict = lead_ii_verdict(sections, "p2es", "zero-shot")
    assert verdict["template"] == "template_population_hedged" and not verdict["beats_template"]


def test_population_jitter_shifts_only_population_windows_by_their_spread():
    import numpy as np

    from p2es_dist.constants import WINDOW
    from p2es_dist.data import timing
    from p2es_dist.data.calibration import IQR_PER_SIGMA
    from p2es_dist.models.base import PopulationTemplate

    beat = np.exp(-0.5 * ((np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE) / 1.5) ** 2).tolist()
    template = PopulationTemplate({"fs": 125, "pat_s": 0.56, "pat_iqr_s": 0.064, "beat": {"II": beat}})
    n = 4000
    ecg = torch.zeros(n, 12, WINDOW)
    ecg[:, 1, 500] = 1.0
    calibrated = torch.arange(n) % 2 == 0
    batch = {"ecg": ecg, "ecg_mask": torch.ones(n, 12, dtype=torch.bool), "template_calibrated": calibrated,
             "template_mask": torch.ones(n, 12, dtype=torch.bool)}
    torch.manual_seed(0)
    peaks = template.jitter_targets(batch)[:, 1].argmax(dim=1) - 500
    assert (peaks[calibrated] == 0).all()
    expected_sigma = 0.064 / IQR_PER_SIGMA * 125
    assert float(peaks[~calibrated].float().std()) == pytest.approx(expected_sigma, rel=0.1)
    assert abs(float(peaks[~calibrated].float().mean())) < 0.3


@pytest.mark.parametrize("name", ["p2es", "unet", "student"])
def test_generate_with_a_calibration_profile_uses_the_patients_template(name):
    """`generate(batch, GenerationOptions(calibration=profile))`: the library form of `translate --calibration`.
    An untrained residual P2Es answers with exactly that template; every template model's output changes."""
    import numpy as np

    from p2es_dist.constants import LEAD_INDEX, WINDOW
    from p2es_dist.data import timing
    from p2es_dist.data.calibration import CalibrationProfile
    from p2es_dist.models.base import GenerationOptions, with_calibration

    t = np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE
    beat = np.exp(-0.5 * (t / 1.5) ** 2).astype(np.float32)
    profile = CalibrationProfile(pat_s=0.3, pat_iqr_s=0.01, n_beats=60, beat={"II": 2.0 * beat}, seconds=60.0)
    population = {"fs": 125, "pat_s": 0.7, "beat": {"II": beat.tolist()}}
    batch = _residual_batch(size=2)
    batch["template_mask"][:] = False
    upstrokes = np.array([[100, 210, 330, 450, 560, 680, 800, 910, 1020] + [timing.UPSTROKE_PAD] * 3] * 2, np.int32)
    batch["upstrokes"] = torch.from_numpy(upstrokes)

    calibrated = with_calibration(batch, GenerationOptions(calibration=profile))
    ii = LEAD_INDEX["II"]
    peaks = calibrated["template"][0, ii].numpy()
    assert calibrated["template_mask"][:, ii].all() and abs(peaks.max() - 1.0) < 1e-6
    expected = [u - round(0.3 * 125) for u in upstrokes[0] if 0 <= u - round(0.3 * 125) < WINDOW]
    assert sorted(np.flatnonzero(peaks > 0.999).tolist()) == expected
    with pytest.raises(ValueError, match="upstrokes"):
        with_calibration({k: v for k, v in batch.items() if k != "upstrokes"}, GenerationOptions(calibration=profile))

    sections = {"p2es": {"name": "p2es", "timesteps": 20, "hidden_channels": 16, "embed_dim": 32, "dilation_depth": 2,
                         "cascades": 1, "affinity": False, "sample_steps": 2},
                "unet": {"name": "unet", "channels": [8, 16]}, "student": {"name": "student"}}
    torch.manual_seed(0)
    model = build_model({**sections[name], "use_template": True, "population": population}).eval()
    if name != "p2es":  # zero-initialised heads: give the template path some weight
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    with_profile = model.generate(batch, GenerationOptions(seed=0, calibration=profile))
    without = model.generate(batch, GenerationOptions(seed=0))
    assert not torch.allclose(with_profile, without)
    if name == "p2es":
        torch.testing.assert_close(with_profile[:, ii], calibrated["template"][:, ii], atol=1e-5, rtol=0)


def test_translate_population_picks_the_sources_zero_shot_template():
    """`p2es translate --population bidmc`: without calibration, the model places that source's beat at that
    source's PAT; an untrained residual P2Es therefore answers with a different record per source."""
    import numpy as np

    from p2es_dist.data import timing
    from p2es_dist.errors import UserError
    from p2es_dist.models.checkpoint import LoadedModel
    from p2es_dist.translate.io import PPGSignal
    from p2es_dist.translate.run import TranslateConfig, population_sources, translate_signal

    beat = np.exp(-0.5 * ((np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE) / 1.5) ** 2).tolist()
    one = {"fs": 125, "pat_iqr_s": 0.0, "beat": {"II": beat}}
    population = {**one, "pat_s": 0.8,
                  "by_source": {"bidmc": {**one, "pat_s": 0.56}, "cinc2015": {**one, "pat_s": 1.1}}}
    section = {"name": "p2es", "timesteps": 20, "hidden_channels": 16, "embed_dim": 32, "dilation_depth": 2,
               "cascades": 1, "affinity": False, "sample_steps": 1, "use_template": True, "population": population}
    torch.manual_seed(0)
    loaded = LoadedModel(model=build_model(section).eval(), model_config=section, uri="memory", kind="checkpoint",
                         digest="")
    assert population_sources(loaded.model) == ["bidmc", "cinc2015"]
    t = np.arange(0, 40, 1 / 125)
    ppg = np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 2.4 * t + 1.0)
    signal = PPGSignal(values=ppg, fs=125.0, channel="PLETH", source="synthetic")
    ii = {name: translate_signal(loaded, signal, config=TranslateConfig(population=name))[0][1]
          for name in ("bidmc", "cinc2015")}
    # The same beats, placed (1.1 - 0.56) s apart: the records match once shifted by that lag.
    lag = round((1.1 - 0.56) * 125)
    middle = slice(1000, 4000)
    shifted = ii["bidmc"][middle.start + lag:middle.stop + lag]
    assert np.corrcoef(ii["cinc2015"][middle], shifted)[0, 1] > 0.95
    assert np.corrcoef(ii["cinc2015"][middle], ii["bidmc"][middle])[0, 1] < 0.9

    from p2es_dist.translate.run import check_population

    with pytest.raises(UserError, match="--population mimic: the model has a zero-shot population for bidmc, cinc"):
        check_population(loaded.model, "mimic")
