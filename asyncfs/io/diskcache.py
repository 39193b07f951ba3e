"""``DiskCache``: the persistent local cache of a remote object (``-o cache_dir=``), so a second
mount of the same object starts warm.

One directory per object version under the cache directory, named by a hash of the object's
identity (its URL without the query string, which carries presigned signatures, its ETag, or
its Last-Modified where it has no ETag, and its size). A changed object therefore never finds
the old version's bytes; old versions are evicted, oldest first, when the cache directory
would outgrow its bound. Inside, ``meta.json`` repeats the identity (a directory whose
``meta.json`` does not match is stale and removed), ``data`` is a sparse file the size of the
object, and ``index`` holds 8 bytes per block: its CRC32C and a presence mark. A block's data is
written before its index entry, and every read checks the CRC: a block that fails it (a torn
write, a damaged disk, an edit by hand) makes the whole object's cache be dropped and the
block fetched again. One mount at a time owns a directory (``flock``); a second mount of the
same object runs without the disk cache.

Sync code, thread-safe: the device calls ``get``/``put`` from worker threads and
``get_nowait`` (``RWF_NOWAIT``: only what the host already caches) on the trio thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
from pathlib import Path

import crc32c

log = logging.getLogger(__name__)

FORMAT = 1
_MARK = 0x41534643  # "ASFC": the block's data and CRC are in place
_ENTRY = struct.Struct("<II")


def cache_key(url: str, etag: str | None, last_modified: str | None, size: int) -> str:
    base = url.split("?", 1)[0]
    ident = f"{base}\0{etag or ''}\0{'' if etag else last_modified or ''}\0{size}"
    return hashlib.sha256(ident.encode()).hexdigest()[:40]


def _dir_bytes(path: Path) -> int:
    total = 0
    for name in ("data", "index"):
        with contextlib.suppress(OSError):
            total += os.stat(path / name).st_blocks * 512
    return total


class DiskCache:
    """The cached blocks of one object version (see the module doc)."""

    def __init__(self, root: Path, url: str, etag: str | None, last_modified: str | None,
                 size: int, block: int, max_bytes: int) -> None:
        self.root = root
        self.dir = root / cache_key(url, etag, last_modified, size)
        self._size = size
        self._block = block
        self._nblocks = (size + block - 1) // block
        self._meta = {"format": FORMAT, "url": url.split("?", 1)[0], "etag": etag,
                      "last_modified": last_modified, "size": size, "block": block}
        self._lock = threading.Lock()
        self._fd = -1
        self._ifd = -1
        self._lockfd = -1
        self._index = bytearray()
        self._budget = 0
        self._count = 0  # blocks stored
        self.hits = 0
        self.stored = 0
        self.dropped = 0
        self.corrupt = 0
        self._open(max_bytes)

    # -- opening ----------------------------------------------------------------------------
    def _open(self, max_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(exist_ok=True)
        self._lockfd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._lockfd)
            self._lockfd = -1
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BlockingIOError(errno.EWOULDBLOCK,
                                      f"{self.dir} is in use by another mount") from None
            raise
        meta_path = self.dir / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if meta != self._meta:
            if meta is not None:
                log.warning("disk cache %s is stale (its identity does not match); dropped",
                            self.dir)
                self.dropped += 1
            for name in ("data", "index"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / name)
            meta_path.write_text(json.dumps(self._meta))
        self._fd = os.open(self.dir / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._ifd = os.open(self.dir / "index", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, self._size)
        want = self._nblocks * _ENTRY.size
        raw = os.pread(self._ifd, want, 0)
        self._index = bytearray(raw) + bytearray(want - len(raw))
        self._count = self._count_marks()
        os.utime(meta_path)  # recently used: evicted last
        self._budget = max(0, max_bytes - self._evict_others(max_bytes))

    def _evict_others(self, max_bytes: int) -> int:
        """Remove other objects' directories, least recently mounted first, until this one
        has room; return the bytes the others still hold."""
        others = []
        for d in self.root.iterdir():
            if d == self.dir or not d.is_dir():
                continue
            try:
                others.append(((d / "meta.json").stat().st_mtime, d))
            except OSError:
                others.append((0.0, d))
        others.sort()
        held = sum(_dir_bytes(d) for _, d in others)
        mine = _dir_bytes(self.dir)
        while others and held + mine > max_bytes * 3 // 4:
            _, victim = others.pop(0)
            if not self._try_remove(victim):
                continue
            held = sum(_dir_bytes(d) for _, d in others)
        return held

    @staticmethod
    def _try_remove(victim: Path) -> bool:
        """Remove another object's directory unless a mount holds it."""
        try:
            fd = os.open(victim / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            shutil.rmtree(victim, ignore_errors=True)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            shutil.rmtree(victim, ignore_errors=True)
        finally:
            os.close(fd)
        return True

    # -- blocks -----------------------------------------------------------------------------
    def _span(self, index: int) -> tuple[int, int]:
        start = index * self._block
        return start, min(self._block, self._size - start)

    def _entry(self, index: int) -> int | None:
        crc, mark = _ENTRY.unpack_from(self._index, index * _ENTRY.size)
        return crc if mark == _MARK else None

    def _verify(self, index: int, crc: int, data: bytes, want: int) -> bytes | None:
        if len(data) != want or crc32c.crc32c(data) != crc:
            self._drop_all(f"block {index} failed its checksum")
            return None
        self.hits += 1
        return data

    def get(self, index: int) -> bytes | None:
        """Block ``index`` if it is cached and passes its checksum, else None."""
        with self._lock:
            if self._fd < 0 or not 0 <= index < self._nblocks:
                return None
            crc = self._entry(index)
            if crc is None:
                return None
            start, n = self._span(index)
            data = os.pread(self._fd, n, start)
            return self._verify(index, crc, data, n)

    def has(self, index: int) -> bool:
        """Whether block ``index`` is stored (not checked: ``get`` checks)."""
        return 0 <= index < self._nblocks and self._entry(index) is not None

    def get_nowait(self, index: int) -> bytes | None:
        """``get``, but only from what the host page cache holds (never waits for the disk)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._fd < 0 or not 0 <= index < self._nblocks:
                return None
            crc = self._entry(index)
            if crc is None:
                return None
            start, n = self._span(index)
            buf = bytearray(n)
            try:
                got = os.preadv(self._fd, [buf], start, os.RWF_NOWAIT)
            except OSError:
                return None
            if got != n:
                return None
            return self._verify(index, crc, bytes(buf), n)
        finally:
            self._lock.release()

    def put(self, index: int, data: bytes) -> None:
        """Store block ``index`` (data first, then its index entry), within the budget."""
        with self._lock:
            if self._fd < 0 or not 0 <= index < self._nblocks or self._entry(index) is not None:
                return
            start, n = self._span(index)
            if len(data) != n or (self._count + 1) * self._block > self._budget:
                return
            os.pwrite(self._fd, data, start)
            entry = _ENTRY.pack(crc32c.crc32c(data), _MARK)
            os.pwrite(self._ifd, entry, index * _ENTRY.size)
            self._index[index * _ENTRY.size : (index + 1) * _ENTRY.size] = entry
            self.stored += 1
            self._count += 1

    @property
    def stored_bytes(self) -> int:
        return self._count * self._block

    def _count_marks(self) -> int:
        mark = struct.pack("<I", _MARK)
        return sum(1 for i in range(4, len(self._index), _ENTRY.size)
                   if self._index[i : i + 4] == mark)

    def _drop_all(self, why: str) -> None:
        """Forget every block of this object (the caller holds the lock)."""
        log.warning("disk cache %s: %s; the cache of this object is dropped", self.dir, why)
        self.corrupt += 1
        self.dropped += 1
        self._index = bytearray(len(self._index))
        self._count = 0
        with contextlib.suppress(OSError):
            os.ftruncate(self._ifd, 0)
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self._size)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "stored": self.stored, "dropped": self.dropped,
                "corrupt": self.corrupt}

    def close(self) -> None:
        with self._lock:
            for attr in ("_fd", "_ifd", "_lockfd"):
                fd = getattr(self, attr)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, attr, -1)
