"""The generation task (the paper's DDPM experiments): diffusion, sample quality, sample grids.

- :mod:`.diffusion`: cosine-schedule Gaussian diffusion, noise-prediction loss, fixed-noise validation loss,
  ancestral sampler;
- :mod:`.frechet`: the Frechet distance between two Gaussians fitted to features;
- :mod:`.features`: feature extractors (standard Inception-v3 via torch-fidelity where its weights file is
  given, else a small classifier trained once on the same dataset and cached);
- :mod:`.grid`: a grid of samples as PNG bytes / a data URI for the report;
- :mod:`.task`: :class:`GenerationTask`, what a trainer calls for this task.
"""

from __future__ import annotations

from ssprop_energy.generation.diffusion import DEFAULT_TIMESTEPS, Diffusion, EvalNoise, to_model_range, to_uint8
from ssprop_energy.generation.features import (
    ENV_INCEPTION_WEIGHTS,
    QualityResult,
    classifier_extractor,
    inception_extractor,
    measure_quality,
    select_extractor,
)
from ssprop_energy.generation.frechet import frechet_distance, frechet_distance_of, gaussian_stats
from ssprop_energy.generation.grid import grid_png, png_data_uri
from ssprop_energy.generation.task import GenerationConfig, GenerationResult, GenerationTask

__all__ = [
    "DEFAULT_TIMESTEPS",
    "Diffusion",
    "ENV_INCEPTION_WEIGHTS",
    "EvalNoise",
    "GenerationConfig",
    "GenerationResult",
    "GenerationTask",
    "QualityResult",
    "classifier_extractor",
    "frechet_distance",
    "frechet_distance_of",
    "gaussian_stats",
    "grid_png",
    "inception_extractor",
    "measure_quality",
    "png_data_uri",
    "select_extractor",
    "to_model_range",
    "to_uint8",
]
