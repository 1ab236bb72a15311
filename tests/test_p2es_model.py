"""The P2Es teacher: configs, shapes under lead masks, masking, lead physics, samplers, affinity, overfitting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from p2es_dist.config import load_yaml, packaged_config_path
from p2es_dist.constants import LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.errors import ConfigError
from p2es_dist.models.base import GenerationOptions, count_parameters
from p2es_dist.models.leads import einthoven_residual
from p2es_dist.models.p2es import P2Es, P2EsConfig
from p2es_dist.models.registry import build_model, model_names

TINY = dict(
    timesteps=20, hidden_channels=16, embed_dim=32, dilation_depth=2, cascades=1, lead_features=2,
    ppg_channels=8, cond_channels=8, affinity_prototypes=3, affinity_neighbours=2, affinity_dim=8,
    affinity_warmup_steps=3, sample_steps=5,
)


def tiny_model(seed: int = 0, **overrides: object) -> P2Es:
    torch.manual_seed(seed)
    return P2Es(config=P2EsConfig(**{**TINY, **overrides}))


def synthetic_batch(batch_size: int = 6, *, seed: int = 0, cond_leads: bool = False) -> dict[str, torch.Tensor]:
    """Random windows with random lead masks, one PPG-absent window holding junk, one full 12-lead window."""
    g = torch.Generator().manual_seed(seed)
    ecg_mask = torch.rand(batch_size, N_LEADS, generator=g) < 0.4
    ecg_mask[:, LEAD_INDEX["II"]] = True
    ecg_mask[2] = True
    ppg_mask = torch.ones(batch_size, dtype=torch.bool)
    ppg_mask[1] = False
    ppg = torch.rand(batch_size, WINDOW, generator=g) * 2 - 1
    ppg[1] = float("nan")  # what a loader may leave in an absent PPG
    ecg = 0.3 * torch.randn(batch_size, N_LEADS, WINDOW, generator=g)
    ecg = torch.where(ecg_mask[:, :, None], ecg, torch.full_like(ecg, float("nan")))
    batch = {
        "ppg": ppg,
        "ppg_mask": ppg_mask,
        "ecg": ecg,
        "ecg_mask": ecg_mask,
        "age": torch.tensor([63.0, float("nan"), 35.0, 71.0, 90.0, 22.0][:batch_size]),
        "sex": torch.tensor([0, 1, -1, 1, 0, 1][:batch_size]),
        "labels": torch.zeros(batch_size, 13),
        "subject": torch.tensor([1, 1, 2, 3, 3, 4][:batch_size]),
    }
    if cond_leads:
        given = torch.zeros_like(ecg_mask)
        given[:, LEAD_INDEX["II"]] = True
        batch["cond_leads"] = given
    return batch


def randomise_zero_init(model: P2Es, seed: int = 1) -> P2Es:
    """Zero-initialised output layers make an untrained model predict x0 = 0 whatever the noise; give
    them small random weights so sampler tests see a network that depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if torch.all(parameter == 0):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=g))
    return model


# --- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["p2es", "p2es_small"])
def test_packaged_configs_list_every_field_and_build(name: str) -> None:
    section = load_yaml(packaged_config_path(f"models/{name}"))["model"]
    assert section["name"] == "p2es"
    assert set(section) - {"name"} == {field.name for field in dataclasses.fields(P2EsConfig)}
    model = build_model(section)
    assert isinstance(model, P2Es) and model.name == "p2es" and "p2es" in model_names()


def test_default_size_is_within_the_budget() -> None:
    default = count_parameters(P2Es(config=P2EsConfig()))
    small = count_parameters(build_model(load_yaml(packaged_config_path("models/p2es_small"))["model"]))
    assert default <= 10_000_000
    assert small < default / 10


@pytest.mark.parametrize(
    ("key", "value"),
    [("objective", "eps"), ("noise_schedule", "quadratic"), ("sample_steps", 5000), ("affinity_neighbours", 99),
     ("hidden_channels", 30), ("ppg_encoder", "nope")],
)
def test_bad_config_values_raise_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key if key != "hidden_channels" else "norm_groups"):
        build_model({"name": "p2es", **TINY, key: value})


# --- shapes and masking ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"objective": "v"},
        {"lead_physics": False},
        {"affinity": False},
        {"affinity": False, "lead_physics": False, "objective": "v", "noise_schedule": "linear"},
        {"condition_on_leads": False, "noise_schedule": "sigmoid"},
    ],
)
@pytest.mark.parametrize("cond_leads", [False, True])
def test_shapes_under_random_lead_masks(overrides: dict, cond_leads: bool) -> None:
    model = randomise_zero_init(tiny_model(**overrides))
    batch = synthetic_batch(cond_leads=cond_leads)
    loss, parts = model.loss(batch)
    assert loss.shape == () and torch.isfinite(loss)
    assert {"diffusion", "x0_mse"} <= set(parts)
    assert ("contrastive" in parts) == model.config.affinity
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    out = model.generate(batch, GenerationOptions(seed=0, steps=3))
    assert out.shape == (6, N_LEADS, WINDOW) and torch.isfinite(out).all()
    residual = einthoven_residual(out).abs().max()
    if model.config.lead_physics or (cond_leads and model.config.condition_on_leads):
        assert residual == 0  # derived exactly (a given limb lead, II here, also makes the limb leads physical)
    else:
        assert residual > 1e-3  # 12 free leads: nothing forces Einthoven on an untrained net


def test_loss_ignores_unrecorded_leads_and_absent_ppg() -> None:
    model = randomise_zero_init(tiny_model())
    batch = synthetic_batch()
    other = {key: value.clone() for key, value in batch.items()}
    other["ecg"] = torch.where(batch["ecg_mask"][:, :, None], batch["ecg"], torch.full_like(batch["ecg"], 7.0))
    other["ppg"][1] = 123.0
    torch.manual_seed(5)
    first, _ = model.loss(batch)
    torch.manual_seed(5)
    second, _ = model.loss(other)
    assert torch.equal(first, second)
    # ... but a recorded lead does count
    other["ecg"][0, LEAD_INDEX["II"]] += 1.0
    torch.manual_seed(5)
    third, _ = model.loss(other)
    assert not torch.equal(first, third)


def test_given_condition_leads_change_the_output() -> None:
    model = randomise_zero_init(tiny_model())
    batch = synthetic_batch(cond_leads=True)
    changed = {key: value.clone() for key, value in batch.items()}
    changed["ecg"][:, LEAD_INDEX["II"]] *= -1
    assert not torch.allclose(model.generate(batch, GenerationOptions(seed=0)),
                              model.generate(changed, GenerationOptions(seed=0)))
    without = {key: value for key, value in changed.items() if key != "cond_leads"}
    # without `cond_leads` the leads are not read, so their values do not matter
    assert torch.equal(model.generate(without, GenerationOptions(seed=0)),
                       model.generate({**without, "ecg": batch["ecg"]}, GenerationOptions(seed=0)))


# --- samplers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_samplers_are_reproducible_under_a_seed(sampler: str) -> None:
    model = randomise_zero_init(tiny_model())
    batch = synthetic_batch()
    first = model.generate(batch, GenerationOptions(seed=11, sampler=sampler))
    assert torch.equal(first, model.generate(batch, GenerationOptions(seed=11, sampler=sampler)))
    other = model.generate(batch, GenerationOptions(seed=12, sampler=sampler))
    assert (first - other).abs().max() > 1e-4


def test_sampler_steps_and_means() -> None:
    model = randomise_zero_init(tiny_model())
    batch = synthetic_batch(batch_size=3)
    T = model.config.timesteps
    full_ancestral = model.generate(batch, GenerationOptions(sampler="ancestral"))  # all T steps by default
    assert full_ancestral.shape == (3, N_LEADS, WINDOW)
    for steps in (1, 7, T):
        assert torch.isfinite(model.generate(batch, GenerationOptions(steps=steps))).all()
    with pytest.raises(ValueError):
        model.generate(batch, GenerationOptions(steps=T + 1))
    samples = model.generate(batch, GenerationOptions(seed=3, n_samples=4), return_samples=True)
    assert samples.shape == (4, 3, N_LEADS, WINDOW)
    assert (samples[0] - samples[1]).abs().max() > 1e-4
    torch.testing.assert_close(model.generate(batch, GenerationOptions(seed=3, n_samples=4)), samples.mean(dim=0))


# --- affinity -------------------------------------------------------------------------------
def twelve_lead_batches(n_batches: int = 3) -> list[dict[str, torch.Tensor]]:
    batches = []
    for seed in range(n_batches):
        batch = synthetic_batch(seed=seed)
        batch["ecg_mask"][:] = True
        g = torch.Generator().manual_seed(100 + seed)
        base = torch.randn(6, 1, WINDOW, generator=g)
        batch["ecg"] = base + 0.5 * torch.randn(6, N_LEADS, WINDOW, generator=g)  # correlated leads
        batches.append(batch)
    return batches


def test_init_affinity_from_lead_correlations_is_deterministic() -> None:
    reports, states = [], []
    for _ in range(2):
        model = tiny_model(seed=0)
        reports.append(model.init_affinity(twelve_lead_batches(), seed=4))
        states.append({k: v.clone() for k, v in model.affinity.state_dict().items()})
    report = reports[0]
    assert report["initialised"] and report["matrices"] == "lead_correlation"
    assert report["windows"] == 18 and report["windows_12_lead"] == 18 and report["clusters"] == 3
    assert sum(report["cluster_sizes"]) == 18
    assert reports[0] == reports[1]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    matrices = states[0]["matrices"]
    torch.testing.assert_close(torch.diagonal(matrices, dim1=1, dim2=2), torch.ones(3, N_LEADS))
    off_diagonal = matrices[:, ~torch.eye(N_LEADS, dtype=torch.bool)]
    assert off_diagonal.mean() > 0.5  # base + 0.5 noise: correlation 0.8 between leads
    # a window's weights: a convex combination of its k nearest prototypes
    weights = model.affinity.prototype_weights(model.affinity.embedding(synthetic_batch()))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6))
    assert torch.all((weights > 0).sum(dim=1) == model.config.affinity_neighbours)


def test_init_affinity_without_12_lead_windows_falls_back_to_identity() -> None:
    model = tiny_model()
    report = model.init_affinity([_partial_batch()], seed=0)
    assert report["matrices"] == "identity" and "no window with 12 recorded leads" in report["note"]
    assert torch.equal(model.affinity.matrices.detach(), torch.eye(N_LEADS).repeat(3, 1, 1))
    off = tiny_model(affinity=False)
    assert off.init_affinity([synthetic_batch()]) == {
        "initialised": False, "reason": "affinity is off (model.affinity: false)"
    }
    assert not any(name.startswith("affinity.") for name, _ in off.named_parameters())


def _partial_batch() -> dict[str, torch.Tensor]:
    batch = synthetic_batch()
    batch["ecg_mask"][2, LEAD_INDEX["V6"]] = False  # no window keeps all 12 leads
    return batch


def test_affinity_on_and_off_both_train() -> None:
    batch = synthetic_batch()
    for affinity in (True, False):
        model = tiny_model(affinity=affinity)
        if affinity:
            model.init_affinity(twelve_lead_batches(), seed=0)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        # Zero-initialised output layers pass gradient one layer further back per step: after three,
        # it reaches the affinity matrices through the lead-mixing blocks.
        for _ in range(3):
            loss, _ = model.loss(batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        assert any(name.startswith("network.") for name in moved)
        assert any(name.startswith("affinity.matrices") for name in moved) == affinity


# --- real data -------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    # On a small shared CPU, two OpenMP threads competing with other processes ran this model ~10x
    # slower than one; the test's outcome does not depend on it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.real_data
def test_overfits_a_fixed_batch_of_real_bidmc_windows(bidmc_batch: dict[str, torch.Tensor], one_thread) -> None:
    """The diffusion loss on 32 real BIDMC windows (PPG + II + aVR) falls by 90 % in 40 Adam steps.

    Timesteps are fixed to t in 1..T/10 (cycled over the batch): there x_t still carries the ECG under
    noise comparable to it, so the net must learn to denoise and deblur (x_t / a_t alone leaves ~40 % of
    the loss, the best per-t scalar shrinkage ~25 %), which exercises schedule, conditioning, network,
    deblurring head and masked loss in a CPU budget. At large t the target must be recalled from PPG
    alone, and memorising 64 lead-windows that way takes thousands of steps.
    """
    torch.manual_seed(0)
    model = build_model(load_yaml(packaged_config_path("models/p2es_small"))["model"])
    model.init_affinity([bidmc_batch], seed=0)
    timesteps = torch.arange(len(bidmc_batch["ecg"])) % (model.config.timesteps // 10) + 1
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def diffusion_loss() -> float:
        with torch.no_grad():
            return sum(float(model.loss(bidmc_batch, t=timesteps)[1]["diffusion"]) for _ in range(3)) / 3

    initial = diffusion_loss()
    for _ in range(40):
        loss, _ = model.loss(bidmc_batch, t=timesteps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    final = diffusion_loss()
    assert initial > 1e-3  # the recorded leads carry signal
    assert final <= 0.1 * initial, (initial, final)


def test_sample_draws_is_the_default_number_of_averaged_draws() -> None:
    """`sample_draws` (chosen on validation, like `sample_steps`) travels with the model: callers that do
    not say how many draws get its mean; an explicit `n_samples` still wins."""
    import dataclasses

    model = randomise_zero_init(tiny_model())
    batch = synthetic_batch(batch_size=3)
    assert model.generation_options().n_samples == 1
    model.config = dataclasses.replace(model.config, sample_draws=3)
    assert model.generation_options().n_samples == 3
    assert model.generation_options(GenerationOptions(n_samples=1)).n_samples == 1
    draws = model.generate(batch, GenerationOptions(seed=5, n_samples=3), return_samples=True)
    torch.testing.assert_close(model.generate(batch, GenerationOptions(seed=5)), draws.mean(dim=0))
    with pytest.raises(ValueError, match="sample_draws"):
        dataclasses.replace(model.config, sample_draws=0)
