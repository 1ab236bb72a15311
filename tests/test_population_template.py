"""Zero-shot and calibrated templates beyond the model inputs: the PAT-spread hedge, one population per
source, the training-time timing jitter, the verdict against the strongest template, a calibration
profile through `generate`, and `translate --population`."""

from __future__ import annotations

import pytest
import torch
from test_template_input import _residual_batch

from p2es_dist.models import build_model


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


def test_population_realign_moves_each_target_to_the_population_pat():
    """A record whose PAT is 80 ms above the population's has its QRS moved 10 samples later (it sat 10
    samples early against the population template), one 80 ms below 10 earlier; no PAT or a calibrated
    window: unmoved. Without `realign` the same batch is unmoved (zero spread)."""
    from p2es_dist.constants import WINDOW
    from p2es_dist.models.base import PopulationTemplate

    template = PopulationTemplate({"fs": 125, "pat_s": 0.56, "pat_iqr_s": 0.0, "beat": {"II": [1.0] * 100}})
    ecg = torch.zeros(4, 12, WINDOW)
    ecg[:, 1, 500] = 1.0
    batch = {"ecg": ecg, "ecg_mask": torch.ones(4, 12, dtype=torch.bool),
             "template_calibrated": torch.tensor([False, False, False, True]),
             "template_mask": torch.ones(4, 12, dtype=torch.bool),
             "pat_s": torch.tensor([0.64, 0.48, float("nan"), 0.64])}
    moved = template.jitter_targets(batch, realign=True)[:, 1].argmax(dim=1) - 500
    assert moved.tolist() == [10, -10, 0, 0]
    assert (template.jitter_targets(batch)[:, 1].argmax(dim=1) == 500).all()


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
