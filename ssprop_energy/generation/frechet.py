"""The Frechet distance between two Gaussians fitted to feature vectors (the arithmetic of FID).

``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` (Dowson & Landau 1982; Heusel et
al. 2017). The trace term is computed from two symmetric eigendecompositions: ``S1^(1/2)`` from ``S1``'s, then
the eigenvalues of the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``. Its square roots are real, so there is no
complex ``sqrtm`` result to discard; tiny negative eigenvalues from rounding are clipped to 0.
"""

from __future__ import annotations

import numpy as np

from ssprop_energy.errors import ConfigError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of ``features`` (N, D) in float64 (N >= 2)."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ConfigError(f"need a (N >= 2, D) feature array, got shape {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the number FID reports).

    Raises:
        ConfigError: mismatched or non-square shapes, or non-finite input.
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ConfigError(f"Frechet distance needs means (D,) and covariances (D, D): {m1.shape}, {s1.shape}, "
                          f"{m2.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ConfigError("Frechet distance of non-finite statistics (NaN or inf in the features)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # covariances are symmetric; remove rounding asymmetry
    root1 = _sym_sqrt(s1)
    inner = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)
    return max(value, 0.0)  # a distance; a value below 0 is rounding of identical statistics


def frechet_distance_of(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
