"""Small files through a real mount: their bytes reach the kernel's page cache with the OPEN
(FUSE_NOTIFY_STORE, fuse/ops.py), exactly up to EOF, with zeros past it in the last page."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import threading
from pathlib import Path

from asyncfs.fuse.ops import PUSH_MAX
from tests.mount.helpers import mounted, regular_files

PAGE = mmap.PAGESIZE


def _resident_pages(path: Path) -> int:
    """Pages of ``path`` in the kernel's page cache (util-linux fincore: mmap + mincore)."""
    r = subprocess.run(["fincore", "--raw", "--noheadings", "-o", "PAGES", str(path)],
                       capture_output=True, text=True, timeout=30, check=True)
    return int(r.stdout.split()[0])


def _map_whole_pages(fd: int, size: int) -> bytes:
    """The file's pages as a MAP_SHARED mapping shows them, including the tail past EOF
    (Python's mmap refuses a length beyond the file size)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = (size + PAGE - 1) // PAGE * PAGE
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        return ctypes.string_at(addr, length)
    finally:
        libc.munmap(addr, length)


def _small_files(tree: Path) -> list[Path]:
    return [p for p in regular_files(tree) if 0 < p.stat().st_size <= PUSH_MAX
            and p.stat().st_size % PAGE]


def test_small_file_is_in_the_page_cache_after_open(ext4_image: Path, small_tree: Path,
                                                    tmp_path: Path) -> None:
    """Opening (not reading) a small file leaves all its pages resident; read(2) and a
    mapping then see exactly the source bytes, and zeros after EOF in the last page.

    The kernel's side of the store: without it no page would be resident until a read, and
    a store padded to the page end would grow the file (st_size and the bytes read would
    differ from the source). The store's rules are built broken in
    tests/unit/test_fuse_ops.py."""
    files = _small_files(small_tree)[:12]
    assert files, "the corpus has small files"
    with mounted(ext4_image, tmp_path / "mnt") as mnt:
        for src in files:
            path = mnt / src.relative_to(small_tree)
            want = src.read_bytes()
            fd = os.open(path, os.O_RDONLY)
            try:
                assert _resident_pages(path) == (len(want) + PAGE - 1) // PAGE, path
                assert os.fstat(fd).st_size == len(want)
                assert os.pread(fd, len(want) + PAGE, 0) == want
                pages = _map_whole_pages(fd, len(want))
                assert pages[: len(want)] == want
                assert pages[len(want):] == bytes(len(pages) - len(want))
            finally:
                os.close(fd)


def test_concurrent_opens_of_the_same_small_files(ext4_image: Path, small_tree: Path,
                                                  tmp_path: Path) -> None:
    """Eight threads open, read and close the same few small files at once (the first open
    of each stores it while others may already be reading): every read is exact and nothing
    hangs (each thread is bounded by a join timeout)."""
    files = _small_files(small_tree)[:4]
    sources = {p.relative_to(small_tree): p.read_bytes() for p in files}
    errors: list[str] = []
    with mounted(ext4_image, tmp_path / "mnt") as mnt:

        def worker(seed: int) -> None:
            for i in range(40):
                rel = list(sources)[(seed + i) % len(sources)]
                with open(mnt / rel, "rb") as f:
                    got = f.read()
                if got != sources[rel]:
                    errors.append(f"{rel}: {len(got)} bytes differ")

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a reader hung"
    assert errors == []
