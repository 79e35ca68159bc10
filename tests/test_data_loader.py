"""BatchLoader: normalisation against a float64 reference, order fixed by (seed, epoch), batch bookkeeping."""

from __future__ import annotations

import pytest
import torch

from ssprop_energy.data import BatchLoader, TensorSplit
from ssprop_energy.errors import ConfigError


def make_split(n: int = 10, channels: int = 3, size: int = 4) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # pixel names the sample
    return TensorSplit(images, torch.arange(n, dtype=torch.int64) % 7)


def ids(loader: BatchLoader) -> list[int]:
    """Sample ids in serving order, read back from the un-normalised pixel (0, 0, 0)."""
    out = []
    scale, shift = float(loader._scale[0, 0, 0, 0]), float(loader._shift[0, 0, 0, 0])
    for x, _ in loader:
        out += [round((float(v) + shift) / scale) for v in x[:, 0, 0, 0]]
    return out


def test_normalisation_matches_totensor_then_normalize():
    split = make_split()
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    loader = BatchLoader(split, batch_size=4, shuffle=False, mean=mean, std=std)
    x, y = next(iter(loader))
    ref = (split.images[:4].double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=2e-6)
    assert torch.equal(y, split.labels[:4])


def test_without_mean_and_std_pixels_are_scaled_to_unit_range():
    split = make_split(channels=1)
    x, _ = next(iter(BatchLoader(split, batch_size=10, shuffle=False)))
    torch.testing.assert_close(x, split.images.float() / 255, rtol=0, atol=1e-7)


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    split = make_split(n=10)
    a = BatchLoader(split, batch_size=3, seed=11)
    b = BatchLoader(split, batch_size=3, seed=11)
    epoch0 = ids(a)
    assert sorted(epoch0) == list(range(10))
    torch.manual_seed(123)  # the global RNG must not matter
    assert ids(b) == epoch0
    a.set_epoch(1)
    epoch1 = ids(a)
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0
    # Resuming at epoch 1 in a fresh loader replays epoch 1 exactly; going back replays epoch 0.
    c = BatchLoader(split, batch_size=3, seed=11)
    c.set_epoch(1)
    assert ids(c) == epoch1
    c.set_epoch(0)
    assert ids(c) == epoch0
    assert ids(BatchLoader(split, batch_size=3, seed=12)) != epoch0
    assert a.order(1).tolist() == epoch1


def test_labels_follow_their_images():
    split = make_split(n=10)
    loader = BatchLoader(split, batch_size=4, seed=3)
    for x, y in loader:
        sample = [round(float(v) * 255) for v in x[:, 0, 0, 0]]
        assert y.tolist() == [s % 7 for s in sample]


def test_no_shuffle_serves_the_stored_order():
    loader = BatchLoader(make_split(n=10), batch_size=4, shuffle=False)
    loader.set_epoch(5)
    assert ids(loader) == list(range(10))


def test_batch_count_and_drop_last():
    split = make_split(n=10)
    loader = BatchLoader(split, batch_size=4)
    assert len(loader) == 3 and [x.shape[0] for x, _ in loader] == [4, 4, 2]
    dropping = BatchLoader(split, batch_size=4, drop_last=True)
    assert len(dropping) == 2 and [x.shape[0] for x, _ in dropping] == [4, 4]
    assert loader.num_samples == 10


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"batch_size": 2, "mean": (0.5,)}, {"batch_size": 2, "std": (1.0, 0.0, 1.0)}, {"batch_size": 2, "seed": -1}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        BatchLoader(make_split(), **kwargs)


def test_negative_epoch_is_refused():
    with pytest.raises(ConfigError):
        BatchLoader(make_split(), batch_size=2).set_epoch(-1)
