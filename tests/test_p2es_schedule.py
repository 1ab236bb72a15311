"""The dual-domain forward process of P2Es: transforms, schedule invariants, reverse-step algebra."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from p2es_dist.models.p2es.schedule import (
    NOISE_SCHEDULES,
    DiffusionSchedule,
    ScheduleConfig,
    dct,
    idct,
    signal_variance,
)

LENGTH = 1024


def make_schedule(kind: str, *, timesteps: int = 1000, d_min: float = 0.001) -> DiffusionSchedule:
    config = ScheduleConfig(timesteps=timesteps, noise_schedule=kind, sigma_blur_max=10.0, d_min=d_min)
    return DiffusionSchedule(config=config, length=LENGTH).double()


def all_t(schedule: DiffusionSchedule) -> torch.Tensor:
    return torch.arange(schedule.timesteps + 1)


@pytest.mark.parametrize("length", [1024, 64, 7])
def test_dct_matches_scipy_and_inverts(length: int) -> None:
    x = torch.randn(3, 12, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    np.testing.assert_allclose(dct(x).numpy(), expected, atol=1e-12)
    torch.testing.assert_close(idct(dct(x)), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(dct(idct(x)), x, atol=1e-12, rtol=0)
    # orthonormal: energy is preserved, so white noise stays white in the frequency domain
    torch.testing.assert_close(dct(x).square().sum(-1), x.square().sum(-1))


def test_schedule_tensors_are_named_buffers() -> None:
    schedule = make_schedule("cosine")
    buffers = dict(schedule.named_buffers())
    assert {"signal", "noise", "blur_tau", "freq_decay"} <= set(buffers)
    assert buffers["signal"].shape == (1001,) and buffers["freq_decay"].shape == (LENGTH,)
    assert set(schedule.state_dict()) == {"signal", "noise", "blur_tau", "freq_decay"}
    assert not list(schedule.parameters())


@pytest.mark.parametrize("kind", NOISE_SCHEDULES)
def test_identity_at_t0_and_pure_noise_at_T(kind: str) -> None:
    schedule = make_schedule(kind)
    assert schedule.signal[0] == 1.0 and schedule.noise[0] == 0.0
    assert schedule.blur_tau[0] == 0.0
    assert torch.equal(schedule.damping(torch.tensor([0])), torch.ones(1, LENGTH, dtype=torch.float64))
    x0 = torch.randn(2, 8, LENGTH, dtype=torch.float64)
    eps = torch.randn_like(x0)
    torch.testing.assert_close(schedule.q_sample(x0, torch.tensor([0, 0]), eps), x0, atol=1e-12, rtol=0)
    # Pure noise at T: terminal signal coefficient below 1e-3 (it is rescaled to exactly 0).
    assert schedule.signal[-1] < 1e-3
    T = schedule.timesteps
    torch.testing.assert_close(schedule.q_sample(x0, torch.tensor([T, T]), eps), eps, atol=1e-6, rtol=0)
    # Variance preserving throughout.
    total_variance = schedule.signal**2 + schedule.noise**2
    torch.testing.assert_close(total_variance, torch.ones(T + 1, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", NOISE_SCHEDULES)
def test_raw_schedules_need_the_rescale(kind: str) -> None:
    abar = signal_variance(kind, 1000)
    assert abar[0] == pytest.approx(1.0)
    assert np.all(np.diff(abar) < 0)
    if kind == "linear":
        # The DDPM linear schedule leaves sqrt(abar_T) ~ 6e-3 of signal: the flaw the rescale fixes.
        assert np.sqrt(abar[-1]) > 1e-3


@pytest.mark.parametrize("kind", NOISE_SCHEDULES)
def test_snr_strictly_decreases_at_every_frequency(kind: str) -> None:
    schedule = make_schedule(kind)
    log_snr = schedule.log_snr(all_t(schedule))  # (T+1, L)
    assert torch.all(log_snr[0] == float("inf")) and torch.all(log_snr[-1] == float("-inf"))
    assert torch.all(log_snr[1:] < log_snr[:-1])


def test_blur_damping_is_monotone_and_bounded() -> None:
    schedule = make_schedule("cosine")
    damping = schedule.damping(all_t(schedule))  # (T+1, L)
    assert torch.all(damping <= 1) and torch.all(damping >= schedule.d_min)
    assert torch.all(damping[1:] <= damping[:-1])  # more blur as t grows
    assert torch.all(damping[:, 1:] <= damping[:, :-1])  # high frequencies damped first
    assert torch.all(damping[:, 0] == 1)  # the mean of a lead is never blurred away
    assert damping[-1, -1] == pytest.approx(schedule.d_min, rel=1e-6)


def test_blur_is_invertible_at_d_min() -> None:
    schedule = make_schedule("cosine", d_min=0.001)
    x0 = torch.randn(4, 12, LENGTH, dtype=torch.float64)
    t = torch.full((4,), schedule.timesteps)
    blurred = schedule.blur(x0, t)
    damping = schedule.damping(t)
    assert damping.min() == pytest.approx(schedule.d_min, rel=1e-6)  # the floor is reached
    recovered = idct(dct(blurred) / damping[:, None, :])
    torch.testing.assert_close(recovered, x0, atol=1e-9, rtol=0)


def test_v_parameterisation_round_trip() -> None:
    schedule = make_schedule("sigmoid")
    x0 = torch.randn(5, 8, LENGTH, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 10, 500, 999, 1000])
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.v_target(x0, eps, t)
    torch.testing.assert_close(schedule.x0_from_v(x_t, v, t), x0, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", NOISE_SCHEDULES)
def test_reverse_steps_with_an_oracle_recover_x0(kind: str) -> None:
    """Given the true x0, DDIM lands exactly on the forward marginal; the posterior ends at x0."""
    schedule = make_schedule(kind, timesteps=100)
    x0 = torch.randn(3, 8, LENGTH, dtype=torch.float64)
    eps = torch.randn_like(x0)
    grid = schedule.sampling_timesteps(7)
    assert grid[0] == 100 and grid[-1] == 0 and len(grid) == 8 and grid == sorted(grid, reverse=True)
    x = schedule.q_sample(x0, torch.full((3,), grid[0]), eps)
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        t, s = torch.full((3,), t_now), torch.full((3,), t_next)
        x = schedule.ddim_step(x, x0, t, s)
        # deterministic DDIM keeps the same eps: x_s = q_sample(x0, s, eps)
        torch.testing.assert_close(x, schedule.q_sample(x0, s, eps), atol=1e-8, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-8, rtol=0)

    t = torch.full((3,), 50)
    x_t = schedule.q_sample(x0, t, eps)
    mean, std = schedule.posterior(x_t, x0, t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x0, atol=1e-9, rtol=0)
    assert torch.all(std == 0)
    _, std_mid = schedule.posterior(x_t, x0, t, torch.full((3,), 49))
    assert torch.all(std_mid > 0) and torch.all(std_mid < schedule.noise[50])


def test_sampling_grid_accepts_any_steps_up_to_T() -> None:
    schedule = make_schedule("linear", timesteps=50)
    assert schedule.sampling_timesteps(50) == list(range(50, -1, -1))
    assert schedule.sampling_timesteps(1) == [50, 0]
    with pytest.raises(ValueError):
        schedule.sampling_timesteps(51)
