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


def test_student_takes_the_template_beside_ppg() -> None:
    """(Its ONNX / TorchScript export takes the template too: tests/test_student_template_export.py.)"""
    model = randomise_zero_init(build("student", use_template=True)).eval()
    batch = batch_with_templates()
    masked = torch.where(batch["template_mask"][:, :, None], batch["template"], torch.zeros_like(batch["template"]))
    # The mask-free path: absent leads are the all-zero ones.
    torch.testing.assert_close(model.forward_ppg(batch["ppg"], masked), model.generate(batch))


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
