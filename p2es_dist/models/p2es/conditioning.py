"""What the reverse network is conditioned on: PPG, any recorded condition leads, the patient's
calibration template (`use_template`), age and sex.

Two outputs per window:
  `seq` (B, cond_channels, L): time-aligned features (PPG encoder output, condition leads, template),
        concatenated with x_t at the network's input, because PPG and ECG beats line up in time;
  `vec` (B, embed_dim): a global vector (pooled PPG features, which leads are given, which leads the
        template has, age, sex) that the network adds to its timestep embedding and feeds to FiLM.

PPG timing. A QRS shows in the PPG as an upstroke about 0.56 s (70 samples) later, and that delay (the
pulse arrival time) differs between patients by some 50 ms, so a model must see well over +-70 samples
of PPG. The CNN encoder sees 3 * (1 + sum(ppg_dilations)) samples each side (kernel 7); the generator
adds cascades * (kernel_size // 2) * (2^dilation_depth - 1) (network.py), and P2Es' PPG receptive field
is the sum. The shipped configs use `ppg_dilations: [1, 4, 16, 32]`, +-162 samples (1.3 s) from the
encoder alone, whatever the generator's depth, at the cost and size of the old [1, 2, 4, 8] (+-48):
kernel 7 leaves no gap between dilations four apart. The dataclass default stays [1, 2, 4, 8], so a
checkpoint whose model.json predates the field keeps its meaning (the default generator, +-765,
already sees far enough). The template already sits where this patient's QRS are (its
beats are placed at each upstroke minus their PAT), so it enters like a condition lead does: its 12
leads and 12 "has this lead" flags through a short convolution (`template_to_seq`), the flags also into
the vector (`template_to_vec`). An all-false `template_mask` (or a batch without a template) reads as no
calibration: the template's values then reach nothing.

The PPG encoder is anything that follows `PPGEncoder` and is registered by name with
`register_ppg_encoder`, so the foundation encoder of a later issue plugs in with `ppg_encoder: <name>`.
Absent PPG (12-lead corpora) and unknown age or sex each have their own learned embedding, so the
model does not confuse "missing" with a value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS, SEX_FEMALE, SEX_MALE
from p2es_dist.errors import ConfigError
from p2es_dist.models.base import template_input, template_leads

AGE_BUCKET_YEARS = 10
N_AGE_BUCKETS = 10  # 0-9, ..., 90+ ; index N_AGE_BUCKETS means unknown


@dataclass(kw_only=True)
class ConditioningConfig:
    ppg_encoder: str = "cnn"  # a name registered with `register_ppg_encoder`
    ppg_channels: int = 32  # width of the default CNN encoder
    cond_channels: int = 32  # time-aligned condition features handed to the network
    # Dilations of the default CNN encoder's residual blocks (kernel 7): it sees 3 * (1 + sum(dilations))
    # samples of PPG each side: +-48 for these (the encoder of checkpoints from before the field); the
    # shipped configs set [1, 4, 16, 32], +-162 (1.3 s), for the same parameters and cost (issue 13).
    ppg_dilations: tuple[int, ...] = (1, 2, 4, 8)
    condition_on_leads: bool = True  # read `cond_leads` (the `--condition` leads) as input
    # The patient's calibration template (batch keys `template`, `template_mask`) as an input; off keeps
    # configs and checkpoints from before it unchanged (its keys are then never read).
    use_template: bool = False
    template_dropout: float = 0.5  # training only: fraction of windows whose template is hidden (zero-shot)
    # With use_template: predict a correction to the template instead of the ECG (P2Es: x0 objective only).
    template_residual: bool = True
    # Training only: shift the target ECG of windows that get the population template by a lag drawn from
    # their population's PAT spread (`PopulationTemplate.jitter_targets`), so that the zero-shot answer
    # hedges timing instead of memorising the training patients' PATs.
    population_jitter: bool = False
    # With population_jitter: draw that lag around the population PAT, not the patient's own (moving the
    # target by the record's PAT minus the population's first), so no training patient's PAT is learnable.
    population_realign: bool = False
    # The training population's calibration profile (data/calibration.py JSON), filled in by the trainer:
    # windows without the patient's template get the population's beat at their PPG upstrokes instead.
    population: dict = field(default_factory=dict)
    # `ppg_encoder: foundation` (p2es_dist/models/p2es/foundation.py): the pretrained encoder's `model:`
    # section (architecture, kept in every checkpoint), its checkpoint URI (weights, read only when
    # reachable at construction) and whether it stays frozen.
    ppg_encoder_model: dict[str, Any] = field(default_factory=dict)
    ppg_encoder_checkpoint: str | None = None
    ppg_encoder_frozen: bool = True

    def __post_init__(self) -> None:
        if self.ppg_channels < 1 or self.cond_channels < 1:
            raise ValueError("ppg_channels and cond_channels must be >= 1")
        if not self.ppg_dilations or min(self.ppg_dilations) < 1:
            raise ValueError(f"ppg_dilations must be a non-empty list of dilations >= 1, got {self.ppg_dilations}")
        if not 0.0 <= self.template_dropout <= 1.0:
            raise ValueError(f"template_dropout must be in [0, 1], got {self.template_dropout}")


@runtime_checkable
class PPGEncoder(Protocol):
    """(B, L) PPG in [-1, 1] -> (B, out_channels, L') features, any L' (resampled to L by the caller)."""

    out_channels: int

    def __call__(self, ppg: Tensor) -> Tensor: ...


_PPG_ENCODERS: dict[str, Callable[[ConditioningConfig], nn.Module]] = {}


def register_ppg_encoder(name: str) -> Callable[[Callable[[ConditioningConfig], nn.Module]], Callable]:
    """Decorator for a factory `config -> nn.Module` that follows `PPGEncoder`."""

    def wrap(factory: Callable[[ConditioningConfig], nn.Module]) -> Callable[[ConditioningConfig], nn.Module]:
        _PPG_ENCODERS[name] = factory
        return factory

    return wrap


def build_ppg_encoder(config: ConditioningConfig) -> nn.Module:
    if config.ppg_encoder not in _PPG_ENCODERS:
        known = ", ".join(sorted(_PPG_ENCODERS))
        raise ConfigError(f"model.ppg_encoder: expected one of {known}, got {config.ppg_encoder!r}")
    encoder = _PPG_ENCODERS[config.ppg_encoder](config)
    if not isinstance(encoder, PPGEncoder):
        raise TypeError(f"PPG encoder {config.ppg_encoder!r} does not follow the PPGEncoder protocol")
    return encoder


class ConvPPGEncoder(nn.Module):
    """A small dilated CNN at full resolution; it sees 3 * (1 + sum(dilations)) samples each side."""

    def __init__(self, *, channels: int, dilations: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.out_channels = channels
        groups = math.gcd(8, channels)
        self.stem = nn.Conv1d(1, channels, 7, padding=3)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.GroupNorm(groups, channels),
                nn.SiLU(),
                nn.Conv1d(channels, channels, 7, dilation=d, padding=3 * d),
            )
            for d in dilations
        )

    def forward(self, ppg: Tensor) -> Tensor:
        h = self.stem(ppg[:, None, :])
        for block in self.blocks:
            h = h + block(h)
        return h


@register_ppg_encoder("cnn")
def _conv_encoder(config: ConditioningConfig) -> nn.Module:
    return ConvPPGEncoder(channels=config.ppg_channels, dilations=tuple(config.ppg_dilations))


class Context(NamedTuple):
    seq: Tensor  # (B, cond_channels, L)
    vec: Tensor  # (B, embed_dim)


def age_bucket(age: Tensor) -> Tensor:
    """Decade index 0..9 (90+ -> 9); NaN -> N_AGE_BUCKETS, the 'unknown' row."""
    known = ~torch.isnan(age)
    decade = torch.nan_to_num(age, nan=0.0).div(AGE_BUCKET_YEARS).floor().clamp(0, N_AGE_BUCKETS - 1)
    return torch.where(known, decade.long(), torch.full_like(decade, N_AGE_BUCKETS).long())


def sex_index(sex: Tensor) -> Tensor:
    """0 female, 1 male, 2 unknown (any other code)."""
    sex = sex.long()
    return torch.where((sex == SEX_FEMALE) | (sex == SEX_MALE), sex, torch.full_like(sex, 2))


class Conditioner(nn.Module):
    """Batch (+ which leads are given) -> Context."""

    def __init__(self, *, config: ConditioningConfig, embed_dim: int) -> None:
        super().__init__()
        self.condition_on_leads = config.condition_on_leads
        self.ppg_encoder = build_ppg_encoder(config)
        width = self.ppg_encoder.out_channels
        self.ppg_to_seq = nn.Conv1d(width, config.cond_channels, 1)
        self.ppg_to_vec = nn.Linear(2 * width, embed_dim)  # mean and max pooling
        self.ppg_absent = nn.Parameter(torch.zeros(embed_dim))
        if self.condition_on_leads:
            # Condition leads enter as their samples plus a constant "given" channel each, so a zero
            # lead (flat line given) and an absent lead look different.
            self.leads_to_seq = nn.Conv1d(2 * N_LEADS, config.cond_channels, 7, padding=3)
            self.leads_to_vec = nn.Linear(N_LEADS, embed_dim)
        self.use_template = config.use_template
        if self.use_template:
            # The same layout for the calibration template: its 12 leads, then 12 "has this lead" flags.
            self.template_to_seq = nn.Conv1d(2 * N_LEADS, config.cond_channels, 7, padding=3)
            self.template_to_vec = nn.Linear(N_LEADS, embed_dim)
            # Whose template: the patient's (calibrated) or the training population's (zero-shot).
            self.template_kind = nn.Embedding(2, embed_dim)
        self.age = nn.Embedding(N_AGE_BUCKETS + 1, embed_dim)
        self.sex = nn.Embedding(3, embed_dim)

    def forward(self, batch: dict[str, Tensor], given_leads: Tensor) -> Context:
        ppg, ppg_present = batch["ppg"], batch["ppg_mask"].bool()
        length = ppg.shape[-1]
        ppg = torch.where(ppg_present[:, None], ppg, torch.zeros_like(ppg))
        features = self.ppg_encoder(ppg)
        if features.shape[-1] != length:
            features = nn.functional.interpolate(features, size=length, mode="linear", align_corners=False)
        present = ppg_present[:, None].to(features.dtype)
        seq = self.ppg_to_seq(features) * present[:, :, None]
        pooled = torch.cat([features.mean(dim=-1), features.amax(dim=-1)], dim=-1)
        vec = self.ppg_to_vec(pooled) * present + self.ppg_absent * (1 - present)

        if self.condition_on_leads:
            given = given_leads.bool()
            leads = torch.where(given[:, :, None], batch["ecg"], torch.zeros_like(batch["ecg"]))
            flags = given[:, :, None].to(leads.dtype).expand(-1, -1, length)
            seq = seq + self.leads_to_seq(torch.cat([leads, flags], dim=1))
            vec = vec + self.leads_to_vec(given.to(vec.dtype))
        if self.use_template:
            has = template_leads(batch)
            template = template_input(batch).to(seq.dtype)
            flags = has[:, :, None].to(seq.dtype).expand(-1, -1, length)
            seq = seq + self.template_to_seq(torch.cat([template, flags], dim=1))
            vec = vec + self.template_to_vec(has.to(vec.dtype))
            if "template_calibrated" in batch:
                vec = vec + self.template_kind(batch["template_calibrated"].long())
        vec = vec + self.age(age_bucket(batch["age"])) + self.sex(sex_index(batch["sex"]))
        return Context(seq=seq, vec=vec)
