"""The page cache over the real io_uring backend, whose misses complete by callback instead of
through a task per read, either read straight into the pages' frames
(``UringDevice.submit_read_into``) or through a bounce buffer (``submit_read``, which the cache
uses when the backend cannot read into the frames): the bytes are right, a failed coalesced
read still fails only the pages that really fail, and ``aclose`` fails the pages of reads still
in flight, once, whatever the callback does later, and never reuses their frames."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from asyncfs.engine.cache import PageCache
from asyncfs.errors import DeviceIOError, WouldBlockError
from asyncfs.io import UringDevice, open_image
from asyncfs.pagecache.page import PAGE_SIZE, PG_ERROR, PG_LOCKED, PG_UPTODATE
from bench.image import uncache_file
from tests.unit.fakes import mutant

SIZE = 64 * PAGE_SIZE


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "data.img"
    data = random.Random(11).randbytes(SIZE)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path, data


KINDS = ["into", "bounce"]


async def _open(path: Path, *, direct: bool, kind: str) -> tuple[UringDevice, list[int]]:
    """The real device, with the lengths of the reads started by callback: read into the
    frames (``into``), or, with ``submit_read_into`` hidden from the cache, through the
    bounce buffer (``bounce``)."""
    dev = await open_image(path, backend="uring", direct=direct)
    assert isinstance(dev, UringDevice)
    started: list[int] = []
    if kind == "into":
        real_into = dev.submit_read_into

        def counting_into(offset: int, views: list[memoryview], callback: Any,
                          delay: float = 0.0) -> bool:
            ok = real_into(offset, views, callback, delay)
            if ok:
                started.append(sum(map(len, views)))
            return ok

        dev.submit_read_into = counting_into  # type: ignore[method-assign]
        return dev, started
    dev.submit_read_into = None  # type: ignore[assignment,method-assign]
    real = dev.submit_read

    def counting(offset: int, length: int, callback: Any) -> bool:
        ok = real(offset, length, callback)
        if ok:
            started.append(length)
        return ok

    dev.submit_read = counting  # type: ignore[method-assign]
    return dev, started


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
async def test_callback_reads_return_the_file(
    image: tuple[Path, bytes], direct: bool, kind: str
) -> None:
    """Concurrent reads of random ranges through the cache equal the file, and the misses went
    through the callback reads. Broken variants: storing the completion's bytes on the pages
    shifted by one page; frames handed to the read in the wrong order."""
    path, data = image
    dev, started = await _open(path, direct=direct, kind=kind)
    if not direct:  # out of the host cache, so the misses really go to the ring
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cache = PageCache(dev, cache_bytes=SIZE)
    rng = random.Random(3)
    ranges = [(o, rng.randrange(1, 5 * PAGE_SIZE)) for o in
              (rng.randrange(0, SIZE - 5 * PAGE_SIZE) for _ in range(40))]
    got: dict[tuple[int, int], bytes] = {}

    async def reader(off: int, n: int) -> None:
        got[(off, n)] = await cache.read_dev(off, n)

    try:
        async with trio.open_nursery() as nursery:
            for off, n in ranges:
                nursery.start_soon(reader, off, n)
        for (off, n), b in got.items():
            assert b == data[off : off + n], (off, n)
        assert started or cache.backend_nowait_reads == cache.backend_reads
        assert cache.inflight_io == 0
    finally:
        await cache.aclose()
        await dev.aclose()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_failed_coalesced_callback_read_fails_only_bad_pages(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, variant: str, kind: str
) -> None:
    """The image shrinks under the device: a coalesced read across the new end fails, is
    retried page by page, and only the pages past the end get ERROR; the reader of a good page
    in the same run gets its bytes. Broken variant (run here as ``broken``, where the good
    pages must come out failed): the completion (``_into_done``, ``_read_done``) failing every
    page of a failed read with the error instead of retrying them one by one."""
    if variant == "broken" and kind == "into":
        monkeypatch.setattr(PageCache, "_into_done", mutant(
            PageCache, "_into_done", "if err is not None and _splittable(pages)", "if False"))
    elif variant == "broken":
        monkeypatch.setattr(PageCache, "_read_done", mutant(
            PageCache, "_read_done", "if buf is None and _splittable(pages)", "if False"))
    path, data = image
    dev, started = await _open(path, direct=True, kind=kind)
    cache = PageCache(dev, cache_bytes=SIZE)
    try:
        os.truncate(path, 40 * PAGE_SIZE)
        with pytest.raises(DeviceIOError):
            await cache.read_dev(32 * PAGE_SIZE, 16 * PAGE_SIZE)
        assert 16 * PAGE_SIZE in started  # one coalesced read, by callback
        with trio.fail_after(5):  # the per-page retries of the later pages finish on their own
            while cache.inflight_io:
                await trio.sleep(0.001)
        good = [cache.lookup(idx) for idx in range(32, 40)]
        if variant == "broken":
            assert all(p is not None and p.flags & PG_ERROR and not p.flags & PG_UPTODATE
                       for p in good)
            return
        assert all(p is not None and p.flags & PG_UPTODATE for p in good)
        for idx in range(40, 48):
            p = cache.lookup(idx)
            assert p is not None and p.flags & PG_ERROR and not p.flags & PG_LOCKED, idx
        assert await cache.read_dev(36 * PAGE_SIZE, PAGE_SIZE) == data[
            36 * PAGE_SIZE : 37 * PAGE_SIZE]
        assert cache.inflight_io == 0
    finally:
        await cache.aclose()
        await dev.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_aclose_fails_callback_reads_in_flight_once(
    image: tuple[Path, bytes], kind: str
) -> None:
    """``aclose`` right after a read was submitted (before any scheduler pass could reap it)
    fails its pages with ERROR, unlocked, and leaves nothing in flight; the completion that
    arrives later changes nothing, and the frames the kernel was still writing are never given
    back to the arena. Broken variants: ``aclose`` not failing the callback reads (aclose then
    waits for the device, which a hung disk never answers); ``aclose`` keeping the frames of
    the reads in flight on their pages (reclaim would then reuse them)."""
    path, _ = image
    dev, started = await _open(path, direct=True, kind=kind)
    cache = PageCache(dev, cache_bytes=SIZE)
    try:
        with pytest.raises(WouldBlockError):
            await cache.read_dev(8 * PAGE_SIZE, 2 * PAGE_SIZE, nowait=True)
        assert started == [2 * PAGE_SIZE]
        await cache.aclose()  # no checkpoint between the submit and this
        for idx in (8, 9):
            p = cache.lookup(idx)
            assert p is not None and p.flags & PG_ERROR and not p.flags & PG_LOCKED
            assert not p.flags & PG_UPTODATE
            assert not isinstance(p.data, memoryview)  # no frame left to be reclaimed
        assert cache.inflight_io == 0
        with trio.fail_after(5):
            while dev.in_flight:
                await trio.sleep(0.001)
        p = cache.lookup(8)
        assert p is not None and not p.flags & PG_UPTODATE  # the late completion was ignored
        assert cache.inflight_io == 0
    finally:
        await dev.aclose()


@pytest.mark.parametrize("variant", ["kernel", "broken"])
@pytest.mark.parametrize("cached", [False, True], ids=["cold", "host-cached"])
async def test_threads_backend_fills_the_frames(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, variant: str, cached: bool
) -> None:
    """Over the threads backend (no reads into the frames by callback), pages are filled by
    the probe straight into their frames when the host caches the bytes, else by a task read
    whose bytes the completion copies into the frames; either way reads return the file.
    Broken variant: the completion not copying a task read's bytes into the frames."""
    if variant == "broken":
        monkeypatch.setattr(PageCache, "_complete", mutant(
            PageCache, "_complete", "v[:] = mv[pos:end]", "pass"))
    path, data = image
    # The default (hybrid) device: 4 KiB reads are buffered, without host readahead. Its
    # opening reads the first sectors (partition table), so the host cache is set after.
    dev = await open_image(path, backend="threads")
    if cached:
        assert path.read_bytes() == data
    else:
        uncache_file(path)
    cache = PageCache(dev, cache_bytes=SIZE)
    try:
        got = [await cache.read_dev(i * 3 * PAGE_SIZE + 100, PAGE_SIZE) for i in range(16)]
        want = [data[i * 3 * PAGE_SIZE + 100 : (i + 1) * 3 * PAGE_SIZE - 2 * PAGE_SIZE + 100]
                for i in range(16)]
        assert (got == want) == (variant == "kernel" or cached)
        # (cold: the host may still cache a neighbour of a page read, a large folio's worth)
        assert (cache.backend_nowait_reads == cache.backend_reads) == cached
    finally:
        await cache.aclose()
        await dev.aclose()


@pytest.mark.parametrize("variant", ["kernel", "fresh-views"])
async def test_ring_reads_into_frames_leak_no_views(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """liburing's ``Iovec`` keeps an export of every buffer it is given and never releases
    it: the frames handed to the ring must be the arena's long-lived views, or each read
    leaks one. 2,000 cold reads through a four-page cache over the real ring (O_DIRECT, so
    every miss goes through the ring) leave no more live memoryviews than the arena has
    frames and blocks.

    Broken variant: the arena making a fresh view each time it hands a frame out (not
    keeping the one it made)."""
    import gc

    from asyncfs.engine.arena import PageArena
    if variant != "kernel":
        monkeypatch.setattr(PageArena, "_frame_view", mutant(
            PageArena, "_frame_view", "view = self._fviews[pfn] = self._view(pfn, 1)",
            "view = self._view(pfn, 1)"))
    path, data = image
    dev, started = await _open(path, direct=True, kind="into")
    c = PageCache(dev, cache_bytes=4 * PAGE_SIZE, readahead_max=0)
    rng = random.Random(3)
    exact = True
    views_before = sum(isinstance(o, memoryview) for o in gc.get_objects())
    for _ in range(2000):
        off = rng.randrange(SIZE // PAGE_SIZE) * PAGE_SIZE
        exact = exact and await c.read_dev(off, PAGE_SIZE) == data[off : off + PAGE_SIZE]
    gc.collect()
    grown = sum(isinstance(o, memoryview) for o in gc.get_objects()) - views_before
    arena = c.arena
    assert exact and len(started) > 1000  # the misses went through the ring
    assert (grown <= arena.frames + arena.chunks + 8) == (variant == "kernel"), grown
    await c.aclose()
    await dev.aclose()
