"""Downloads against a local HTTP server on 127.0.0.1 serving files in the real formats (IDX gz, CIFAR
pickle tarball): download, checksum mismatch, truncation, resume, and parsing against the generated values."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from ssprop_energy.data import cifar, idx, load_dataset
from ssprop_energy.data.download import RemoteFile, default_data_dir, download_file, ensure_file
from ssprop_energy.errors import ChecksumError, DataError, DownloadError

# --------------------------------------------------------------------------------------------- the server


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    support_range: bool = True
    truncate_next: dict[str, int] = field(default_factory=dict)  # path -> how many more responses to cut short
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self.state
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if range_header and state.support_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state.truncate_next.get(self.path, 0) > 0:
            state.truncate_next[self.path] -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------------- generators


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written from the format description: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_idx_set(n_train: int = 50, n_test: int = 12) -> dict[str, object]:
    rng = np.random.default_rng(7)
    train_x = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    train_x[:, 0, 0] = np.arange(n_train)  # pixel (0, 0) names the image, to find it after the split
    test_x = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, size=n_train).astype(np.uint8)
    test_y = rng.integers(0, 10, size=n_test).astype(np.uint8)
    files = {
        "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(train_x)),
        "train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(train_y)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(test_x)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(test_y)),
    }
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "files": files}


def publish_idx(monkeypatch: pytest.MonkeyPatch, state: ServerState, name: str, files: dict[str, bytes]) -> None:
    """Serve ``files`` under /NAME/ and make their MD5s the 'published' ones (the real ones are for the real
    data, which tests never fetch)."""
    remotes = tuple(
        RemoteFile(r.filename, md5(files[r.filename]), r.urls) for r in idx.IDX_DATASETS[name]
    )
    monkeypatch.setitem(idx.IDX_DATASETS, name, remotes)
    for fname, body in files.items():
        state.files[f"/{name}/{fname}"] = body


def cifar_planes(k: int) -> tuple[list[int], list[int], list[int]]:
    """Image k of the generated CIFAR set as its three 1024-value planes (row-major 32x32)."""
    red = [(k + x) % 256 for y in range(32) for x in range(32)]
    green = [(3 * y + k) % 256 for y in range(32) for x in range(32)]
    blue = [(x * y + 5) % 256 for y in range(32) for x in range(32)]
    return red, green, blue


def cifar_batch(indices: range, labels: list[int], label_key: str, bytes_keys: bool) -> bytes:
    rows = [sum(cifar_planes(k), []) for k in indices]
    batch = {"batch_label": "generated", label_key: labels, "data": np.array(rows, dtype=np.uint8), "filenames": []}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [v // 5 for v in labels]
    if bytes_keys:
        batch = {key.encode(): value for key, value in batch.items()}
    return pickle.dumps(batch, protocol=2)


def make_cifar_tarball(
    dataset: str, n_per_batch: int, bytes_keys: bool = False, skip: str = ""
) -> tuple[bytes, list[int], list[int]]:
    """A CIFAR python tarball, its members stored in reverse order with a readme among them: the reader
    must not depend on the archive's member order."""
    folder, train_members, test_members, label_key, num_classes = cifar.CIFAR_LAYOUT[dataset]
    train_labels: list[int] = []
    test_labels: list[int] = []
    entries: list[tuple[str, bytes]] = []
    k = 0
    for members, labels in ((train_members, train_labels), (test_members, test_labels)):
        for member in members:
            batch_labels = [(k + i) % num_classes for i in range(n_per_batch)]
            entries.append((member, cifar_batch(range(k, k + n_per_batch), batch_labels, label_key, bytes_keys)))
            labels += batch_labels
            k += n_per_batch
    entries.insert(1, ("readme.html", b"<html></html>"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, data in reversed(entries):
            if member == skip:
                continue
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), train_labels, test_labels


def publish_cifar(monkeypatch: pytest.MonkeyPatch, state: ServerState, name: str, body: bytes) -> None:
    remote = cifar.CIFAR_DATASETS[name]
    monkeypatch.setitem(cifar.CIFAR_DATASETS, name, RemoteFile(remote.filename, md5(body), remote.urls))
    state.files[f"/{name}/{remote.filename}"] = body


# --------------------------------------------------------------------------------------------- IDX datasets


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_download_parses_pixels_and_labels(server, monkeypatch, tmp_path, name):
    url, state = server
    gen = make_idx_set()
    publish_idx(monkeypatch, state, name, gen["files"])
    ds = load_dataset(name, data_dir=tmp_path, mirror=url, seed=3)

    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 12)  # 80/20 of 50, official test
    seen = []
    for split in (ds.train, ds.val):
        ids = split.images[:, 0, 0, 0].numpy().astype(int)
        seen += list(ids)
        np.testing.assert_array_equal(split.images[:, 0].numpy(), gen["train_x"][ids])
        np.testing.assert_array_equal(split.labels.numpy(), gen["train_y"][ids].astype(np.int64))
    assert sorted(seen) == list(range(50))  # a partition of the official train set
    np.testing.assert_array_equal(ds.test.images[:, 0].numpy(), gen["test_x"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), gen["test_y"])
    assert ds.mean == idx.IDX_NORMALIZATION[name][0]
    assert {f["name"]: f["md5"] for f in ds.info["files"]} == {k: md5(v) for k, v in gen["files"].items()}
    assert sorted(p for p, _ in state.requests) == sorted(f"/{name}/{f}" for f in gen["files"])
    record = json.loads(json.dumps(ds.info))  # goes into the run record as is
    assert record["split"] == {"method": "random", "train_val_fractions": [0.8, 0.2], "seed": 3, "test": "official"}
    assert record["split_sizes"] == {"train": 40, "val": 10, "test": 12} and record["resize"] is None

    # A second load uses the verified cache and makes no request; the split is the same for the same seed.
    state.requests.clear()
    again = load_dataset(name, data_dir=tmp_path, mirror=url, seed=3)
    assert state.requests == []
    assert again.val.images.equal(ds.val.images)
    other = load_dataset(name, data_dir=tmp_path, mirror=url, seed=4)
    assert not other.val.images.equal(ds.val.images)


def test_mirror_from_environment(server, monkeypatch, tmp_path):
    url, state = server
    publish_idx(monkeypatch, state, "mnist", make_idx_set()["files"])
    monkeypatch.setenv("SSPROP_ENERGY_MIRROR", url + "/")
    ds = load_dataset("mnist", data_dir=tmp_path, image_size=32)
    assert ds.train.images.shape[1:] == (1, 32, 32)
    assert ds.info["resize"] == {"from": [28, 28], "to": [32, 32], "method": "bilinear", "antialias": True}
    assert len(state.requests) == 4


def test_default_data_dir_comes_from_environment(server, monkeypatch, tmp_path):
    url, state = server
    publish_idx(monkeypatch, state, "mnist", make_idx_set()["files"])
    monkeypatch.setenv("SSPROP_ENERGY_DATA", str(tmp_path / "cache"))
    load_dataset("mnist", mirror=url)
    assert (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_default_data_dir_falls_back_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("SSPROP_ENERGY_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "ssprop-energy" / "data"


# --------------------------------------------------------------------------------------------- failures


def test_checksum_mismatch_is_an_error_and_the_file_is_never_used(server, monkeypatch, tmp_path):
    url, state = server
    gen = make_idx_set()
    publish_idx(monkeypatch, state, "mnist", gen["files"])
    state.files["/mnist/train-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(np.zeros(50, np.uint8)))
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", data_dir=tmp_path, mirror=url)
    corrupt = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz.corrupt"
    assert str(corrupt) in str(err.value)
    assert corrupt.is_file()
    assert not (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").exists()
    assert not (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz.part").exists()


def test_corrupt_cached_file_is_reported_with_its_path(server, monkeypatch, tmp_path):
    url, state = server
    gen = make_idx_set()
    publish_idx(monkeypatch, state, "mnist", gen["files"])
    load_dataset("mnist", data_dir=tmp_path, mirror=url)
    cached = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-10])  # truncated on disk after the fact
    state.requests.clear()
    with pytest.raises(ChecksumError, match=str(cached)):
        load_dataset("mnist", data_dir=tmp_path, mirror=url)
    assert state.requests == []  # neither re-fetched nor silently replaced
    assert cached.stat().st_size == len(gen["files"]["t10k-images-idx3-ubyte.gz"]) - 10


def test_truncated_transfer_resumes_with_range(server, tmp_path):
    url, state = server
    body = os.urandom(100_001)
    state.files["/f.bin"] = body
    state.truncate_next["/f.bin"] = 1
    dest = download_file(f"{url}/f.bin", tmp_path / "f.bin", md5(body), attempts=2)
    assert dest.read_bytes() == body
    assert state.requests == [("/f.bin", None), ("/f.bin", f"bytes={len(body) // 2}-")]


def test_server_without_range_support_restarts(server, tmp_path):
    url, state = server
    body = os.urandom(50_000)
    state.files["/f.bin"] = body
    state.support_range = False
    state.truncate_next["/f.bin"] = 1
    dest = download_file(f"{url}/f.bin", tmp_path / "f.bin", md5(body), attempts=2)
    assert dest.read_bytes() == body  # not the first half twice
    assert state.requests[1] == ("/f.bin", "bytes=25000-")


def test_interrupted_download_keeps_part_and_a_later_call_resumes(server, tmp_path):
    url, state = server
    body = os.urandom(80_000)
    state.files["/f.bin"] = body
    state.truncate_next["/f.bin"] = 1
    part = tmp_path / "f.bin.part"
    with pytest.raises(DownloadError, match=str(part)):
        download_file(f"{url}/f.bin", tmp_path / "f.bin", md5(body), attempts=1)
    assert part.read_bytes() == body[:40_000]
    assert not (tmp_path / "f.bin").exists()
    download_file(f"{url}/f.bin", tmp_path / "f.bin", md5(body), attempts=1)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert state.requests[-1] == ("/f.bin", "bytes=40000-")
    assert not part.exists()


def test_part_longer_than_the_file_restarts(server, tmp_path):
    url, state = server
    body = os.urandom(1000)
    state.files["/f.bin"] = body
    (tmp_path / "f.bin.part").write_bytes(os.urandom(2000))  # a stale .part of some other file
    download_file(f"{url}/f.bin", tmp_path / "f.bin", md5(body), attempts=2)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert state.requests == [("/f.bin", "bytes=2000-"), ("/f.bin", None)]


def test_http_404_fails_without_retrying(server, tmp_path):
    url, state = server
    remote = RemoteFile("missing.bin", "0" * 32, (f"{url}/canonical/missing.bin",))
    with pytest.raises(DownloadError, match="HTTP 404"):
        ensure_file("x", remote, tmp_path, mirror="", attempts=3)
    assert len(state.requests) == 1


def test_missing_file_without_download_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="downloading is off"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_tarball_parses_planes_and_labels(server, monkeypatch, tmp_path, bytes_keys):
    url, state = server
    body, train_labels, test_labels = make_cifar_tarball("cifar10", n_per_batch=4, bytes_keys=bytes_keys)
    publish_cifar(monkeypatch, state, "cifar10", body)
    ds = load_dataset("cifar10", data_dir=tmp_path, mirror=url, seed=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (16, 4, 4)  # 80/20 of 5 x 4, official test of 4
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    # Identify train/val images by their green plane at row 0 (= k); compare every pixel with the planes.
    ids = []
    for split in (ds.train, ds.val):
        for image, label in zip(split.images, split.labels):
            k = int(image[1, 0, 0])
            ids.append(k)
            planes = cifar_planes(k)
            for c in range(3):
                assert image[c].flatten().tolist() == planes[c]
            assert int(label) == train_labels[k]
    assert sorted(ids) == list(range(20))
    for i, (image, label) in enumerate(zip(ds.test.images, ds.test.labels)):
        assert image[0].flatten().tolist() == cifar_planes(20 + i)[0]
        assert int(label) == test_labels[i]
    assert ds.std == cifar.CIFAR_NORMALIZATION["cifar10"][1]


def test_cifar100_uses_fine_labels(server, monkeypatch, tmp_path):
    url, state = server
    body, train_labels, test_labels = make_cifar_tarball("cifar100", n_per_batch=30)
    publish_cifar(monkeypatch, state, "cifar100", body)
    ds = load_dataset("cifar100", data_dir=tmp_path, mirror=url, image_size=16)
    assert ds.num_classes == 100
    assert ds.train.images.shape[1:] == (3, 16, 16)
    assert sorted(ds.train.labels.tolist() + ds.val.labels.tolist()) == sorted(train_labels)
    assert ds.test.labels.tolist() == test_labels


def test_cifar_truncated_download_resumes(server, monkeypatch, tmp_path):
    url, state = server
    body, _, _ = make_cifar_tarball("cifar10", n_per_batch=2)
    publish_cifar(monkeypatch, state, "cifar10", body)
    state.truncate_next["/cifar10/cifar-10-python.tar.gz"] = 1
    ds = load_dataset("cifar10", data_dir=tmp_path, mirror=url)
    assert len(ds.test) == 2
    assert [r for _, r in state.requests] == [None, f"bytes={len(body) // 2}-"]


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    buf = io.BytesIO()
    data = pickle.dumps({"data": _Evil(), "labels": []}, protocol=2)
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="not allowed"):
        cifar.read_cifar_tarball(path, "cifar10")


def test_cifar_truncated_tarball_is_a_data_error_naming_it(tmp_path):
    body, _, _ = make_cifar_tarball("cifar10", n_per_batch=2)
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(body[: len(body) // 2])
    with pytest.raises(DataError, match=str(path)):
        cifar.read_cifar_tarball(path, "cifar10")


def test_published_checksums_are_the_torchvision_values():
    # Guard against an accidental edit: these are the MD5s torchvision publishes for the real files.
    assert {r.filename: r.md5 for r in idx.IDX_DATASETS["mnist"]}["train-images-idx3-ubyte.gz"] == (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    )
    assert {r.filename: r.md5 for r in idx.IDX_DATASETS["fashion-mnist"]}["t10k-labels-idx1-ubyte.gz"] == (
        "bb300cfdad3c16e7a12a480ee83cd310"
    )
    assert cifar.CIFAR_DATASETS["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.CIFAR_DATASETS["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_cifar_missing_member_is_named(tmp_path):
    body, _, _ = make_cifar_tarball("cifar10", n_per_batch=2, skip="data_batch_3")
    path = tmp_path / "c.tar.gz"
    path.write_bytes(body)
    with pytest.raises(DataError, match="data_batch_3 missing"):
        cifar.read_cifar_tarball(path, "cifar10")


def test_concurrent_fetches_download_once(server, tmp_path):
    url, state = server
    body = os.urandom(200_000)
    state.files["/d/f.bin"] = body
    remote = RemoteFile("f.bin", md5(body), ())
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_file("d", remote, tmp_path, mirror=url)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "d" / "f.bin"] * 3
    assert state.requests == [("/d/f.bin", None)]


def test_mirror_can_be_a_local_directory(monkeypatch, tmp_path):
    gen = make_idx_set()
    remotes = tuple(RemoteFile(r.filename, md5(gen["files"][r.filename]), r.urls) for r in idx.IDX_DATASETS["mnist"])
    monkeypatch.setitem(idx.IDX_DATASETS, "mnist", remotes)
    (tmp_path / "mirror" / "mnist").mkdir(parents=True)
    for fname, body in gen["files"].items():
        (tmp_path / "mirror" / "mnist" / fname).write_bytes(body)
    ds = load_dataset("mnist", data_dir=tmp_path / "data", mirror=(tmp_path / "mirror").as_uri())
    np.testing.assert_array_equal(ds.test.labels.numpy(), gen["test_y"])
