"""A small Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929) for 16-32 px images.

Its point here is to give ``SSPropLinear`` real targets: every projection (qkv, attention output, both MLP
layers, head) is an ``nn.Linear``, written out rather than taken from ``nn.MultiheadAttention`` whose input
projection is a bare parameter that layer swapping cannot reach. Pre-norm blocks, learned position embeddings,
mean-pooled tokens instead of a class token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssprop_energy.errors import ConfigError


class Attention(nn.Module):
    """Multi-head self-attention with separate ``nn.Linear`` projections."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class VisionTransformer(nn.Module):
    """ViT with ``(image_size / patch_size)**2`` tokens; ``image_size`` must be a multiple of ``patch_size``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dropout: float = 0.0,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_dim: int = 384,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if heads < 1 or dim % heads:
            raise ConfigError(f"vit: dim {dim} is not a multiple of heads {heads}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))
