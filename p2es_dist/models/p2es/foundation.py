"""`ppg_encoder: foundation`: the pretrained foundation encoder (`p2es_dist.models.encoder`) as P2Es's PPG encoder.

    model:
      name: p2es
      ppg_encoder: foundation
      ppg_encoder_model: {name: encoder, size: tiny}     # architecture: required, kept in model.json
      ppg_encoder_checkpoint: runs/pretrain-out          # weights: any load_model URI, optional
      ppg_encoder_frozen: true

The encoder sees PPG-only windows (PPG is its only channel, every lead absent) and returns one feature
vector per patch, (B, width, P); the Conditioner interpolates that to L like any PPG encoder output.

Where the encoder comes from, so that a P2Es checkpoint never depends on the encoder's URI:
  - architecture: always `ppg_encoder_model`, the encoder's `model:` section. It is required because a
    P2Es checkpoint's model.json is the config's model section: with it, `load_model` rebuilds the
    whole P2Es (encoder weights included, they are part of the P2Es state dict) with no other file.
  - pretrained weights: read at construction from `ppg_encoder_checkpoint` when it is set and the URI
    exists; its architecture must equal `ppg_encoder_model`'s (ConfigError otherwise). When the URI is
    unset or does not exist (e.g. reloading a trained P2Es elsewhere), the encoder starts random with
    a warning if a URI was named; the caller's state dict then supplies the trained weights.
  - `ppg_encoder_frozen: true`: the encoder's parameters have requires_grad False, it stays in eval
    mode whatever `P2Es.train()` says, and runs without autograd. `false`: fine-tuned with P2Es.
"""

from __future__ import annotations

import logging

import torch
from einops import rearrange
from torch import Tensor, nn

from p2es_dist.config import from_dict
from p2es_dist.errors import ConfigError, UserError
from p2es_dist.models.encoder import N_CHANNELS, PPG_CHANNEL, Encoder, EncoderConfig
from p2es_dist.models.encoder_blocks import Backbone
from p2es_dist.models.p2es.conditioning import ConditioningConfig, register_ppg_encoder

log = logging.getLogger("p2es.models")


class FoundationPPGEncoder(nn.Module):
    """(B, L) PPG in [-1, 1] -> (B, width, P) per-patch features of the foundation encoder's backbone."""

    def __init__(self, *, backbone: Backbone, patch_len: int, frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_len = patch_len
        self.out_channels = backbone.width
        self.frozen = frozen
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> FoundationPPGEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # no dropout in a frozen feature extractor, whatever the parent says
        return self

    def forward(self, ppg: Tensor) -> Tensor:
        batch, length = ppg.shape
        signals = ppg.new_zeros(batch, N_CHANNELS, length)
        signals[:, PPG_CHANNEL] = ppg
        visible = torch.zeros(batch, N_CHANNELS, length // self.patch_len, dtype=torch.bool, device=ppg.device)
        visible[:, PPG_CHANNEL] = True
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens = self.backbone(signals, visible)
        return rearrange(tokens[:, PPG_CHANNEL], "b p d -> b d p")


def _encoder_config(section: dict, where: str) -> EncoderConfig:
    section = dict(section)
    name = section.pop("name", "encoder")
    if name != "encoder":
        raise ConfigError(f"{where}.name: expected 'encoder', got {name!r}")
    return from_dict(EncoderConfig, section, where=where)


def _reachable(uri: str) -> bool:
    from p2es_dist.storage import uri as uri_lib

    try:
        return uri_lib.exists(uri)
    except UserError:  # an unreachable endpoint reads as "not there"
        return False


def pretrained_encoder(config: ConditioningConfig) -> Encoder:
    """The encoder named by the config, with pretrained weights when the checkpoint is reachable (see module doc)."""
    if not config.ppg_encoder_model:
        raise ConfigError("model.ppg_encoder_model: required with ppg_encoder: foundation (the encoder's model "
                          "section, e.g. {name: encoder, size: tiny}), so P2Es checkpoints rebuild without it")
    architecture = _encoder_config(config.ppg_encoder_model, "model.ppg_encoder_model")
    encoder = Encoder(config=architecture)
    uri = config.ppg_encoder_checkpoint
    if not uri:
        return encoder
    if not _reachable(uri):
        log.warning("model.ppg_encoder_checkpoint %s is not reachable: the foundation encoder starts random "
                    "(fine when loading a trained P2Es checkpoint, which holds its weights)", uri)
        return encoder
    from p2es_dist.models.checkpoint import load_model

    loaded = load_model(uri)
    if loaded.name != "encoder":
        raise ConfigError(f"model.ppg_encoder_checkpoint: {uri} holds a {loaded.name!r} model, expected an encoder")
    pretrained = _encoder_config(loaded.model_config, f"{uri} model.json")
    if pretrained.architecture() != architecture.architecture():
        raise ConfigError(f"model.ppg_encoder_model: architecture {architecture.architecture()} differs from the "
                          f"checkpoint's {pretrained.architecture()} ({uri})")
    encoder.load_state_dict(loaded.model.state_dict())
    return encoder


@register_ppg_encoder("foundation")
def _foundation_encoder(config: ConditioningConfig) -> nn.Module:
    encoder = pretrained_encoder(config)
    return FoundationPPGEncoder(backbone=encoder.backbone, patch_len=encoder.config.patch_len,
                                frozen=config.ppg_encoder_frozen)
