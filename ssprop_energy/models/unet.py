"""The DDPM noise predictor of the ssProp paper's generation experiments: a small UNet (our own code).

Configuration of the public code for MNIST / FashionMNIST (lujiazho/ssProp ``train_ddpm.py``, ``models/unet.py``):
base 16 channels, multipliers (1, 2, 4), two residual blocks per level, a sinusoidal time embedding of the base
width followed by an MLP to 4x the base width, GroupNorm with 16 groups, SiLU, learned 3x3 convolutions for
down- and upsampling, zero-initialised output convolutions, and 8-head self-attention at the deepest level only
(after both residual blocks of the encoder's deepest level, in the middle block, and after the first two of the
three decoder blocks of the deepest level). At 32x32 input that is attention over 8x8 = 64 tokens of 64 channels.

ssProp touches only ``nn.Conv2d``: the attention's 1x1 projections are ``nn.Conv1d``, as in the public code,
where the monkey-patched ``nn.Conv2d`` never reached them; they, the time MLP and the attention products stay
dense under ``sparsify(model, layers=("conv",))`` and are still counted by the FLOP counter.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ssprop_energy.errors import ConfigError

UNET_BASE_CHANNELS = 16
UNET_CHANNEL_MULTS = (1, 2, 4)
UNET_RES_BLOCKS = 2
# Attention blocks per level (the public code's num_attention_blocks=[0, 0, 2] with attention allowed at
# every resolution): only the deepest level has any.
UNET_ATTENTION_BLOCKS = (0, 0, 2)
UNET_HEADS = 8
UNET_NORM_GROUPS = 16
TIME_MAX_PERIOD = 10_000


def timestep_embedding(t: Tensor, dim: int, max_period: int = TIME_MAX_PERIOD) -> Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (B,) -> (B, dim): ``[cos(t f_i), sin(t f_i)]``.

    ``f_i = max_period ** (-i / (dim // 2))`` for ``i < dim // 2`` (the transformer position encoding, as in
    the public code's ``timestep_embedding``: cosines first); an odd ``dim`` gets one zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # 16 groups as in the public code; a width 16 does not divide (a custom base) falls back to the largest
    # common divisor rather than refusing.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    # The public code zero-initialises the last convolution of each residual branch, of each attention block
    # and of the output: every block starts as the identity and the untrained model predicts zero noise.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, then GroupNorm-SiLU-dropout-conv, plus skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        out: list[nn.Module] = [_norm(c_out, groups), nn.SiLU()]
        if dropout > 0:
            out.append(nn.Dropout(dropout))
        out.append(_zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.out_layers = nn.Sequential(*out)
        self.skip: nn.Module = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, residual (the public code's legacy head order:
    the qkv projection's channels are split into heads first, then each head into q, k, v)."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ConfigError(f"attention over {channels} channels cannot have {heads} heads")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        tokens = flat.shape[-1]
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, tokens)
        q, k, v = qkv.chunk(3, dim=1)  # each (B*heads, head_dim, T)
        scale = (c // self.heads) ** -0.25  # on q and k each: 1/sqrt(head_dim) overall
        weight = torch.softmax(torch.bmm((q * scale).transpose(1, 2), k * scale), dim=-1)  # (B*h, T, T)
        h = torch.bmm(v, weight.transpose(1, 2)).reshape(b, c, tokens)  # sum_s w[t, s] v[:, s]
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class _Stage(nn.Module):
    """A residual block optionally followed by attention (one entry of the encoder or decoder)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    """3x3 convolution of stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """UNet noise predictor ``eps_theta(x_t, t)``: ``forward(x, t)`` -> a tensor of ``x``'s shape.

    Args:
        num_classes: ignored (the model is unconditional); accepted so the registry can build every model
            the same way.
        in_channels: image channels (1 for MNIST / digits).
        image_size: input side in pixels; must be divisible by ``2 ** (len(channel_mults) - 1)``.
        dropout: dropout inside the residual blocks (the public code uses 0).
        base_channels, channel_mults, num_res_blocks, attention_blocks, heads, norm_groups: the architecture;
            the defaults are the public code's MNIST configuration.
    """

    task = "generation"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        dropout: float = 0.0,
        base_channels: int = UNET_BASE_CHANNELS,
        channel_mults: Sequence[int] = UNET_CHANNEL_MULTS,
        num_res_blocks: int = UNET_RES_BLOCKS,
        attention_blocks: Sequence[int] = UNET_ATTENTION_BLOCKS,
        heads: int = UNET_HEADS,
        norm_groups: int = UNET_NORM_GROUPS,
    ) -> None:
        super().__init__()
        del num_classes  # unconditional
        mults = tuple(int(m) for m in channel_mults)
        attn = tuple(int(a) for a in attention_blocks)
        if base_channels < 1 or num_res_blocks < 1 or not mults or min(mults) < 1:
            raise ConfigError(
                f"ddpm-unet needs base_channels >= 1, num_res_blocks >= 1 and positive channel_mults; got "
                f"{base_channels}, {num_res_blocks}, {mults}"
            )
        if len(attn) != len(mults) or any(not 0 <= a <= num_res_blocks for a in attn):
            raise ConfigError(
                f"attention_blocks needs one count in [0, {num_res_blocks}] per level ({len(mults)}), got {attn}"
            )
        factor = 2 ** (len(mults) - 1)
        if image_size % factor:
            raise ConfigError(
                f"ddpm-unet with {len(mults)} levels needs an image size divisible by {factor}, got {image_size}"
            )
        self.in_channels = in_channels
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def attention(level: int, index: int, ch: int) -> AttentionBlock | None:
            return AttentionBlock(ch, heads, norm_groups) if index < attn[level] else None

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(mults):
            for i in range(num_res_blocks):
                out = mult * base_channels
                self.down.append(_Stage(ResBlock(ch, out, emb_dim, dropout, norm_groups), attention(level, i, out)))
                ch = out
                skip_channels.append(ch)
            if level != len(mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
        self.middle = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout, norm_groups),
                AttentionBlock(ch, heads, norm_groups),
                ResBlock(ch, ch, emb_dim, dropout, norm_groups),
            ]
        )
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(num_res_blocks + 1):
                out = mult * base_channels
                res = ResBlock(ch + skip_channels.pop(), out, emb_dim, dropout, norm_groups)
                self.up.append(_Stage(res, attention(level, i, out)))
                ch = out
            if level:
                # after the last block of every level but the shallowest
                self.upsample[str(len(self.up) - 1)] = Upsample(ch)
        self.out = nn.Sequential(_norm(ch, norm_groups), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predicted noise for images ``x`` (B, C, H, W) at integer timesteps ``t`` (B,)."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ConfigError(f"timesteps must be a (B,) tensor for B={x.shape[0]} images, got {tuple(t.shape)}")
        sinusoid = timestep_embedding(t, self.base_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(sinusoid)
        h = self.stem(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle[0](h, emb)
        h = self.middle[1](h)
        h = self.middle[2](h, emb)
        for i, stage in enumerate(self.up):
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
            up = self.upsample[str(i)] if str(i) in self.upsample else None
            if up is not None:
                h = up(h)
        return self.out(h)
