"""Dataset readers without a network: digits, folder, synthetic, IDX parsing, splits, resize, statistics."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ssprop_energy.data import DIGITS_DEFAULT_IMAGE_SIZE, load_dataset
from ssprop_energy.data.base import (
    TensorSplit,
    channel_stats,
    random_split_indices,
    resize_uint8,
    stratified_split_indices,
)
from ssprop_energy.data.idx import parse_idx
from ssprop_energy.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits_native():
    return load_dataset("digits", image_size=8, seed=0)


def _rows(split: TensorSplit) -> list[tuple[bytes, int]]:
    return [(img.numpy().tobytes(), int(lbl)) for img, lbl in zip(split.images, split.labels)]


def test_digits_is_the_sklearn_data_split_60_20_20_by_class(digits_native):
    from sklearn.datasets import load_digits

    ref = load_digits()
    ref_rows = sorted(
        (np.rint(img * 255 / 16).astype(np.uint8)[None].tobytes(), int(t)) for img, t in zip(ref.images, ref.target)
    )
    ds = digits_native
    got = sorted(_rows(ds.train) + _rows(ds.val) + _rows(ds.test))
    assert got == ref_rows  # a partition of all 1797 images, labels kept, pixels 0..16 -> 0..255
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1079, 359, 359)
    counts = np.bincount(ref.target, minlength=10)
    for split, frac in ((ds.val, 0.2), (ds.test, 0.2)):
        per_class = np.bincount(split.labels.numpy(), minlength=10)
        assert np.all(np.abs(per_class - counts * frac) <= 0.5 + 1e-9)
    assert int(ds.train.images.max()) == 255 and int(ds.train.images.min()) == 0
    assert (ds.num_classes, ds.in_channels) == (10, 1)
    json.dumps(ds.info)  # the record entry must be JSON-able


def test_digits_default_size_and_normalisation():
    ds = load_dataset()
    assert ds.name == "digits" and ds.image_size == DIGITS_DEFAULT_IMAGE_SIZE == 16
    assert ds.train.images.shape[1:] == (1, 16, 16)
    x = ds.train.images.double() / 255
    assert ds.mean[0] == pytest.approx(float(x.mean()), rel=1e-12)
    assert ds.std[0] == pytest.approx(float(x.std(unbiased=False)), rel=1e-12)
    assert ds.info["resize"] == {"from": [8, 8], "to": [16, 16], "method": "bilinear", "antialias": True}
    assert ds.info["split_sizes"] == {"train": 1079, "val": 359, "test": 359}


def test_digits_split_depends_on_seed_only(digits_native):
    again = load_dataset("digits", image_size=8, seed=0)
    other = load_dataset("digits", image_size=8, seed=1)
    assert torch.equal(again.val.images, digits_native.val.images)
    assert not torch.equal(other.val.images, digits_native.val.images)


def test_resize_upsamples_bilinearly():
    # Columns 0 and 255, doubled with half-pixel centres: sources at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    img = torch.tensor([[0, 255], [0, 255]], dtype=torch.uint8).view(1, 1, 2, 2)
    out = resize_uint8(img, 4)
    assert out.dtype == torch.uint8
    assert out[0, 0].tolist() == [[0, 64, 191, 255]] * 4
    assert resize_uint8(img, 2) is img


def test_resize_keeps_constant_images_constant():
    img = torch.full((3, 2, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize_uint8(img, 5), torch.full((3, 2, 5, 5), 77, dtype=torch.uint8))


def test_stratified_split_is_a_partition_with_class_proportions():
    labels = np.repeat(np.arange(4), [10, 20, 30, 41])
    parts = stratified_split_indices(labels, (0.6, 0.2, 0.2), seed=5)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(labels.size))
    for cls, n in enumerate([10, 20, 30, 41]):
        assert np.sum(labels[parts[1]] == cls) == round(n * 0.2)
    again = stratified_split_indices(labels, (0.6, 0.2, 0.2), seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_random_split_sizes_follow_the_paper():
    train, val = random_split_indices(50_001, (0.8, 0.2), seed=0)
    assert (train.size, val.size) == (40_000, 10_001)  # int(0.8 n), the remainder
    assert np.intersect1d(train, val).size == 0


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 3, 4, 5), dtype=np.uint8)
    mean, std = channel_stats(torch.from_numpy(imgs))
    x = imgs.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-12)


def test_parse_idx_types_and_errors():
    values = np.array([[1, -2], [70000, 3]], dtype=">i4")
    data = struct.pack(">BBBBII", 0, 0, 0x0C, 2, 2, 2) + values.tobytes()
    np.testing.assert_array_equal(parse_idx(data), [[1, -2], [70000, 3]])
    with pytest.raises(DataError, match="x.idx.*truncated"):
        parse_idx(data[:-1], "x.idx")
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01" + data[1:])
    with pytest.raises(DataError, match="type code"):
        parse_idx(struct.pack(">BBBBI", 0, 0, 0x07, 1, 0))


def test_tensor_split_validates_types():
    with pytest.raises(DataError):
        TensorSplit(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError):
        TensorSplit(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------- folder


def _write_folder(root, grey_only: bool = False, sizes=((6, 6),)):
    pixels = {}
    for c, cls in enumerate(["cat", "ant", "bee"]):  # class order must be sorted: ant=0, bee=1, cat=2
        (root / cls).mkdir(parents=True)
        for i in range(5):
            w, h = sizes[i % len(sizes)]
            value = 40 * c + 7 * i
            if grey_only or i % 2:
                img = Image.new("L", (w, h), color=value)
            else:
                img = Image.new("RGB", (w, h), color=(value, value + 1, value + 2))
            img.save(root / cls / f"{i}.png")
            pixels[(cls, i)] = value
    (root / "cat" / "notes.txt").write_text("not an image")
    return pixels


def test_folder_reads_classes_and_pixels(tmp_path):
    _write_folder(tmp_path)
    ds = load_dataset(f"folder:{tmp_path}", seed=0)
    assert ds.info["classes"] == ["ant", "bee", "cat"]
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (3, 3, 6)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 3)
    class_index = {"ant": 0, "bee": 1, "cat": 2}
    expected = set()
    for cls, c in (("cat", 0), ("ant", 1), ("bee", 2)):
        for i in range(5):
            v = 40 * c + 7 * i
            rgb = (v, v, v) if i % 2 else (v, v + 1, v + 2)  # grey files become R = G = B
            expected.add((class_index[cls], rgb))
    got = set()
    for split in (ds.train, ds.val, ds.test):
        for img, lbl in zip(split.images, split.labels):
            assert torch.all(img == img[:, :1, :1])  # uniform images stay uniform
            got.add((int(lbl), tuple(int(v) for v in img[:, 0, 0])))
    assert got == expected


def test_folder_grey_images_give_one_channel_and_resize(tmp_path):
    _write_folder(tmp_path, grey_only=True, sizes=((6, 6), (9, 4)))
    with pytest.raises(DataError, match="image_size"):
        load_dataset(f"folder:{tmp_path}")
    ds = load_dataset(f"folder:{tmp_path}", image_size=5)
    assert ds.train.images.shape[1:] == (1, 5, 5)
    assert ds.info["resize"] == {"to": [5, 5], "method": "PIL bilinear"}


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path}")
    _write_folder(tmp_path)
    bad = tmp_path / "ant" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=str(bad)):
        load_dataset(f"folder:{tmp_path}")


# --------------------------------------------------------------------------------------------- synthetic, names


def test_synthetic_shape_and_determinism():
    ds = load_dataset("synthetic:3x12x12:5:40", seed=2)
    assert ds.train.images.shape == (40, 3, 12, 12) and len(ds.val) == len(ds.test) == 10
    assert ds.num_classes == 5 and int(ds.train.labels.max()) < 5
    assert torch.equal(load_dataset("synthetic:3x12x12:5:40", seed=2).train.images, ds.train.images)
    assert load_dataset("synthetic:1x8x8").train.images.shape == (1024, 1, 8, 8)


@pytest.mark.parametrize("name", ["synthetic", "synthetic:3x32", "synthetic:3x32x16", "synthetic:0x8x8"])
def test_synthetic_needs_a_valid_shape(name):
    with pytest.raises(ConfigError, match="synthetic"):
        load_dataset(name)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "folder:PATH", "synthetic"):
        assert name in str(err.value)
