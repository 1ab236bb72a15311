"""The reverse network: a temporal multi-scale generator with a frequency-deblurring head.

    x_t (12 leads) ++ condition features --1x1--> hidden
      -> `cascades` x [ residual blocks with dilations 1, 2, 4, ..., 2^(dilation_depth - 1), each FiLM-ed
                        by (timestep embedding + condition vector);
                        then a lead-mixing block: hidden -> 12 x lead_features, mixed across leads by a
                        12x12 matrix per window (the demographic affinity, or the identity), -> hidden ]
      -> GroupNorm, SiLU, 1x1 -> out_leads channels
      -> deblurring head: x = IDCT(g_t * DCT(h)), a learned per-frequency gain.

One cascade sees (kernel_size - 1) * (2^depth - 1) + 1 samples (511, ~4 s, for the defaults): the fine
dilations resolve a QRS, the coarse ones relate successive beats (the "multi-scale" of the paper).
The head's gain is
    log g_t[k] = beta[k] * (-log max(D_t[k], 1 / deblur_max_gain)) + delta[k],
initialised (beta = 1, delta = 0) as the inverse of the blur D_t for x0-prediction, capped because the
inverse of d_min = 1e-3 would multiply by 1000 the high frequencies that a noisy x_t says nothing about.
For v-prediction the target is mostly noise, not a blurred signal, so beta starts at 0 (unit gain).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS

Transform = Callable[[Tensor], Tensor]  # DCT / IDCT along the last dim (the schedule's to_freq, to_time)


@dataclass(kw_only=True)
class NetworkConfig:
    hidden_channels: int = 128
    embed_dim: int = 256  # timestep / condition embedding that drives FiLM
    # Dilations 1 .. 2^(depth - 1) per cascade: the generator reaches cascades * (kernel_size // 2) *
    # (2^dilation_depth - 1) samples each side, +-765 for these defaults; the PPG encoder adds its own.
    dilation_depth: int = 8
    cascades: int = 3
    kernel_size: int = 3
    lead_features: int = 8  # features per lead in the lead-mixing blocks
    norm_groups: int = 8
    deblur_max_gain: float = 10.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dilation_depth < 1 or self.cascades < 1:
            raise ValueError(f"dilation_depth and cascades must be >= 1, got {self.dilation_depth}, {self.cascades}")
        if self.embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sin and cos halves), got {self.embed_dim}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.hidden_channels % self.norm_groups:
            raise ValueError(f"norm_groups={self.norm_groups} must divide hidden_channels={self.hidden_channels}")
        if self.deblur_max_gain < 1:
            raise ValueError(f"deblur_max_gain must be >= 1, got {self.deblur_max_gain}")


def timestep_embedding(t: Tensor, dim: int, *, timesteps: int) -> Tensor:
    """Sinusoidal features of t rescaled to [0, 1000] so the frequencies do not depend on T."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * (1000.0 / timesteps))[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class DilatedResidualBlock(nn.Module):
    """x + W2 act(norm(conv_d(act(FiLM(norm(x)))))); W2 zero-initialised so every block starts as identity."""

    def __init__(self, *, channels: int, embed_dim: int, dilation: int, config: NetworkConfig) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(config.norm_groups, channels)
        self.film = nn.Linear(embed_dim, 2 * channels)
        self.conv = nn.Conv1d(
            channels, channels, config.kernel_size, dilation=dilation, padding=dilation * (config.kernel_size // 2)
        )
        self.norm_out = nn.GroupNorm(config.norm_groups, channels)
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        scale, shift = self.film(embedding)[:, :, None].chunk(2, dim=1)
        h = self.norm_in(x) * (1 + scale) + shift
        h = self.conv(nn.functional.silu(h))
        h = self.proj(self.dropout(nn.functional.silu(self.norm_out(h))))
        return x + h


class LeadMixing(nn.Module):
    """Residual lead-graph step: hidden -> (12, F) per-lead features, mixed by A (B, 12, 12), -> hidden.

    Rows of A are divided by their L1 norm, so an affinity matrix initialised from lead correlations
    averages correlated leads without changing the feature scale; the identity leaves leads unmixed.
    """

    def __init__(self, *, channels: int, lead_features: int) -> None:
        super().__init__()
        self.lead_features = lead_features
        self.split = nn.Conv1d(channels, N_LEADS * lead_features, 1)
        self.merge = nn.Conv1d(N_LEADS * lead_features, channels, 1)
        nn.init.zeros_(self.merge.weight)
        nn.init.zeros_(self.merge.bias)

    def forward(self, x: Tensor, affinity: Tensor) -> Tensor:
        batch, _, length = x.shape
        mixing = affinity / affinity.abs().sum(dim=-1, keepdim=True).clamp_min(1e-6)
        per_lead = self.split(x).view(batch, N_LEADS, self.lead_features, length)
        mixed = torch.einsum("blm,bmfn->blfn", mixing.to(per_lead.dtype), per_lead)
        return x + self.merge(nn.functional.silu(mixed.reshape(batch, -1, length)))


class DeblurHead(nn.Module):
    """x = IDCT(g_t * DCT(h)) with the learned per-frequency gain g_t of the module docstring."""

    def __init__(self, *, length: int, max_gain: float, inverse_blur_init: bool) -> None:
        super().__init__()
        self.min_damping = 1.0 / max_gain
        self.inverse_exponent = nn.Parameter(torch.full((length,), 1.0 if inverse_blur_init else 0.0))
        self.log_gain_offset = nn.Parameter(torch.zeros(length))

    def forward(self, h: Tensor, damping: Tensor, to_freq: Transform, to_time: Transform) -> Tensor:
        inverse_log_blur = -torch.log(damping.clamp_min(self.min_damping))  # (B, L)
        gain = torch.exp(self.inverse_exponent * inverse_log_blur + self.log_gain_offset)
        return to_time(gain[:, None, :] * to_freq(h))


class TemporalMultiScaleGenerator(nn.Module):
    """(x_t in 12-lead layout, t, D_t, condition) -> a prediction for `out_leads` leads, (B, out_leads, L)."""

    def __init__(
        self,
        *,
        config: NetworkConfig,
        cond_channels: int,
        out_leads: int,
        length: int,
        timesteps: int,
        inverse_blur_init: bool,
    ) -> None:
        super().__init__()
        self.timesteps = timesteps
        self.embed_dim = config.embed_dim
        width = config.hidden_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(config.embed_dim, config.embed_dim), nn.SiLU(), nn.Linear(config.embed_dim, config.embed_dim)
        )
        self.stem = nn.Conv1d(N_LEADS + cond_channels, width, 1)
        self.cascades = nn.ModuleList(
            nn.ModuleList(
                DilatedResidualBlock(channels=width, embed_dim=config.embed_dim, dilation=2**i, config=config)
                for i in range(config.dilation_depth)
            )
            for _ in range(config.cascades)
        )
        self.lead_mixing = nn.ModuleList(
            LeadMixing(channels=width, lead_features=config.lead_features) for _ in range(config.cascades)
        )
        self.out_norm = nn.GroupNorm(config.norm_groups, width)
        self.out = nn.Conv1d(width, out_leads, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.head = DeblurHead(length=length, max_gain=config.deblur_max_gain, inverse_blur_init=inverse_blur_init)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        damping: Tensor,
        cond_seq: Tensor,
        cond_vec: Tensor,
        affinity: Tensor,
        *,
        to_freq: Transform,
        to_time: Transform,
    ) -> Tensor:
        embedding = self.time_mlp(timestep_embedding(t, self.embed_dim, timesteps=self.timesteps)) + cond_vec
        embedding = nn.functional.silu(embedding)
        h = self.stem(torch.cat([x_t, cond_seq], dim=1))
        for blocks, mixing in zip(self.cascades, self.lead_mixing, strict=True):
            for block in blocks:
                h = block(h, embedding)
            h = mixing(h, affinity)
        h = self.out(nn.functional.silu(self.out_norm(h)))
        return self.head(h, damping, to_freq, to_time)
