"""Verified downloads: resumable, checksummed, atomic.

A file is fetched to ``NAME.part`` with ``urllib``; an interrupted transfer resumes with an HTTP ``Range``
request when the server answers ``206``, and starts over when it ignores the range. Only when the MD5 of the
complete ``.part`` equals the published checksum is it renamed (atomically) to ``NAME``; a mismatch moves it to
``NAME.corrupt`` and raises :class:`ChecksumError`, so a bad file is never read and never resumed from.
A file already at ``NAME`` is verified again before every use.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ssprop_energy import __version__
from ssprop_energy.errors import ChecksumError, DataError, DownloadError

log = logging.getLogger(__name__)

ENV_DATA_DIR = "SSPROP_ENERGY_DATA"
ENV_MIRROR = "SSPROP_ENERGY_MIRROR"

_CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name, its published MD5 and the URLs to try, in order."""

    filename: str
    md5: str
    urls: tuple[str, ...]


def default_data_dir() -> Path:
    """``$SSPROP_ENERGY_DATA`` if set, else the per-user cache directory (platformdirs) plus ``/data``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("ssprop-energy")) / "data"


def mirror_urls(dataset: str, remote: RemoteFile, mirror: str | None) -> tuple[str, ...]:
    """The URLs to try for ``remote``: ``MIRROR/DATASET/FILENAME`` when a mirror is set (argument, else
    ``$SSPROP_ENERGY_MIRROR``), the canonical URLs otherwise. A mirror may be ``http(s)://`` or ``file://``
    (a shared folder laid out as ``DATASET/FILENAME``); its files are checked against the same MD5s."""
    base = mirror if mirror is not None else os.environ.get(ENV_MIRROR)
    if base:
        return (f"{base.rstrip('/')}/{dataset}/{remote.filename}",)
    return remote.urls


def md5_file(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, md5: str) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its MD5 is ``md5``."""
    actual = md5_file(path)
    if actual != md5:
        raise ChecksumError(
            f"{path}: MD5 {actual} does not match the published {md5} (corrupt or truncated); "
            "delete it to download it again"
        )


def find_verified(candidates: Sequence[Path], md5: str) -> Path | None:
    """The first of ``candidates`` that exists, after checking its MD5; None when none exists.

    A copy that exists but does not match is an error (:class:`ChecksumError` naming it), never skipped for
    the next candidate: a corrupt file a user pointed at must be heard of, not silently replaced by a download.
    """
    for path in candidates:
        if path.is_file():
            verify_file(path, md5)
            return path
    return None


def ensure_file(
    dataset: str,
    remote: RemoteFile,
    data_dir: Path,
    mirror: str | None = None,
    download: bool = True,
    attempts: int = 3,
    timeout_s: float = 60.0,
    elsewhere: Sequence[Path] = (),
) -> Path:
    """Return ``data_dir/dataset/filename``, verified, downloading it first if it is missing.

    ``elsewhere`` lists other places the same published file may already lie (a torchvision root); the first
    that exists is verified and used instead, and nothing is downloaded.

    Raises:
        ChecksumError: the cached or downloaded file does not match its published MD5.
        DownloadError: every URL failed.
        DataError: the file is missing and ``download`` is False.
    """
    found = find_verified(list(elsewhere), remote.md5)
    if found is not None:
        log.info("using %s (MD5 verified)", found)
        return found
    dest = Path(data_dir) / dataset / remote.filename
    if dest.exists():
        verify_file(dest, remote.md5)
        return dest
    if not download:
        raise DataError(f"{dest} is missing and downloading is off; place the published file there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if dest.exists():  # another process finished it while we waited for the lock
            verify_file(dest, remote.md5)
            return dest
        failures = []
        for url in mirror_urls(dataset, remote, mirror):
            try:
                return download_file(url, dest, remote.md5, attempts=attempts, timeout_s=timeout_s)
            except ChecksumError:
                raise
            except DownloadError as exc:
                failures.append(str(exc))
                log.warning("%s", exc)
    raise DownloadError(f"could not download {remote.filename}: " + " | ".join(failures))


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``: parallel runs (a sweep started as several processes)
    must not append to the same ``.part``. Where ``fcntl`` does not exist (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def download_file(
    url: str, dest: str | os.PathLike[str], md5: str, attempts: int = 3, timeout_s: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming across up to ``attempts`` tries.

    Returns:
        ``dest``, whose MD5 has been checked.

    Raises:
        ChecksumError: the complete download does not match ``md5`` (kept as ``dest.corrupt``).
        DownloadError: the transfer did not complete in ``attempts`` tries (the ``.part`` is kept so that a
            later call resumes it) or the server refused the request.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            if _fetch_once(url, part, timeout_s):
                break
            last_error = f"transfer ended early at {part.stat().st_size if part.exists() else 0} bytes"
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code != 416:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            last_error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        log.warning("download of %s, attempt %d/%d: %s", url, attempt, attempts, last_error)
    else:
        kept = f"; partial data kept in {part}" if part.exists() else ""
        raise DownloadError(f"{url}: {last_error} after {attempts} attempts{kept}")
    actual = md5_file(part)
    if actual != md5:
        corrupt = dest.with_name(dest.name + ".corrupt")
        os.replace(part, corrupt)
        raise ChecksumError(
            f"{url}: downloaded file has MD5 {actual}, the published MD5 is {md5}; kept for inspection as "
            f"{corrupt} and not used"
        )
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    log.info("downloaded %s to %s (MD5 verified)", url, dest)
    return dest


def _fetch_once(url: str, part: Path, timeout_s: float) -> bool:
    """One HTTP request appending to (or restarting) ``part``. True when the body arrived complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"ssprop-energy/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - http(s) URLs only
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The server cannot serve from our offset: the partial file is not a prefix of this file.
            log.warning("%s: server refused to resume at byte %d; restarting", url, offset)
            part.unlink()
        raise
    with response:
        total: int | None
        if offset and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != offset:
                log.warning("%s: unexpected Content-Range %r; restarting", url, response.headers.get("Content-Range"))
                part.unlink()
                return False
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
            log.info("%s: resuming at byte %d", url, offset)
        else:
            if offset:
                log.info("%s: server ignored the range request; restarting from byte 0", url)
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(part, mode) as fh:
            for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    size = part.stat().st_size
    if total is None:
        return True  # no length announced: the checksum is the only judge
    if size > total:
        log.warning("%s: %d bytes received, %d announced; restarting", url, size, total)
        part.unlink()
        return False
    return size == total


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
