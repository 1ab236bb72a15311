"""`unet`: a 1-D U-Net regressor, PPG (+ condition leads, + age/sex) -> 12 leads.

The neural baseline of Li et al. (2021) is a 3-level U-Net with summed skips; this one is the usual
modern form of the same idea: per level a residual block (GroupNorm, SiLU, two convolutions), a
strided convolution down, and on the way up a transposed convolution, the skip concatenated, and a
residual block again. Demographics and the input-presence flags (PPG present? which condition leads?)
form one vector that every residual block adds as a per-channel bias, as diffusion U-Nets add their
timestep embedding. The output is a 1x1 convolution to 12 leads, zero-initialised so training starts
from the zero prediction.

With `use_template`, the patient's calibration template (already aligned with the ECG to predict) is 12
more input channels and which leads it has 12 more presence flags in the condition vector; training
hides it in a `template_dropout` fraction of windows. Leads given as input (`cond_leads`) are no target.
They may differ from window to window (`data.condition_subsets`): the given leads are 12 input channels
(others zeroed) and which leads are given is 12 flags of the condition vector, so the network knows a
flat given lead from an absent one. `generate` returns the given leads as recorded and, from two given
limb leads, all six by lead physics (`models.leads.impose_given_leads`, applied by `TranslationModel`).

PPG receptive field: every level's two convolutions reach 2 * (kernel_size // 2) samples at its own
resolution, 2^level input samples each, so the coarse levels see far: +-194 samples (1.6 s at 125 Hz)
for the defaults, enough for the ~0.56 s from a QRS to its pulse (issue 13).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS
from p2es_dist.models.base import (
    Batch,
    GenerationOptions,
    PopulationTemplate,
    TranslationModel,
    hide_templates,
    template_input,
    with_calibration,
)
from p2es_dist.models.common import (
    ConditionVector,
    masked_mse,
    regression_target_mask,
    signal_channels,
    signal_input,
)
from p2es_dist.models.registry import register


@dataclass
class UNetConfig:
    # PPG receptive field with these defaults: +-194 samples (1.6 s) around each output sample (measured,
    # tests/test_receptive_field.py; strided levels make it 195 before and 194 after).
    channels: tuple[int, ...] = (32, 64, 128, 256)  # per level, finest first; the last is the bottleneck
    kernel_size: int = 9  # odd, so "same" padding keeps lengths
    groups: int = 8  # GroupNorm groups; must divide every channel count
    condition_on_leads: bool = True  # read `cond_leads` as 12 extra input channels
    use_demographics: bool = True  # age and sex in the condition vector
    condition_dim: int = 64
    dropout: float = 0.0
    # The patient's calibration template (batch keys `template`, `template_mask`) as 12 more input
    # channels; off keeps configs and checkpoints from before it unchanged (its keys are never read).
    use_template: bool = False
    template_dropout: float = 0.5  # training: fraction of windows whose template is hidden (zero-shot)
    template_residual: bool = True  # with use_template: output = template + the network's correction
    # The training population's calibration profile (data/calibration.py JSON), filled in by the trainer:
    # windows without the patient's template get the population's beat at their PPG upstrokes instead.
    population: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.template_dropout <= 1.0:
            raise ValueError(f"template_dropout must be in [0, 1], got {self.template_dropout}")
        if len(self.channels) < 2:
            raise ValueError("channels needs at least two levels")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"groups={self.groups} must divide every channel count, not {bad}")


class ResidualBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x))) + bias(condition)))), with a 1x1 skip if widths differ."""

    def __init__(self, *, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        super().__init__()
        pad = config.kernel_size // 2
        self.norm1 = nn.GroupNorm(config.groups, in_channels)
        self.conv1 = nn.Conv1d(in_channels, out_channels, config.kernel_size, padding=pad)
        self.condition = nn.Linear(config.condition_dim, out_channels)
        self.norm2 = nn.GroupNorm(config.groups, out_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv1d(out_channels, out_channels, config.kernel_size, padding=pad)
        self.skip = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.condition(condition)[:, :, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


@register("unet", UNetConfig)
class UNet1d(TranslationModel):
    """Encoder-decoder with concatenated skips; input length must divide by 2^(levels - 1)."""

    def __init__(self, *, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.population = PopulationTemplate(config.population if config.use_template else None)
        widths = config.channels
        in_channels = signal_channels(with_leads=config.condition_on_leads, with_template=config.use_template)
        self.condition = ConditionVector(dim=config.condition_dim, use_demographics=config.use_demographics,
                                         use_template=config.use_template)
        self.stem = nn.Conv1d(in_channels, widths[0], config.kernel_size, padding=config.kernel_size // 2)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for width, next_width in zip(widths[:-1], widths[1:], strict=True):
            self.down_blocks.append(ResidualBlock(in_channels=width, out_channels=width, config=config))
            self.downsample.append(nn.Conv1d(width, next_width, 4, stride=2, padding=1))
        self.middle = ResidualBlock(in_channels=widths[-1], out_channels=widths[-1], config=config)
        self.upsample = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for width, coarser in zip(reversed(widths[:-1]), reversed(widths[1:]), strict=True):
            self.upsample.append(nn.ConvTranspose1d(coarser, width, 4, stride=2, padding=1))
            self.up_blocks.append(ResidualBlock(in_channels=2 * width, out_channels=width, config=config))
        self.head_norm = nn.GroupNorm(config.groups, widths[0])
        self.head = nn.Conv1d(widths[0], N_LEADS, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> Tensor:
        if self.config.use_template:
            batch = self.population.fill(batch)
        x = signal_input(batch, with_leads=self.config.condition_on_leads, with_template=self.config.use_template)
        factor = 2 ** (len(self.config.channels) - 1)
        if x.shape[-1] % factor:
            raise ValueError(f"unet: input length {x.shape[-1]} must be a multiple of {factor}")
        condition = self.condition(batch)
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downsample, strict=True):
            h = block(h, condition)
            skips.append(h)
            h = down(h)
        h = self.middle(h, condition)
        for up, block in zip(self.upsample, self.up_blocks, strict=True):
            h = block(torch.cat([up(h), skips.pop()], dim=1), condition)
        out = self.head(nn.functional.silu(self.head_norm(h)))
        if self.config.use_template and self.config.template_residual:
            # The head starts at zero: an untrained model answers with the patient's template.
            out = out + template_input(batch).to(out.dtype)
        return out

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.config.use_template and self.training:
            batch = hide_templates(batch, self.config.template_dropout)
        mask = regression_target_mask(batch, with_leads=self.config.condition_on_leads,
                                      with_template=self.config.use_template)
        mse = masked_mse(self(batch), batch["ecg"], mask)
        return mse, {"mse": mse.detach(), "n_pairs": mask.sum().detach()}

    @torch.no_grad()
    def generate(self, batch: Batch, options: GenerationOptions | None = None) -> Tensor:
        # A deterministic regressor (dropout is off in eval mode): `options` only carries a calibration.
        return self(with_calibration(batch, options))
