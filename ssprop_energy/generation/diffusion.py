"""Gaussian diffusion (DDPM, Ho et al. 2020) with the cosine beta schedule (Nichol & Dhariwal 2021).

As in the ssProp paper's public code (``models/ddpm.py``, ``models/util.py``): 200 timesteps, cosine schedule
with offset ``s = 0.008``, betas clipped to at most 0.999, epsilon prediction, an MSE training loss on the
noise, and the ancestral sampler that predicts x_0 from the noise, clips it to [-1, 1] and draws x_{t-1} from
the posterior q(x_{t-1} | x_t, x_0) with the clipped log variance, adding no noise at t = 0.

Images live in [-1, 1] (``pixel / 127.5 - 1``, the public code's ``ToTensor`` then ``2x - 1``). Every random
draw here comes from an explicit CPU ``torch.Generator``, so the two arms of a paired run see identical
timesteps and noise whatever device they train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ssprop_energy.errors import ConfigError

DEFAULT_TIMESTEPS = 200
COSINE_OFFSET = 8e-3
MAX_BETA = 0.999
SCHEDULES = ("cosine", "linear")

NoiseModel = Callable[[Tensor, Tensor], Tensor]


def cosine_alphas_cumprod(timesteps: int, s: float = COSINE_OFFSET) -> Tensor:
    """``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, t = 0..T (float64).

    Nichol & Dhariwal 2021, eq. 17. Entry ``t`` is the signal fraction after ``t`` noising steps (entry 0 is 1).
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def make_betas(schedule: str, timesteps: int) -> Tensor:
    """Per-step noise variances ``beta_1..beta_T`` (float64).

    ``cosine``: ``1 - alpha_bar(t) / alpha_bar(t - 1)`` clipped to [0, 0.999] (Nichol & Dhariwal).
    ``linear``: ``linspace(sqrt(1e-4), sqrt(2e-2), T) ** 2``, the public code's ``linear`` option.

    Raises:
        ConfigError: unknown schedule or fewer than one timestep.
    """
    if int(timesteps) < 1:
        raise ConfigError(f"diffusion needs at least 1 timestep, got {timesteps}")
    if schedule == "cosine":
        abar = cosine_alphas_cumprod(timesteps)
        return (1 - abar[1:] / abar[:-1]).clamp(0.0, MAX_BETA)
    if schedule == "linear":
        return torch.linspace(1e-4**0.5, 2e-2**0.5, timesteps, dtype=torch.float64) ** 2
    raise ConfigError(f"unknown beta schedule {schedule!r}; available: {', '.join(SCHEDULES)}")


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` shaped (B, 1, 1, ...) to broadcast over ``like``, in ``like``'s dtype and device."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class EvalNoise:
    """The fixed timesteps and noise of a validation set: one timestep and one noise image per image.

    Attributes:
        t: int64 (N,), timesteps spread evenly over [0, T), assigned to images in a seeded random order.
        noise: float32 (N, C, H, W), standard normal.
        seed: the seed both were drawn with.
    """

    t: Tensor
    noise: Tensor
    seed: int


class Diffusion:
    """The forward process, its training loss and the ancestral sampler for ``timesteps`` steps.

    Args:
        timesteps: number of diffusion steps T.
        schedule: ``"cosine"`` (the paper's) or ``"linear"``.
        clip_denoised: clip the predicted x_0 to [-1, 1] while sampling (the public code's default).
    """

    def __init__(self, timesteps: int = DEFAULT_TIMESTEPS, schedule: str = "cosine", clip_denoised: bool = True):
        self.timesteps = int(timesteps)
        self.schedule = schedule
        self.clip_denoised = clip_denoised
        betas = make_betas(schedule, self.timesteps)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # Everything in float64 here; cast to the images' dtype at use.
        self.betas = betas
        self.alphas_cumprod = abar
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt()
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        # log(0) at t = 0, where no noise is added anyway: clipped as in the public code
        self.posterior_log_variance = self.posterior_variance.clamp_min(1e-20).log()
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)

    def describe(self) -> dict[str, object]:
        """JSON-able description for a run record."""
        return {
            "timesteps": self.timesteps,
            "beta_schedule": self.schedule,
            "cosine_offset": COSINE_OFFSET if self.schedule == "cosine" else None,
            "parameterization": "eps",
            "loss": "mse on the noise",
            "sampler": "ancestral DDPM, all timesteps",
            "clip_denoised": self.clip_denoised,
        }

    # -- forward process and loss ---------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`` (t is 0-based: one step at t = 0)."""
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def draw(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random timesteps (B,) uniform in [0, T) and standard-normal noise of ``x0``'s shape, from
        ``generator`` (on the CPU, then moved to ``x0``'s device)."""
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        return t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)

    def loss_at(self, model: NoiseModel, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Mean squared error between the model's predicted noise and the true ``noise`` (scalar)."""
        return nn.functional.mse_loss(model(self.q_sample(x0, t, noise), t), noise)

    def training_loss(self, model: NoiseModel, x0: Tensor, generator: torch.Generator) -> Tensor:
        """The training loss of one batch: random timesteps and noise from ``generator``."""
        t, noise = self.draw(x0, generator)
        return self.loss_at(model, x0, t, noise)

    # -- fixed evaluation ------------------------------------------------------------------------------

    def eval_noise(self, n: int, image_shape: tuple[int, ...], seed: int) -> EvalNoise:
        """Fixed timesteps and noise for ``n`` validation images of ``image_shape`` (C, H, W).

        The timesteps are the even grid ``floor((i + 1/2) T / n)``, i = 0..n-1 (each timestep equally
        represented, up to rounding), permuted with ``seed`` so they do not follow the split's order.
        """
        if n < 1:
            raise ConfigError(f"need at least one validation image, got {n}")
        gen = torch.Generator().manual_seed(int(seed))
        grid = ((torch.arange(n, dtype=torch.float64) + 0.5) * self.timesteps / n).floor().to(torch.int64)
        t = grid[torch.randperm(n, generator=gen)]
        noise = torch.randn((n, *image_shape), generator=gen, dtype=torch.float32)
        return EvalNoise(t=t, noise=noise, seed=int(seed))

    @torch.no_grad()
    def fixed_loss(self, model: NoiseModel, x0: Tensor, fixed: EvalNoise, batch_size: int = 256) -> float:
        """Validation loss: the mean squared noise error over every element of ``x0`` (N, C, H, W), each
        image at its fixed timestep and noise. Independent of ``batch_size`` up to float rounding."""
        if x0.shape[0] != fixed.t.shape[0] or tuple(x0.shape[1:]) != tuple(fixed.noise.shape[1:]):
            raise ConfigError(f"fixed noise for {tuple(fixed.noise.shape)} images, got {tuple(x0.shape)}")
        total, count = 0.0, 0
        for start in range(0, x0.shape[0], batch_size):
            x = x0[start : start + batch_size]
            t = fixed.t[start : start + batch_size].to(x.device)
            noise = fixed.noise[start : start + batch_size].to(device=x.device, dtype=x.dtype)
            err = model(self.q_sample(x, t, noise), t) - noise
            total += float(err.double().pow(2).sum())
            count += err.numel()
        return total / count

    # -- sampling --------------------------------------------------------------------------------------

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_0 = x_t / sqrt(alpha_bar) - sqrt(1 / alpha_bar - 1) eps``."""
        return _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def p_step(self, model: NoiseModel, x_t: Tensor, t_index: int, noise: Tensor) -> Tensor:
        """One reverse step x_t -> x_{t-1} with the given standard-normal ``noise`` (unused at t = 0)."""
        t = torch.full((x_t.shape[0],), t_index, dtype=torch.int64, device=x_t.device)
        x0 = self.predict_x0(x_t, t, model(x_t, t))
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean = _at(self.posterior_mean_coef1, t, x_t) * x0 + _at(self.posterior_mean_coef2, t, x_t) * x_t
        if t_index == 0:
            return mean
        return mean + (0.5 * _at(self.posterior_log_variance, t, x_t)).exp() * noise

    @torch.no_grad()
    def sample(
        self,
        model: NoiseModel,
        n: int,
        image_shape: tuple[int, ...],
        seed: int,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        """Run the full reverse process for ``n`` images from a fixed noise seed; returns (n, C, H, W) float32.

        x_T and every step's noise are drawn on the CPU from one generator seeded with ``seed``, image by
        image in a fixed order, so the result depends only on the model, ``seed`` and ``n`` (not on
        ``batch_size`` or the device).

        ``start`` / ``stop`` select images ``start .. stop - 1`` of those ``n`` (one rank's shard, see
        :mod:`.sharded`): the same noise, so the same images up to float rounding, as rows ``start:stop`` of
        the whole call; returns (stop - start, C, H, W).
        """
        if n < 1:
            raise ConfigError(f"need at least one sample, got {n}")
        stop = n if stop is None else int(stop)
        if not 0 <= start < stop <= n:
            raise ConfigError(f"sample range {start}..{stop} is not inside 0..{n} or is empty")
        batch_size = n if batch_size is None else int(batch_size)
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(start):
            # the earlier images' noise, drawn and dropped: the generator cannot skip, and a draw costs far
            # less than the T model forwards of the image it belongs to
            torch.randn((self.timesteps, *image_shape), generator=gen)
        out = []
        for first in range(start, stop, batch_size):
            # Per image, in image order, one (T, C, H, W) block: x_T, then the noise of steps T-1..1. Drawn
            # batch by batch (all n at once would be n x T images), the same numbers for any batch size.
            count = min(batch_size, stop - first)
            block = torch.stack([torch.randn((self.timesteps, *image_shape), generator=gen) for _ in range(count)])
            block = block.to(device)
            x = block[:, 0]
            for step, t_index in enumerate(range(self.timesteps - 1, -1, -1)):
                noise = block[:, step + 1] if t_index > 0 else x  # t = 0 adds no noise
                x = self.p_step(model, x, t_index, noise)
            out.append(x.float().cpu())
        return torch.cat(out)


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (``p / 127.5 - 1``)."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 pixels, clamped and rounded."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
