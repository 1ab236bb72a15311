"""The dual-domain forward process of P2Es: blur in the DCT domain, then add temporal noise.

Per lead, along time (L samples), with DCT the orthonormal DCT-II (its inverse is its transpose):

    x_t = a_t * IDCT(D_t * DCT(x_0)) + s_t * eps,         eps ~ N(0, I),   t = 0..T
    D_t[k] = (1 - d_min) * exp(-lambda_k * tau_t) + d_min,  lambda_k = (pi k / L)^2
    tau_t = sigma_blur_t^2 / 2,   sigma_blur_t = sigma_blur_max * sin(pi t / 2T)^2

(blurring diffusion, Hoogeboom & Salimans 2022; inverse heat dissipation, Rissanen et al. 2023).
Because the DCT is orthonormal, white noise in time is white noise in frequency, so in the DCT domain every
coefficient k is an ordinary Gaussian diffusion u_t[k] = alpha_t[k] u_0[k] + s_t eps[k] with its own
signal coefficient alpha_t[k] = a_t * D_t[k]. Posterior, DDIM and v-parameterisation below are the
textbook formulas applied per coefficient.

The noise schedule is variance preserving (s_t = sqrt(1 - a_t^2)) and always rescaled to zero terminal
SNR (Lin et al. 2024): a_t <- (a_t - a_T) / (1 - a_T), so a_0 = 1 and a_T = 0 exactly and sampling
starts from what training saw at t = T: pure noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

NoiseSchedule = Literal["linear", "cosine", "sigmoid"]
NOISE_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "sigmoid")


@dataclass(kw_only=True)
class ScheduleConfig:
    timesteps: int = 1000  # T; t = 0 is the data, t = T pure noise
    noise_schedule: NoiseSchedule = "cosine"
    sigma_blur_max: float = 10.0  # samples (80 ms at 125 Hz): the Gaussian blur width reached at t = T
    d_min: float = 0.001  # floor of the per-frequency damping, keeps the blur invertible

    def __post_init__(self) -> None:
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.sigma_blur_max < 0:
            raise ValueError(f"sigma_blur_max must be >= 0, got {self.sigma_blur_max}")
        if not 0 < self.d_min <= 1:
            raise ValueError(f"d_min must be in (0, 1], got {self.d_min}")


def signal_variance(kind: str, timesteps: int) -> np.ndarray:
    """abar_t = a_t^2 for t = 0..T (float64), before the zero-terminal-SNR rescale."""
    t = np.arange(timesteps + 1, dtype=np.float64)
    if kind == "linear":
        # DDPM: beta_t linear in t from 1e-4 to 0.02 (scaled by 1000 / T so any T spans the same
        # total noise), abar_t = prod_{i <= t} (1 - beta_i), abar_0 = 1.
        scale = 1000.0 / timesteps
        betas = np.linspace(1e-4 * scale, 0.02 * scale, timesteps).clip(max=0.999)
        return np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    if kind == "cosine":
        # Nichol & Dhariwal: abar_t = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2), s = 0.008.
        offset = 0.008
        f = np.cos((t / timesteps + offset) / (1 + offset) * math.pi / 2) ** 2
        return f / f[0]
    if kind == "sigmoid":
        # Jabri et al. / Chen 2023: abar_t = (sig(e / tau) - sig((t / T (e - b) + b) / tau))
        #                                    / (sig(e / tau) - sig(b / tau)),  b = -3, e = 3, tau = 1.
        start, end, tau = -3.0, 3.0, 1.0
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
        v_start, v_end = sig(start / tau), sig(end / tau)
        return (v_end - sig((t / timesteps * (end - start) + start) / tau)) / (v_end - v_start)
    raise ValueError(f"unknown noise schedule {kind!r}; expected one of {NOISE_SCHEDULES}")


def zero_terminal_snr(signal: np.ndarray) -> np.ndarray:
    """a_t -> (a_t - a_T) / (a_0 - a_T): keeps a_0, makes a_T exactly 0 (Lin et al. 2024, alg. 1)."""
    return (signal - signal[-1]) / (signal[0] - signal[-1])


def _ortho_scale(n: int, like: Tensor) -> Tensor:
    """sqrt(1 / 4N) for k = 0, sqrt(1 / 2N) otherwise: makes the DCT-II matrix orthonormal."""
    scale = torch.full((n,), math.sqrt(1 / (2 * n)), dtype=like.dtype, device=like.device)
    scale[0] = math.sqrt(1 / (4 * n))
    return scale


def dct(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dim (= scipy.fft.dct(x, type=2, norm="ortho")) in O(N log N).

    Makhoul (1980): with v = (x_0, x_2, x_4, ..., x_5, x_3, x_1) and V = FFT(v),
    X_k = 2 Re(exp(-i pi k / 2N) V_k), then the orthonormal scaling.
    """
    dtype = x.dtype
    x = x if dtype in (torch.float32, torch.float64) else x.float()  # FFTs want fp32/fp64
    n = x.shape[-1]
    spectrum = torch.fft.fft(torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1), dim=-1)
    k = torch.arange(n, dtype=x.dtype, device=x.device)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    return (2 * (spectrum * twiddle).real * _ortho_scale(n, x)).to(dtype)


def idct(u: Tensor) -> Tensor:
    """Inverse of `dct` (orthonormal DCT-III). Undoes Makhoul's steps: for the unscaled X,
    V_k = exp(i pi k / 2N) (X_k - i X_{N-k}) / 2 with X_N = 0, v = IFFT(V), then un-permute."""
    dtype = u.dtype
    u = u if dtype in (torch.float32, torch.float64) else u.float()
    n = u.shape[-1]
    unscaled = u / _ortho_scale(n, u)
    reflected = torch.cat([torch.zeros_like(unscaled[..., :1]), unscaled[..., 1:].flip(-1)], dim=-1)
    k = torch.arange(n, dtype=u.dtype, device=u.device)
    twiddle = torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(0.5 * twiddle * torch.complex(unscaled, -reflected), dim=-1).real
    half = (n + 1) // 2
    x = torch.empty_like(u)
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x.to(dtype)


class DiffusionSchedule(nn.Module):
    """The schedule tensors as named buffers, and the per-coefficient maths of the dual-domain process.

    Buffers (t = 0..T indexes the first dim):
      `signal` a_t (T+1,), `noise` s_t (T+1,), `blur_tau` tau_t (T+1,), `freq_decay` lambda_k (L,).
    Signals are (..., L) tensors; `t` is a (B,) long tensor broadcast over the batch dim.
    """

    def __init__(self, *, config: ScheduleConfig, length: int) -> None:
        super().__init__()
        self.timesteps = config.timesteps
        self.length = length
        self.d_min = config.d_min
        abar = signal_variance(config.noise_schedule, config.timesteps).clip(0.0, 1.0)
        signal = zero_terminal_snr(np.sqrt(abar))
        noise = np.sqrt(1.0 - signal**2)
        steps = np.arange(config.timesteps + 1, dtype=np.float64)
        sigma_blur = config.sigma_blur_max * np.sin(math.pi * steps / (2 * config.timesteps)) ** 2
        sigma_blur[0] = 0.0  # sin(0) is exact already; written out because t = 0 must be the identity
        self.register_buffer("signal", torch.tensor(signal, dtype=torch.float32))
        self.register_buffer("noise", torch.tensor(noise, dtype=torch.float32))
        self.register_buffer("blur_tau", torch.tensor(sigma_blur**2 / 2, dtype=torch.float32))
        freqs = np.arange(length, dtype=np.float64)
        self.register_buffer("freq_decay", torch.tensor((math.pi * freqs / length) ** 2, dtype=torch.float32))

    # --- transforms -------------------------------------------------------------------------
    def to_freq(self, x: Tensor) -> Tensor:
        """Orthonormal DCT-II along the last dim."""
        return dct(x)

    def to_time(self, u: Tensor) -> Tensor:
        """Inverse of `to_freq`."""
        return idct(u)

    # --- coefficients -----------------------------------------------------------------------
    def damping(self, t: Tensor) -> Tensor:
        """D_t[k] (B, L) = (1 - d_min) exp(-lambda_k tau_t) + d_min; exactly 1 at t = 0."""
        decay = torch.exp(-self.freq_decay[None, :] * self.blur_tau[t][:, None])
        damping = (1 - self.d_min) * decay + self.d_min
        return torch.where((t == 0)[:, None], torch.ones_like(damping), damping)

    def alpha(self, t: Tensor) -> Tensor:
        """Per-coefficient signal coefficient alpha_t[k] = a_t D_t[k], (B, 1, L) to broadcast over leads."""
        return (self.signal[t][:, None] * self.damping(t))[:, None, :]

    def sigma(self, t: Tensor) -> Tensor:
        """s_t as (B, 1, 1)."""
        return self.noise[t][:, None, None]

    def log_snr(self, t: Tensor) -> Tensor:
        """log(alpha_t[k]^2 / s_t^2), (B, L); -inf at t = T, +inf at t = 0."""
        return 2 * (torch.log(self.alpha(t)[:, 0]) - torch.log(self.sigma(t)[:, 0]))

    # --- forward process ----------------------------------------------------------------------
    def blur(self, x0: Tensor, t: Tensor) -> Tensor:
        """IDCT(D_t * DCT(x0)) for x0 (B, C, L)."""
        return self.to_time(self.damping(t)[:, None, :] * self.to_freq(x0))

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = a_t IDCT(D_t DCT(x0)) + s_t eps."""
        return self.signal[t][:, None, None] * self.blur(x0, t) + self.sigma(t) * eps

    # --- v-parameterisation, per coefficient --------------------------------------------------
    # With r = sqrt(alpha^2 + s^2), a' = alpha / r, s' = s / r (a'^2 + s'^2 = 1) and z = u_t / r = a' u0 + s' eps:
    #   v = a' eps - s' u0,   u0 = a' z - s' v,   eps = s' z + a' v.
    def _unit_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        alpha, sigma = self.alpha(t), self.sigma(t)
        radius = torch.sqrt(alpha**2 + sigma**2)
        return alpha / radius, sigma / radius, radius

    def v_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v in the time domain (IDCT of the per-coefficient v)."""
        a_unit, s_unit, _ = self._unit_coefficients(t)
        return self.to_time(a_unit * self.to_freq(eps) - s_unit * self.to_freq(x0))

    def x0_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        a_unit, s_unit, radius = self._unit_coefficients(t)
        return self.to_time(a_unit * self.to_freq(x_t) / radius - s_unit * self.to_freq(v))

    # --- reverse steps, t -> s < t, given a prediction of x0 ----------------------------------
    def ddim_step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Deterministic (eta = 0): eps_hat = (u_t - alpha_t u0_hat) / s_t; u_s = alpha_s u0_hat + s_s eps_hat."""
        u_t, u0_hat = self.to_freq(x_t), self.to_freq(x0_hat)
        eps_hat = (u_t - self.alpha(t) * u0_hat) / self.sigma(t)
        return self.to_time(self.alpha(s) * u0_hat + self.sigma(s) * eps_hat)

    def posterior(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (time domain) and per-coefficient std (B, 1, L) of q(x_s | x_t, x0 = x0_hat), s < t.

        alpha_{t|s} = alpha_t / alpha_s, s_{t|s}^2 = s_t^2 - alpha_{t|s}^2 s_s^2,
        mean = (alpha_{t|s} s_s^2 / s_t^2) u_t + (alpha_s s_{t|s}^2 / s_t^2) u0, var = s_{t|s}^2 s_s^2 / s_t^2.
        alpha_s > 0 for s < T, and D_t <= D_s, a_t <= a_s keep alpha_{t|s} <= 1 and s_{t|s}^2 >= 0.
        """
        alpha_t, alpha_s = self.alpha(t), self.alpha(s)
        var_t, var_s = self.sigma(t) ** 2, self.sigma(s) ** 2
        alpha_ts = alpha_t / alpha_s
        var_ts = (var_t - alpha_ts**2 * var_s).clamp_min(0.0)
        u_t, u0_hat = self.to_freq(x_t), self.to_freq(x0_hat)
        mean = (alpha_ts * var_s / var_t) * u_t + (alpha_s * var_ts / var_t) * u0_hat
        std = torch.sqrt(var_ts * var_s / var_t)
        return self.to_time(mean), std

    def ancestral_step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        """A draw from q(x_s | x_t, x0_hat); `noise` is white (time domain == frequency domain)."""
        mean, std = self.posterior(x_t, x0_hat, t, s)
        return mean + self.to_time(std * self.to_freq(noise))

    def sampling_timesteps(self, steps: int) -> list[int]:
        """S + 1 strictly decreasing ints from T to 0, evenly spaced (any 1 <= S <= T)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, T={self.timesteps}], got {steps}")
        grid = np.linspace(self.timesteps, 0, steps + 1).round().astype(int)
        return [int(v) for v in grid]
