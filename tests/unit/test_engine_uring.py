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

import pytest
import trio

from asyncfs.engine.cache import PageCache
from asyncfs.engine.pageio import PageIO
from asyncfs.errors import DeviceIOError, WouldBlockError
from asyncfs.io import UringDevice, open_image
from asyncfs.pagecache.page import PAGE_SIZE, PG_ERROR, PG_LOCKED, PG_UPTODATE
from bench.image import uncache_file
from tests.mutants import breaks, mutant
from tests.unit.counting import count_callback_reads

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
    return dev, count_callback_reads(dev, kind)


@pytest.mark.parametrize("variant", ["kernel", "frames-reversed"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
async def test_callback_reads_return_the_file(
    image: tuple[Path, bytes], direct: bool, kind: str, variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrent reads of random ranges through the cache equal the file, and the misses went
    through the callback reads. Broken variant: ``frames-reversed`` (``PageIO.frames`` lists
    the frames of a read of several pages in the wrong order: the ring fills them, or the
    completion copies the bounce buffer into them, page by page in the wrong place)."""
    breaks(variant, monkeypatch, PageIO, "frames",
           "views.append(frame)", "views.insert(0, frame)")
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
        exact = all(b == data[off : off + n] for (off, n), b in got.items())
        assert exact == (variant == "kernel")
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
    pages must come out failed): the completion (``PageIO._into_done``, ``_read_done``)
    failing every page of a failed read with the error instead of retrying them one by
    one."""
    if variant == "broken" and kind == "into":
        monkeypatch.setattr(PageIO, "_into_done", mutant(
            PageIO, "_into_done", "if err is not None and _splittable(pages)", "if False"))
    elif variant == "broken":
        monkeypatch.setattr(PageIO, "_read_done", mutant(
            PageIO, "_read_done", "if buf is None and _splittable(pages)", "if False"))
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


@pytest.mark.parametrize("variant", ["kernel", "waits-for-device", "keeps-frames"])
@pytest.mark.parametrize("kind", KINDS)
async def test_aclose_fails_callback_reads_in_flight_once(
    image: tuple[Path, bytes], kind: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aclose`` right after a read was submitted (before any scheduler pass could reap it)
    fails its pages with ERROR, unlocked, and leaves nothing in flight; the completion that
    arrives later changes nothing, and the frames the kernel was still writing are never given
    back to the arena. Broken variants: ``waits-for-device`` (``PageIO.aclose`` not failing
    the callback reads: it waits for the device, which a hung disk never answers, and here
    the pages end as the device says instead of failed at once); ``keeps-frames``
    (``aclose`` keeping the frames of the reads in flight on their pages, where reclaim
    would reuse them)."""
    if variant == "waits-for-device":
        breaks(variant, monkeypatch, PageIO, "aclose",
               "cb_reads, self._cb_reads = self._cb_reads, {}", "cb_reads: dict[int, Any] = {}")
    elif variant == "keeps-frames":
        breaks(variant, monkeypatch, PageIO, "aclose", "self.drop_frames(pages)", "pass")
    path, _ = image
    dev, started = await _open(path, direct=True, kind=kind)
    cache = PageCache(dev, cache_bytes=SIZE)
    try:
        with pytest.raises(WouldBlockError):
            await cache.read_dev(8 * PAGE_SIZE, 2 * PAGE_SIZE, nowait=True)
        assert started == [2 * PAGE_SIZE]
        with trio.fail_after(5):
            await cache.aclose()  # no checkpoint between the submit and this
        pages = [cache.lookup(idx) for idx in (8, 9)]
        failed_at_once = all(p is not None and p.flags & PG_ERROR and not p.flags & PG_LOCKED
                             and not p.flags & PG_UPTODATE for p in pages)
        # no frame left to be reclaimed
        frames_dropped = all(p is not None and not isinstance(p.data, memoryview)
                             for p in pages)
        assert (failed_at_once, frames_dropped) == {
            "kernel": (True, True), "waits-for-device": (False, False),
            "keeps-frames": (True, False)}[variant]
        if variant != "kernel":
            return
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
@pytest.mark.parametrize("path_kind", ["bounce", "task"])
@pytest.mark.parametrize("cached", [False, True], ids=["cold", "host-cached"])
async def test_threads_backend_fills_the_frames(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, variant: str, cached: bool,
    path_kind: str,
) -> None:
    """Over the threads backend with its reads into the frames hidden from the cache, pages
    are filled by the probe straight into their frames when the host caches the bytes, else
    by a read into a buffer (``bounce``: the backend's ``submit_read``; ``task``: with that
    hidden too, a task calling ``read``) whose bytes the completion copies into the frames;
    either way reads return the file. Broken variant: the completion not copying a read's
    bytes into the frames (``PageIO._copy_in``)."""
    breaks(variant, monkeypatch, PageIO, "_copy_in", "v[:] = mv[pos:end]", "pass")
    path, data = image
    # The default (hybrid) device: 4 KiB reads are buffered, without host readahead. Its
    # opening reads the first sectors (partition table), so the host cache is set after.
    dev = await open_image(path, backend="threads")
    dev.submit_read_into = None  # type: ignore[attr-defined]
    if path_kind == "task":
        dev.submit_read = None  # type: ignore[attr-defined]
    if cached:
        assert path.read_bytes() == data
    else:
        uncache_file(path)
    cache = PageCache(dev, cache_bytes=SIZE)
    try:
        got = [await cache.read_dev(i * 3 * PAGE_SIZE + 100, PAGE_SIZE) for i in range(16)]
        want = [data[i * 3 * PAGE_SIZE + 100 : (i + 1) * 3 * PAGE_SIZE - 2 * PAGE_SIZE + 100]
                for i in range(16)]
        # Whether the probe answered every read is the host's choice (it may drop the file's
        # pages under memory pressure, or still hold a neighbour of a cold page): only reads
        # that went past the probe depend on the completion's copy.
        all_probed = cache.backend_nowait_reads == cache.backend_reads
        assert (got == want) == (variant == "kernel" or all_probed)
        assert (cache.backend_nowait_reads > 0) if cached else not all_probed
    finally:
        await cache.aclose()
        await dev.aclose()


@pytest.mark.parametrize("variant", ["kernel", "no-release"])
async def test_ring_reads_into_frames_leak_no_views(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The binding releases its export of a read's buffers when the read is reaped, so even
    an arena that made a fresh view of a frame for every read would leak nothing: 2,000 cold
    reads through a four-page cache over the real ring (O_DIRECT, so every miss goes through
    the ring), with the arena so changed, leave no more live memoryviews than the arena has
    frames and blocks.

    Broken variant: the binding never releasing an export (as the old third-party binding's
    ``Iovec`` did): every read leaks a view."""
    import gc

    from asyncfs.engine.arena import PageArena
    from asyncfs.io import uring as uring_mod
    from tests.unit.uring_build import mutant_binding
    monkeypatch.setattr(PageArena, "_frame_view", mutant(
        PageArena, "_frame_view", "view = self._fviews[pfn] = self._view(pfn, 1)",
        "view = self._view(pfn, 1)"))
    if variant != "kernel":
        monkeypatch.setattr(uring_mod, "_uring", mutant_binding(
            tmp_path / "binding", "        rd_unlink(self, r);\n        rd_release(r);",
            "        rd_unlink(self, r);"))
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
