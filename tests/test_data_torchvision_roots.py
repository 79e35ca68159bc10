"""``--data-dir`` pointed at a torchvision root: generated files in torchvision's layouts are found, verified
against the (test-substituted) published MD5s, read to the generated pixels, and never downloaded."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_data_download import cifar_planes, make_cifar_tarball, make_idx_set

from ssprop_energy.data import cifar, download, idx, load_dataset
from ssprop_energy.data.download import RemoteFile
from ssprop_energy.errors import ChecksumError, DataError


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any download attempt fails the test: the data is already there."""
    calls: list[str] = []

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        pytest.fail(f"tried to download {url} although the data is present")

    monkeypatch.setattr(download, "download_file", refuse)
    return calls


def publish_idx_md5(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes]) -> None:
    remotes = tuple(RemoteFile(r.filename, md5(files[r.filename]), r.urls) for r in idx.IDX_DATASETS[name])
    monkeypatch.setitem(idx.IDX_DATASETS, name, remotes)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_from_torchvision_raw_folder(monkeypatch, tmp_path, name, folder):
    data = make_idx_set()
    publish_idx_md5(monkeypatch, name, data["files"])
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    for fname, body in data["files"].items():
        (raw / fname).write_bytes(body)
        (raw / fname.removesuffix(".gz")).write_bytes(gzip.decompress(body))  # torchvision also extracts them
    ds = load_dataset(name, data_dir=tmp_path, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 12)
    # Pixel (0, 0) names the training image: every image is the generated one, with its label.
    for split in (ds.train, ds.val):
        for image, label in zip(split.images, split.labels):
            k = int(image[0, 0, 0])
            assert np.array_equal(image[0].numpy(), data["train_x"][k])
            assert int(label) == int(data["train_y"][k])
    assert np.array_equal(ds.test.images[:, 0].numpy(), data["test_x"])
    assert [f["path"] for f in ds.info["files"]] == [str(raw / r.filename) for r in idx.IDX_DATASETS[name]]
    assert not (tmp_path / name).exists()  # nothing copied into the project's own layout


def test_idx_corrupt_torchvision_file_is_an_error_not_a_download(monkeypatch, tmp_path):
    data = make_idx_set()
    publish_idx_md5(monkeypatch, "mnist", data["files"])
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for fname, body in data["files"].items():
        (raw / fname).write_bytes(body)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(data["files"]["t10k-labels-idx1-ubyte.gz"][:-3])
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_project_layout_still_works(monkeypatch, tmp_path):
    data = make_idx_set()
    publish_idx_md5(monkeypatch, "fashion-mnist", data["files"])
    own = tmp_path / "fashion-mnist"
    own.mkdir()
    for fname, body in data["files"].items():
        (own / fname).write_bytes(body)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.info["files"][0]["path"] == str(own / "train-images-idx3-ubyte.gz")


def publish_cifar_md5(monkeypatch: pytest.MonkeyPatch, name: str, body: bytes) -> None:
    remote = cifar.CIFAR_DATASETS[name]
    monkeypatch.setitem(cifar.CIFAR_DATASETS, name, RemoteFile(remote.filename, md5(body), remote.urls))


def extract(body: bytes, root: Path) -> dict[str, bytes]:
    """Unpack a generated tarball into ``root`` as torchvision does; returns member name -> bytes."""
    members = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        for info in tar:
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            path = root / info.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            members[info.name.rsplit("/", 1)[1]] = data
    return members


def check_cifar10(ds, train_labels, test_labels, n: int) -> None:
    assert (len(ds.train) + len(ds.val), len(ds.test)) == (5 * n, n)
    for split in (ds.train, ds.val):
        for image, label in zip(split.images, split.labels):
            k = int(image[1, 0, 0])
            assert image[0].flatten().tolist() == cifar_planes(k)[0]
            assert int(label) == train_labels[k]
    assert ds.test.labels.tolist() == test_labels


def test_cifar10_tarball_in_torchvision_root(monkeypatch, tmp_path):
    body, train_labels, test_labels = make_cifar_tarball("cifar10", n_per_batch=4)
    publish_cifar_md5(monkeypatch, "cifar10", body)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(body)
    extract(body, tmp_path)  # torchvision leaves both; the verified tarball is read
    ds = load_dataset("cifar10", data_dir=tmp_path)
    check_cifar10(ds, train_labels, test_labels, 4)
    assert ds.info["files"][0]["path"] == str(tmp_path / "cifar-10-python.tar.gz")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_extracted_folder_only(monkeypatch, tmp_path, name):
    body, train_labels, test_labels = make_cifar_tarball(name, n_per_batch=5)
    members = extract(body, tmp_path)
    md5s = {m: md5(data) for m, data in members.items() if m in cifar.CIFAR_MEMBER_MD5[name]}
    monkeypatch.setitem(cifar.CIFAR_MEMBER_MD5, name, md5s)
    ds = load_dataset(name, data_dir=tmp_path)
    if name == "cifar10":
        check_cifar10(ds, train_labels, test_labels, 5)
    else:
        assert sorted(ds.train.labels.tolist() + ds.val.labels.tolist()) == sorted(train_labels)
        assert ds.test.labels.tolist() == test_labels
    folder = cifar.CIFAR_LAYOUT[name][0]
    assert {Path(f["path"]).parent for f in ds.info["files"]} == {tmp_path / folder}


def test_cifar_extracted_batch_with_wrong_md5_is_named(monkeypatch, tmp_path):
    body, _, _ = make_cifar_tarball("cifar10", n_per_batch=3)
    members = extract(body, tmp_path)
    md5s = {m: md5(data) for m, data in members.items() if m in cifar.CIFAR_MEMBER_MD5["cifar10"]}
    monkeypatch.setitem(cifar.CIFAR_MEMBER_MD5, "cifar10", md5s)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(members["data_batch_3"][:-1])
    with pytest.raises(ChecksumError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_extracted_folder_missing_a_batch_is_named(monkeypatch, tmp_path):
    body, _, _ = make_cifar_tarball("cifar10", n_per_batch=3)
    extract(body, tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_torchvision_member_md5s_are_the_published_ones():
    # torchvision/datasets/cifar.py (CIFAR10.train_list/test_list, CIFAR100.train_list/test_list)
    assert cifar.CIFAR_MEMBER_MD5["cifar10"]["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert cifar.CIFAR_MEMBER_MD5["cifar10"]["test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert cifar.CIFAR_MEMBER_MD5["cifar100"] == {
        "train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    }
    assert set(cifar.CIFAR_MEMBER_MD5["cifar10"]) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}


def test_empty_root_still_downloads_to_the_project_layout(monkeypatch, tmp_path, no_download):
    # With nothing present the download path is taken (here refused, so the test sees the attempt).
    monkeypatch.setattr(download, "download_file", lambda url, dest, *a, **k: no_download.append(url) or (_ for _ in ()).throw(download.DownloadError("offline")))
    with pytest.raises(DataError):
        load_dataset("cifar10", data_dir=tmp_path, mirror="http://127.0.0.1:9")
    assert no_download == ["http://127.0.0.1:9/cifar10/cifar-10-python.tar.gz"]
