"""``GenerationTask``: what a trainer needs to train and judge a DDPM noise predictor.

It mirrors the trainer's classification task (``batch_loss``, ``evaluate``, ``metric``, ``higher_is_better``)
and adds the end-of-run steps of a generative model: ``sample`` (the full reverse process, to be metered in its
own window), ``score`` (a Frechet distance with its extractor's provenance) and ``grid`` (PNG for the report);
``final`` runs all three. ``step_fn`` is the training step for :class:`ssprop_energy.flops.FlopMeter`.

Pairing: the training draws (timesteps, noise) come from a CPU generator reseeded by :meth:`set_epoch` from
``(seed, epoch)``, so two arms (one task each) with the same seed see the same draws batch for batch, and a run
resumed at an epoch boundary continues the same sequence. Validation uses fixed timesteps and noise per image
(seeded by ``eval_seed``) and sampling a fixed noise seed (``sample_seed``): identical for both arms.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssprop_energy.data.base import DatasetSplits, TensorSplit
from ssprop_energy.errors import ConfigError
from ssprop_energy.generation.diffusion import DEFAULT_TIMESTEPS, Diffusion, EvalNoise, to_model_range, to_uint8
from ssprop_energy.generation.features import (
    CLASSIFIER_TRAIN_SAMPLES,
    ENV_INCEPTION_WEIGHTS,
    FeatureExtractor,
    QualityResult,
    measure_quality,
    select_extractor,
)
from ssprop_energy.generation.grid import grid_png

logger = logging.getLogger(__name__)

# 32 samples: on the shared 2-core CPU (one torch thread, load ~8) a 32x32 UNet forward costs ~12-16 ms per
# image, so 200 reverse steps for 32 images take ~100 s per arm there (about a third of that when quiet).
DEFAULT_SAMPLES = 32


@dataclass(frozen=True)
class GenerationConfig:
    """Settings of the generation task (the paper's: 200 steps, cosine schedule).

    Attributes:
        timesteps / schedule: the diffusion.
        n_samples: images generated at the end of the run (for the quality figure and the grid).
        sample_seed: seed of x_T and of every reverse step's noise.
        sample_batch: images per reverse-process batch (memory only: the samples do not depend on it).
        eval_seed: seed of the fixed validation timesteps and noise.
        eval_batch: images per validation batch.
        grid_columns / grid_scale: layout of the sample grid (pixel repetition factor).
        inception_weights: a local Inception-v3 weights file for the standard FID (else
            ``$SSPROP_ENERGY_INCEPTION_WEIGHTS``; else the classifier Frechet distance).
        classifier_train_samples: training length of the fallback feature classifier.
    """

    timesteps: int = DEFAULT_TIMESTEPS
    schedule: str = "cosine"
    n_samples: int = DEFAULT_SAMPLES
    sample_seed: int = 0
    sample_batch: int = 64
    eval_seed: int = 0
    eval_batch: int = 256
    grid_columns: int = 8
    grid_scale: int = 2
    inception_weights: str | None = None
    classifier_train_samples: int = CLASSIFIER_TRAIN_SAMPLES

    def __post_init__(self) -> None:
        if self.n_samples < 2:
            raise ConfigError(f"a Frechet distance needs at least 2 samples, got n_samples={self.n_samples}")
        if min(self.sample_batch, self.eval_batch, self.grid_columns, self.grid_scale) < 1:
            raise ConfigError("sample_batch, eval_batch, grid_columns and grid_scale must be >= 1")


@dataclass(frozen=True)
class GenerationResult:
    """What ``final`` produces for one arm.

    Attributes:
        samples: the generated images, uint8 (n, C, H, W) (for files, not for the JSON record).
        quality: the Frechet distance and its provenance.
        grid_png: the samples as one PNG image.
        sample_wall_s: seconds of the reverse process (the window to meter as sampling).
        quality_wall_s: seconds of feature extraction and the distance (extractor training included when
            the classifier was not cached yet).
    """

    samples: Tensor
    quality: QualityResult
    grid_png: bytes
    sample_wall_s: float
    quality_wall_s: float
    sampling: dict[str, Any] = field(default_factory=dict)

    def record_fields(self) -> dict[str, Any]:
        """JSON-able fields for an arm's record: ``fid`` or ``fid_classifier`` at top level, then the details."""
        return {
            self.quality.metric: self.quality.value,
            "quality": self.quality.to_dict(),
            "sampling": {**self.sampling, "wall_s": self.sample_wall_s},
        }


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, well-mixed seeds for every (seed, epoch) pair (SeedSequence hashes its entropy).
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class GenerationTask:
    """DDPM training, fixed-noise validation and end-of-run sampling and scoring on one dataset.

    Args:
        data: the dataset (train batches come from the trainer; val/test splits are evaluated here; the test
            split is the real side of the Frechet distance).
        config: see :class:`GenerationConfig`.
        seed: the run's seed (training draws).

    Attributes:
        metric: ``"noise_mse"``: the per-epoch figure is the validation loss at fixed timesteps and noise.
        higher_is_better: False.
        quality_metric: ``"fid"`` or ``"fid_classifier"``: the record field of the end-of-run figure.
    """

    metric = "noise_mse"
    higher_is_better = False

    def __init__(self, data: DatasetSplits, config: GenerationConfig | None = None, seed: int = 0) -> None:
        import os

        self.data = data
        self.config = config or GenerationConfig()
        self.seed = int(seed)
        self.diffusion = Diffusion(self.config.timesteps, self.config.schedule)
        self.image_shape = (data.in_channels, data.image_size, data.image_size)
        self._inception = self.config.inception_weights or os.environ.get(ENV_INCEPTION_WEIGHTS) or None
        self.quality_metric = "fid" if self._inception else "fid_classifier"
        self._generator = torch.Generator().manual_seed(_epoch_seed(self.seed, 0))
        self._eval_noise: dict[tuple[int, ...], EvalNoise] = {}
        self._extractor: FeatureExtractor | None = None
        # The trainer's loader normalises with the dataset's statistics; the model works in [-1, 1].
        self._mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)

    # -- for the record ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """JSON-able settings: diffusion, sampling, image size (the record states the resize)."""
        return {
            "task": "generation",
            "diffusion": self.diffusion.describe(),
            "image_shape": list(self.image_shape),
            "model_input_range": "[-1, 1] (pixel / 127.5 - 1)",
            "config": asdict(self.config),
            "quality_metric": self.quality_metric,
            "real_images": f"{self.data.name} test split ({len(self.data.test)} images)",
        }

    # -- training ----------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Reseed the training draws for ``epoch`` (call at the start of every epoch, as the loader's)."""
        self._generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))

    @property
    def train_generator(self) -> torch.Generator:
        """The generator of this epoch's training draws (a sharded rank draws the global batch from it)."""
        return self._generator

    def from_loader(self, x: Tensor) -> Tensor:
        """A batch normalised with the dataset's mean/std (the trainer's loader) -> the model's [-1, 1]."""
        mean, std = self._mean.to(x.device, x.dtype), self._std.to(x.device, x.dtype)
        return (x * std + mean) * 2.0 - 1.0

    def batch_loss(
        self, model: nn.Module, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(mean noise MSE, MSE x batch size)`` of one training batch; labels are ignored.

        ``x`` comes normalised with the dataset's mean/std (the trainer's loader). Timesteps and noise are
        drawn from ``generator`` if given, else from the task's per-epoch generator. Both results stay on
        the device (the second is the "metric sum" a trainer averages over the epoch).
        """
        gen = generator if generator is not None else self._generator
        loss = self.diffusion.training_loss(model, self.from_loader(x), gen)
        return loss, loss.detach() * x.shape[0]

    def step_fn(self, model: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
        """One training step's loss for :func:`ssprop_energy.flops.count_step` / ``FlopMeter(step_fn=...)``."""
        return self.diffusion.training_loss(model, x, generator)

    # -- evaluation --------------------------------------------------------------------------------------

    def eval_noise(self, n: int) -> EvalNoise:
        """The fixed timesteps and noise for a split of ``n`` images (cached)."""
        key = (n, *self.image_shape)
        if key not in self._eval_noise:
            self._eval_noise[key] = self.diffusion.eval_noise(n, self.image_shape, self.config.eval_seed)
        return self._eval_noise[key]

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        split: TensorSplit,
        data: DatasetSplits | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        noise_std: float = 0.0,
    ) -> tuple[float, float]:
        """``(loss, metric)`` on ``split``: both the noise MSE at the fixed timesteps and noise of each image.

        ``data`` and ``batch_size`` are accepted for the trainer's call signature (the task knows its data;
        its own ``eval_batch`` applies). ``noise_std`` (input-noise robustness) has no meaning here.

        Raises:
            ConfigError: ``noise_std > 0``.
        """
        if noise_std:
            raise ConfigError("input-noise evaluation (noise_std) applies to classification, not to generation")
        device = torch.device(device) if device is not None else _model_device(model)
        was_training = model.training
        model.eval()
        try:
            x0 = to_model_range(split.images).to(device)
            loss = self.diffusion.fixed_loss(model, x0, self.eval_noise(len(split)), self.config.eval_batch)
        finally:
            model.train(was_training)
        return loss, loss

    # -- end of run --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model: nn.Module, device: torch.device | str | None = None) -> Tensor:
        """The fixed-seed samples: ``n_samples`` images, uint8 (n, C, H, W). Meter this call as sampling."""
        device = torch.device(device) if device is not None else _model_device(model)
        was_training = model.training
        model.eval()
        try:
            images = self.diffusion.sample(
                model, self.config.n_samples, self.image_shape, self.config.sample_seed, device, self.config.sample_batch
            )
        finally:
            model.train(was_training)
        return to_uint8(images)

    def use_extractor(self, extractor: FeatureExtractor) -> None:
        """Share an extractor already built (an experiment builds it once, before any arm, for all tasks)."""
        if extractor.metric != self.quality_metric:
            raise ConfigError(f"extractor {extractor.name!r} gives {extractor.metric}, this task expects {self.quality_metric}")
        self._extractor = extractor

    def extractor(self) -> FeatureExtractor:
        """The feature extractor (built once per task; the classifier is cached across runs)."""
        if self._extractor is None:
            self._extractor = select_extractor(
                self.data, self._inception, train_samples=self.config.classifier_train_samples
            )
        return self._extractor

    def score(self, samples: Tensor) -> QualityResult:
        """Frechet distance between ``samples`` and the test split, labelled by its extractor."""
        return measure_quality(self.extractor(), samples, self.data.test.images)

    def grid(self, samples: Tensor) -> bytes:
        """The samples as one PNG (``grid_columns`` per row, enlarged ``grid_scale`` times)."""
        return grid_png(samples, nrow=self.config.grid_columns, scale=self.config.grid_scale)

    def final(self, model: nn.Module, device: torch.device | str | None = None) -> GenerationResult:
        """Sample, score and draw the grid (a trainer that meters sampling apart calls the three itself)."""
        started = time.perf_counter()
        samples = self.sample(model, device)
        sample_wall_s = time.perf_counter() - started
        started = time.perf_counter()
        quality = self.score(samples)
        quality_wall_s = time.perf_counter() - started
        logger.info(
            "generated %d images in %.1f s; %s = %.4g (%s)",
            samples.shape[0], sample_wall_s, quality.metric, quality.value, quality.extractor,
        )
        return GenerationResult(
            samples=samples,
            quality=quality,
            grid_png=self.grid(samples),
            sample_wall_s=sample_wall_s,
            quality_wall_s=quality_wall_s,
            sampling=self.sampling_info(),
        )

    def sampling_info(self) -> dict[str, Any]:
        """How the samples were drawn, for the record."""
        return {
            "n_samples": self.config.n_samples,
            "seed": self.config.sample_seed,
            "timesteps": self.diffusion.timesteps,
            "sampler": "ancestral DDPM (all timesteps), x_0 clipped to [-1, 1]",
            "model_forwards_per_sample": self.diffusion.timesteps,
        }


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
