"""Frechet distance against closed forms and scipy's sqrtm; sample grids decoded back pixel by pixel."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ssprop_energy.errors import ConfigError
from ssprop_energy.generation.frechet import frechet_distance, frechet_distance_of, gaussian_stats
from ssprop_energy.generation.grid import grid_array, grid_png, png_data_uri


def test_one_dimensional_gaussians():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # same eigenvectors: the matrices commute
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")  # installed with scikit-learn, a dependency
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    s1, s2 = x @ x.T + 0.1 * np.eye(10), y @ y.T
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)
    # symmetric in its arguments
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-8)


def test_identical_sets_give_zero_and_rank_deficient_sets_work():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 8))
    assert frechet_distance_of(feats, feats) == pytest.approx(0.0, abs=1e-9)
    few = rng.normal(size=(5, 64))  # covariance of rank 4 in 64 dimensions: FID with few samples
    assert frechet_distance_of(few, few) == pytest.approx(0.0, abs=1e-7)
    assert frechet_distance_of(few, few + 1.0) == pytest.approx(64.0, rel=1e-6)  # mean shift only


def test_samples_of_two_gaussians_converge_to_the_closed_form():
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 1.0, size=(200_000, 2))
    b = rng.normal(0.5, 2.0, size=(200_000, 2))
    # 2 dims x ((0.5)^2 + (2 - 1)^2) = 2.5
    assert frechet_distance_of(a, b) == pytest.approx(2.5, abs=0.05)


def test_bad_statistics():
    with pytest.raises(ConfigError):
        frechet_distance([0.0, 1.0], np.eye(2), [0.0], np.eye(1))
    with pytest.raises(ConfigError, match="non-finite"):
        frechet_distance([np.nan], [[1.0]], [0.0], [[1.0]])
    with pytest.raises(ConfigError):
        gaussian_stats(np.zeros((1, 3)))


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_grid_places_each_tile():
    images = torch.arange(5 * 1 * 3 * 3, dtype=torch.uint8).reshape(5, 1, 3, 3) * 3
    png = grid_png(images, nrow=2, padding=1)
    arr = _decode(png)
    assert arr.shape == (1 + 3 * 4, 1 + 2 * 4)  # 3 rows of 3+1 px, 2 columns
    for i in range(5):
        top, left = 1 + (i // 2) * 4, 1 + (i % 2) * 4
        assert np.array_equal(arr[top : top + 3, left : left + 3], images[i, 0].numpy())
    assert (arr[9:12, 5:8] == 255).all()  # the sixth cell is empty
    assert (arr[0] == 255).all() and (arr[:, 0] == 255).all()


def test_grid_rgb_scale_and_data_uri():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[1, 0] = 200  # red tile
    arr = grid_array(images, nrow=8, padding=0, scale=3)
    assert arr.shape == (6, 12, 3)
    assert (arr[:, 6:, 0] == 200).all() and (arr[:, :6] == 0).all()
    uri = png_data_uri(grid_png(images))
    assert uri.startswith("data:image/png;base64,")
    assert _decode(base64.b64decode(uri.split(",", 1)[1])).shape == (6, 2 + 2 * 4, 3)
    with pytest.raises(ConfigError):
        grid_png(images.float())
