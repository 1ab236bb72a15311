"""`encoder`: a foundation-style ECG/PPG encoder (in the spirit of CSFM and MCMA), pretrained by masked reconstruction.

One transformer for any subset of the 13 channel types: the 12 leads (`constants.LEADS` order, channels
0-11) and PPG (channel 12). Each recorded channel is cut into patches of `patch_len` samples; a token is
a patch's projection plus a channel-type and a time-position embedding. Channels that are not recorded
(PPG-only BIDMC windows, 3-lead ICU records, 12-lead corpora without PPG) have no tokens at all: they
are dropped as key padding, never fed as zero signals.

Pretraining (`loss`), per window, over its recorded channels:
  - with probability `single_channel_p` keep one recorded channel (a lead or PPG) whole and hide every
    other channel ("whole channel masked": what `reconstruct` does at evaluation);
  - otherwise drop each recorded channel with probability `channel_drop_p` (at least one stays), and
    hide each remaining patch with probability `mask_ratio` (time masking).
The encoder sees the visible patches only; a light decoder (MAE) fills mask tokens in (each starting from
the mean of the visible tokens at its time position) and predicts the samples of every hidden patch of a
recorded channel. The loss is the MSE on those patches only, in model
space; unrecorded channels are neither input nor target, so NaN or junk there is harmless.

Use:
  `embed(batch) -> (B, width)`: mean of the final tokens of the recorded channels; eval mode, no masking.
  `channel_embed(batch) -> (B, 13 * width)`: the same mean per channel (zeros where not recorded), for probes.
  `encode(batch) -> Encoded(tokens (B, 13, P, width), padding (B, 13, P))`: padding is True where a
      token does not exist (channel not recorded); those tokens are zeros.
  `reconstruct(batch, given (B, 13) bool) -> (B, 12, L)`: all 12 leads predicted from the given recorded
      channels (given leads pass through unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS, WINDOW
from p2es_dist.models.base import Batch
from p2es_dist.models.encoder_blocks import (
    Backbone,
    Transformer,
    init_weights,
    masked_mean,
    pack,
    scaled_residual_init,
    unpack,
)
from p2es_dist.models.registry import register

N_CHANNELS = N_LEADS + 1  # 12 leads, then PPG
PPG_CHANNEL = N_LEADS

Size = Literal["tiny", "small", "base"]
# width/depth/heads of the encoder, then of the decoder; explicit config fields override these.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4, "decoder_width": 64, "decoder_depth": 1, "decoder_heads": 4},
    "small": {"width": 192, "depth": 6, "heads": 6, "decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4},
    "base": {"width": 384, "depth": 12, "heads": 8, "decoder_width": 256, "decoder_depth": 4, "decoder_heads": 8},
}
ARCHITECTURE_FIELDS = (*PRESETS["tiny"], "patch_len", "mlp_ratio")


@dataclass(kw_only=True)
class EncoderConfig:
    size: Size = "tiny"  # presets width/depth/heads (see PRESETS); explicit fields below override
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    decoder_width: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    patch_len: int = 32  # samples per patch (0.256 s at 125 Hz); must divide the window
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # pretraining masks
    mask_ratio: float = 0.5  # chance that a patch of a kept channel is hidden
    channel_drop_p: float = 0.25  # chance that a recorded channel is hidden whole
    single_channel_p: float = 0.25  # chance that a window keeps only one recorded channel visible

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise ValueError(f"size must be one of {', '.join(PRESETS)}, got {self.size!r}")
        for key, value in PRESETS[self.size].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.patch_len < 1 or WINDOW % self.patch_len:
            raise ValueError(f"patch_len must divide the window ({WINDOW}), got {self.patch_len}")
        if self.width % self.heads or self.decoder_width % self.decoder_heads:
            raise ValueError("width and decoder_width must be divisible by heads and decoder_heads")
        for name in ("mask_ratio", "channel_drop_p", "single_channel_p"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the weights and the computation (not the pretraining masks)."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}


class Encoded(NamedTuple):
    tokens: Tensor  # (B, 13, P, width); zeros where padding
    padding: Tensor  # (B, 13, P) bool; True: no such token (channel not recorded)


def batch_channels(batch: Batch) -> tuple[Tensor, Tensor]:
    """(B, 13, L) signals (unrecorded channels zeroed, NaN included) and (B, 13) recorded flags.

    An ECG-only batch may leave out `ppg` and `ppg_mask`.
    """
    ecg = batch["ecg"].float()
    ppg = batch["ppg"].float() if "ppg" in batch else torch.zeros_like(ecg[:, 0])
    ppg_mask = batch["ppg_mask"].bool() if "ppg_mask" in batch else torch.zeros_like(ecg[:, 0, 0], dtype=torch.bool)
    signals = torch.cat([ecg, ppg[:, None, :]], dim=1)
    present = torch.cat([batch["ecg_mask"].bool(), ppg_mask[:, None]], dim=1)
    return torch.where(present[:, :, None], signals, torch.zeros_like(signals)), present


def pretraining_visible(present: Tensor, patches: int, config: EncoderConfig) -> Tensor:
    """(B, 13) recorded -> (B, 13, P) visible patches, drawn from the global torch RNG (see module doc)."""
    batch, channels = present.shape
    device = present.device
    draw = torch.rand(batch, channels, device=device).masked_fill(~present, -1.0)
    only = nn.functional.one_hot(draw.argmax(dim=1), channels).bool() & present
    kept = present & (torch.rand(batch, channels, device=device) >= config.channel_drop_p)
    kept = torch.where(kept.any(dim=1, keepdim=True), kept, only)
    single = torch.rand(batch, device=device) < config.single_channel_p
    channels_visible = torch.where(single[:, None], only, kept)
    patches_visible = torch.rand(batch, channels, patches, device=device) >= config.mask_ratio
    patches_visible = patches_visible | single[:, None, None]  # a single kept channel stays whole
    return channels_visible[:, :, None] & patches_visible


def masked_patch_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked tokens of the per-sample squared error; (B, C, P, S) and mask (B, C, P)."""
    per_token = (prediction - target).square().mean(dim=-1)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return per_token.sum() / mask.sum().clamp_min(1)


@contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the previous mode comes back after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


class Decoder(nn.Module):
    """MAE decoder: visible encoder tokens + a mask token at each query -> patch samples."""

    def __init__(self, *, config: EncoderConfig, patches: int) -> None:
        super().__init__()
        width = config.decoder_width
        self.project = nn.Linear(config.width, width)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.channel = nn.Parameter(torch.randn(N_CHANNELS, width) * 0.02)
        self.position = nn.Parameter(torch.randn(patches, width) * 0.02)
        self.transformer = Transformer(width=width, depth=config.decoder_depth, heads=config.decoder_heads,
                                       mlp_ratio=config.mlp_ratio, dropout=config.dropout)
        self.head = nn.Linear(width, config.patch_len)

    def forward(self, tokens: Tensor, visible: Tensor, queries: Tensor) -> Tensor:
        """tokens (B, C, P, D) from the backbone; visible, queries (B, C, P) bool -> (B, C, P, patch_len)."""
        projected = self.project(tokens)
        # A hidden token starts from the mean of the visible tokens at its own time position: the other
        # leads at the same instant are what a hidden lead is mostly made of (I ~ 0.6 II in PTB-XL). With
        # only a mask token, attention must first learn to find the same time position among ~400 tokens,
        # and the tiny encoder did not within its 10-minute budget: it predicted the per-lead mean.
        column = masked_mean(projected, visible, dim=1, keepdim=True)
        x = torch.where(visible[..., None], projected, self.mask_token + column)
        x = x + self.channel[:, None, :] + self.position[None, :, :]
        batch, channels, patches, width = x.shape
        packed, valid, index = pack(x.reshape(batch, -1, width), (visible | queries).reshape(batch, -1))
        decoded = unpack(self.transformer(packed, valid), valid, index, channels * patches)
        return self.head(decoded.reshape(batch, channels, patches, width))


@register("encoder", EncoderConfig)
class Encoder(nn.Module):
    """The foundation encoder (see the module docstring)."""

    def __init__(self, *, config: EncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or EncoderConfig()
        self.patches = WINDOW // config.patch_len
        self.backbone = Backbone(channels=N_CHANNELS, patches=self.patches, patch_len=config.patch_len,
                                 width=config.width, depth=config.depth, heads=config.heads,
                                 mlp_ratio=config.mlp_ratio, dropout=config.dropout)
        self.decoder = Decoder(config=config, patches=self.patches)
        self.apply(init_weights)
        scaled_residual_init(self.backbone.transformer)
        scaled_residual_init(self.decoder.transformer)

    @property
    def width(self) -> int:
        return self.config.width

    def patchify(self, signals: Tensor) -> Tensor:
        return rearrange(signals, "b c (p s) -> b c p s", s=self.config.patch_len)

    def unpatchify(self, patches: Tensor) -> Tensor:
        return rearrange(patches, "b c p s -> b c (p s)")

    def _encode_visible(self, signals: Tensor, visible: Tensor) -> Tensor:
        hidden = torch.where(visible.repeat_interleave(self.config.patch_len, dim=-1), signals,
                             torch.zeros_like(signals))
        return self.backbone(hidden, visible)

    # --- pretraining -------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked-patch reconstruction MSE on hidden patches of recorded channels, and its parts."""
        signals, present = batch_channels(batch)
        visible = pretraining_visible(present, self.patches, self.config)
        targets = present[:, :, None] & ~visible
        prediction = self.decoder(self._encode_visible(signals, visible), visible, targets)
        target = self.patchify(signals)
        total = masked_patch_mse(prediction, target, targets)
        whole_channel = targets & ~visible.any(dim=-1, keepdim=True)  # channels hidden entirely
        parts = {
            "recon": total.detach(),
            "recon_time": masked_patch_mse(prediction, target, targets & ~whole_channel).detach(),
            "recon_channel": masked_patch_mse(prediction, target, whole_channel).detach(),
        }
        return total, parts

    # --- use ---------------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> Encoded:
        """Tokens of every recorded channel, no masking (gradients flow: usable inside other models)."""
        signals, present = batch_channels(batch)
        visible = present[:, :, None].expand(-1, -1, self.patches)
        return Encoded(tokens=self._encode_visible(signals, visible), padding=~visible)

    def embed(self, batch: Batch) -> Tensor:
        """(B, width): mean of the recorded channels' tokens; eval mode, no grad. Zeros for an empty window."""
        with inference(self):
            tokens, padding = self.encode(batch)
            return masked_mean(tokens, ~padding, dim=(1, 2))

    def channel_embed(self, batch: Batch) -> Tensor:
        """(B, 13 * width): each channel's tokens averaged over time, channels in order; zeros for a channel
        that is not recorded. Eval mode, no grad. Keeps where a feature is (an MI shows in some leads only)."""
        with inference(self):
            tokens, padding = self.encode(batch)
            return masked_mean(tokens, ~padding, dim=2).flatten(1)

    def reconstruct(self, batch: Batch, given: Tensor) -> Tensor:
        """(B, 12, L) model-space leads predicted from the `given` (B, 13) recorded channels."""
        with inference(self):
            signals, present = batch_channels(batch)
            given = given.bool().to(present.device) & present
            visible = given[:, :, None].expand(-1, -1, self.patches)
            queries = torch.zeros_like(visible)
            queries[:, :N_LEADS] = True
            prediction = self.unpatchify(self.decoder(self._encode_visible(signals, visible), visible, queries))
            leads = prediction[:, :N_LEADS]
            return torch.where(given[:, :N_LEADS, None], signals[:, :N_LEADS], leads)
