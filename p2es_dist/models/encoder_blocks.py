"""Building blocks of the foundation encoder: a pre-norm transformer over a packed set of tokens.

Tokens live in a dense layout (B, C, P, D): C = 13 channel types (12 leads + PPG), P patches in time.
Only some tokens take part in attention (a recorded channel's visible patches); `pack` moves those
to the front of a shorter sequence and the rest become key padding, so an absent channel costs no
compute and never reaches a present one, instead of being a zero-filled signal the model must learn
to ignore. `unpack` scatters the results back into the dense layout (zeros elsewhere).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class SelfAttention(nn.Module):
    def __init__(self, *, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, N, D); valid (B, N) bool, False = key padding (never attended to)."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP), as in ViT / nanoGPT."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = SelfAttention(width=width, heads=heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x), valid)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks with a final LayerNorm."""

    def __init__(self, *, width: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        # A window without any valid token would softmax over nothing (NaN): let it attend to its first
        # (junk, later discarded) token instead.
        attend = valid.clone()
        attend[:, 0] |= ~valid.any(dim=1)
        for block in self.blocks:
            x = block(x, attend)
        return self.norm(x)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...], *, keepdim: bool = False) -> Tensor:
    """Mean of x (..., D) over `dim` where mask (...) is True; zeros where nothing is."""
    weight = mask[..., None].to(x.dtype)
    return (x * weight).sum(dim=dim, keepdim=keepdim) / weight.sum(dim=dim, keepdim=keepdim).clamp_min(1)


def pack(tokens: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, D) tokens, (B, N) keep -> packed (B, n, D), valid (B, n), index (B, n) into N.

    n is the largest kept count in the batch (at least 1); kept tokens come first, in their order.
    """
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    n = max(1, int(keep.sum(dim=1).max()))
    index = order[:, :n]
    packed = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    return packed, torch.gather(keep, 1, index), index


def unpack(packed: Tensor, valid: Tensor, index: Tensor, n_tokens: int) -> Tensor:
    """Inverse of `pack`: (B, n, D) -> (B, N, D), zeros at tokens that were not kept."""
    packed = torch.where(valid[..., None], packed, torch.zeros_like(packed))
    out = packed.new_zeros(packed.shape[0], n_tokens, packed.shape[-1])
    return out.scatter(1, index[..., None].expand(-1, -1, packed.shape[-1]), packed)


class TokenEmbedding(nn.Module):
    """Patches of every channel -> tokens with channel-type and time-position embeddings.

    One patch projection is shared by all channel types (the channel embedding says which one), so any
    subset of channels maps into the same token space.
    """

    def __init__(self, *, channels: int, patches: int, patch_len: int, width: int) -> None:
        super().__init__()
        self.patch_len = patch_len
        self.projection = nn.Linear(patch_len, width)
        self.channel = nn.Parameter(torch.randn(channels, width) * 0.02)
        self.position = nn.Parameter(torch.randn(patches, width) * 0.02)

    def forward(self, signals: Tensor) -> Tensor:
        """(B, C, L) -> (B, C, P, D)."""
        patches = rearrange(signals, "b c (p s) -> b c p s", s=self.patch_len)
        return self.projection(patches) + self.channel[:, None, :] + self.position[None, :, :]


class Backbone(nn.Module):
    """Signals and a visible-token mask -> contextual tokens in the dense (B, C, P, D) layout."""

    def __init__(self, *, channels: int, patches: int, patch_len: int, width: int, depth: int, heads: int,
                 mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.width = width
        self.embedding = TokenEmbedding(channels=channels, patches=patches, patch_len=patch_len, width=width)
        self.transformer = Transformer(width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)

    def forward(self, signals: Tensor, visible: Tensor) -> Tensor:
        """signals (B, C, L) with non-visible samples already zeroed; visible (B, C, P) bool."""
        tokens = self.embedding(signals)
        batch, channels, patches, width = tokens.shape
        packed, valid, index = pack(tokens.reshape(batch, -1, width), visible.reshape(batch, -1))
        encoded = self.transformer(packed, valid)
        return unpack(encoded, valid, index, channels * patches).reshape(batch, channels, patches, width)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights and zero biases (ViT/MAE practice); LayerNorm stays at identity."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def scaled_residual_init(transformer: Transformer) -> None:
    """Shrink the residual output projections by 1/sqrt(2 depth) (GPT-2), so deep stacks start stable."""
    scale = 1.0 / math.sqrt(2 * max(1, len(transformer.blocks)))
    for block in transformer.blocks:
        block.attention.proj.weight.data.mul_(scale)
        block.mlp[2].weight.data.mul_(scale)
