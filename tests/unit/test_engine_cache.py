"""The engine's read path against fake devices: correctness, shapes of ranges, both wait
modes, NOWAIT, stats, close."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from asyncfs.engine.cache import PageCache
from asyncfs.errors import DeviceIOError, WouldBlockError
from asyncfs.pagecache import PAGE_SIZE, PG_LOCKED, PG_UPTODATE, PageLRU
from asyncfs.pagecache.lru import SHADOW_SHIFT
from asyncfs.testing import GatedDevice, ListFileMap, MemoryDevice, contiguous_file, pattern
from asyncfs.types import Run
from tests.mutants import mutant
from tests.unit.test_pagecache_lru import GROW_ON_EVERY_INSERT

DATA = pattern(256 * PAGE_SIZE)
GROUP = 1 << SHADOW_SHIFT  # pages a shadow entry group covers
MODES = ["async", "threads"]


async def test_read_dev_arbitrary_ranges_match_device() -> None:
    dev = MemoryDevice(DATA)
    c = PageCache(dev, cache_bytes=16 * PAGE_SIZE)
    for off, n in [(0, 1), (1, 4095), (4095, 2), (1000, 20000), (8192, 4096), (77, 300000)]:
        assert await c.read_dev(off, n) == DATA[off : off + n]
    assert await c.read_dev(5, 0) == b""
    with pytest.raises(DeviceIOError):
        await c.read_dev(len(DATA) - 10, 11)
    with pytest.raises(DeviceIOError):
        await c.read_dev(-1, 2)


async def test_short_last_page_of_odd_sized_device() -> None:
    data = pattern(3 * PAGE_SIZE + 1000)
    dev = MemoryDevice(data)
    c = PageCache(dev)
    assert await c.read_dev(3 * PAGE_SIZE - 10, 1010) == data[-1010:]
    assert await c.read_dev(0, len(data)) == data
    assert dev.reads[-1][0] + dev.reads[-1][1] <= len(data)  # never asked past the end
    with pytest.raises(DeviceIOError):
        await c.read_dev(len(data) - 1, 2)


async def test_read_file_runs_inline_holes_and_unaligned_extents() -> None:
    """ext4 with 1 KiB blocks: extents start at any 1 KiB offset of the device."""
    dev = MemoryDevice(DATA)
    fmap = ListFileMap(
        20000,
        [
            Run(0, 3072, dev_off=1024),
            Run(3072, 2000),  # hole
            Run(5072, 5, data=b"hello"),
            Run(5077, 14923, dev_off=50 * 1024 + 7),
        ],
    )
    expect = DATA[1024:4096] + bytes(2000) + b"hello" + DATA[50 * 1024 + 7 : 50 * 1024 + 7 + 14923]
    c = PageCache(dev, cache_bytes=64 * PAGE_SIZE)
    ra = c.new_readahead()
    for off, n in [(0, 20000), (100, 5000), (5070, 10), (19990, 100), (20000, 5), (0, 1 << 20)]:
        got = await c.read_file(fmap, ra, off, n)
        assert bytes(got) == expect[off : off + n], (off, n)
    assert await c.read_file(fmap, None, 0, 20000) == expect


async def test_sequential_file_read_coalesces_and_reads_ahead() -> None:
    dev = MemoryDevice(DATA)
    c = PageCache(dev, readahead_max=128 * 1024)
    f = contiguous_file(600 * 1024, dev_off=0)
    ra = c.new_readahead()
    out = []
    for off in range(0, f.size, 128 * 1024):
        out.append(bytes(await c.read_file(f, ra, off, 128 * 1024)))
    assert b"".join(out) == DATA[: f.size]
    s = c.stats()
    assert int(s["backend_reads"]) <= 8  # coalesced: not one read per page
    assert int(s["readahead_pages"]) > 0 and int(s["readahead_used"]) > 0
    assert all(length > PAGE_SIZE for _, length in dev.reads)


@pytest.mark.parametrize("mode", MODES)
async def test_concurrent_readers_one_backend_read(mode: str) -> None:
    dev = GatedDevice(DATA)
    c = PageCache(dev, wait_mode=mode, threads=4)  # type: ignore[arg-type]
    results: list[bytes] = []

    async def reader(i: int) -> None:
        results.append(await c.read_dev(100 + i, 50))

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(reader, i)
        await trio.testing.wait_all_tasks_blocked()
        assert dev.started == 1 and c.stats()["parked_now"] == 20
        p = c.lookup(0)
        assert p is not None and p.flags & PG_LOCKED and not p.flags & PG_UPTODATE
        dev.release()
    assert sorted(results) == sorted(DATA[100 + i : 150 + i] for i in range(20))
    s = c.stats()
    assert s["backend_reads"] == 1 and s["parked_now"] == 0 and s["wait_mode"] == mode
    assert s["wakeups"] == 20 and s["parked_total"] == 20


@pytest.mark.parametrize("mode", MODES)
async def test_error_reaches_every_waiter_and_next_read_retries(mode: str) -> None:
    dev = GatedDevice(DATA)
    c = PageCache(dev, wait_mode=mode)  # type: ignore[arg-type]
    errors = 0

    async def reader() -> None:
        nonlocal errors
        try:
            await c.read_dev(0, 10)
        except DeviceIOError:
            errors += 1

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        dev.release(fail=True)
    assert errors == 5
    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert dev.started == 2  # the next read retried
        dev.release()
    assert errors == 5 and await c.read_dev(0, 10) == DATA[:10]


async def test_nowait_starts_io_and_would_block_then_partial() -> None:
    dev = GatedDevice(DATA)
    c = PageCache(dev)
    with pytest.raises(WouldBlockError):
        await c.read_dev(0, 10, nowait=True)
    await trio.testing.wait_all_tasks_blocked()
    assert dev.started == 1  # the I/O was started for the retry (as IOCB_NOWAIT readahead)
    dev.release()
    await trio.testing.wait_all_tasks_blocked()
    assert await c.read_dev(0, 10, nowait=True) == DATA[:10]
    got = await c.read_dev(PAGE_SIZE - 96, 200, nowait=True)  # page 0 ready, page 1 needs I/O
    assert got == DATA[PAGE_SIZE - 96 : PAGE_SIZE]
    f = contiguous_file(30 * PAGE_SIZE)
    with pytest.raises(WouldBlockError):
        await c.read_file(f, None, 12 * PAGE_SIZE, 10, nowait=True)
    await trio.testing.wait_all_tasks_blocked()
    dev.release()


async def test_cancelled_reader_does_not_cancel_the_io() -> None:
    dev = GatedDevice(DATA)
    c = PageCache(dev)
    got: list[bytes] = []

    async def victim(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as cs:
            task_status.started(cs)
            await c.read_dev(0, 10)

    async def keep() -> None:
        got.append(await c.read_dev(0, 10))

    async with trio.open_nursery() as n:
        cs = await n.start(victim)
        n.start_soon(keep)
        await trio.testing.wait_all_tasks_blocked()
        cs.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert c.stats()["parked_now"] == 1
        dev.release()
    assert got == [DATA[:10]] and dev.started == 1


async def test_stats_keys_and_aclose() -> None:
    dev = GatedDevice(DATA)
    c = PageCache(dev, cache_bytes=1 << 20, readahead_max=0)
    s = c.stats()
    for key in [
        "cache_hits", "cache_misses", "backend_reads", "backend_bytes", "parked_now",
        "parked_total", "wakeups", "inflight_io", "pages_cached", "cache_bytes",
        "cache_limit_bytes", "readahead_pages", "readahead_used", "evictions", "wait_mode",
        "cache_max_bytes", "cache_grown_pages",
    ]:
        assert key in s
    assert s["cache_limit_bytes"] == s["cache_max_bytes"] == 1 << 20  # no ceiling: fixed
    assert s["cache_grown_pages"] == 0
    failed = []

    async def reader() -> None:
        try:
            await c.read_dev(0, 10)
        except DeviceIOError:
            failed.append(1)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert c.stats()["inflight_io"] == 1
        await c.aclose()
    assert failed == [1] and c.stats()["inflight_io"] == 0
    with pytest.raises(DeviceIOError):
        await c.read_dev(0, 1)


async def test_threads_mode_holds_at_most_pool_size_threads() -> None:
    dev = GatedDevice(DATA)
    c = PageCache(dev, wait_mode="threads", threads=3)
    done = 0

    async def reader(i: int) -> None:
        nonlocal done
        await c.read_dev(i * 10, 10)
        done += 1

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(reader, i)
        await trio.testing.wait_all_tasks_blocked()
        assert c.waiter.limiter is not None and c.waiter.limiter.borrowed_tokens == 3
        dev.release()
    assert done == 10


async def test_request_larger_than_cache_completes() -> None:
    """A 256-page direct_io read through a 4-page cache still completes, correctly."""
    dev = MemoryDevice(DATA, delay=0.0005)
    c = PageCache(dev, cache_bytes=4 * PAGE_SIZE)
    f = contiguous_file(len(DATA))
    assert bytes(await c.read_file(f, c.new_readahead(), 0, len(DATA))) == DATA
    assert len(c.lru) <= 4


async def test_threads_mode_cancel_while_waiting_for_a_thread() -> None:
    """threads mode: a request cancelled while it waits for a worker thread leaves no
    entry queued; the one blocked in a thread gets its bytes after the I/O."""
    dev = GatedDevice(DATA)
    c = PageCache(dev, wait_mode="threads", threads=1)
    got: list[bytes] = []

    async def victim(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as cs:
            task_status.started(cs)
            await c.read_dev(0, 10)

    async def keep() -> None:
        got.append(await c.read_dev(0, 10))

    async with trio.open_nursery() as n:
        n.start_soon(keep)
        await trio.testing.wait_all_tasks_blocked()
        cs = await n.start(victim)
        await trio.testing.wait_all_tasks_blocked()
        assert sum(1 for _ in c.wait_table.queued_entries()) == 2
        cs.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert sum(1 for _ in c.wait_table.queued_entries()) == 1
        assert c.stats()["parked_now"] == 1
        dev.release()
    assert got == [DATA[:10]] and c.stats()["parked_now"] == 0


async def test_rwf_nowait_probe_completes_without_parking() -> None:
    """A host-cached (buffered) image answers the RWF_NOWAIT probe: the read completes in the
    caller's step, with no backend task, no park and no wake, even through a cache smaller
    than the request."""
    dev = MemoryDevice(DATA, host_cached=True)
    c = PageCache(dev, cache_bytes=4 * PAGE_SIZE)
    f = contiguous_file(len(DATA))
    assert bytes(await c.read_file(f, c.new_readahead(), 0, len(DATA))) == DATA
    assert await c.read_dev(12345, 20000) == DATA[12345:32345]
    s = c.stats()
    assert dev.reads == [] and s["parked_total"] == 0 and s["inflight_io"] == 0
    assert s["backend_nowait_reads"] == s["backend_reads"] and len(c.lru) <= 4


@pytest.mark.parametrize("variant", ["kernel", "ceiling_ignored", "grow_on_every_insert"])
async def test_cache_grows_on_refaults_not_on_a_single_pass(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache_bytes`` is the start, ``cache_max_bytes`` the ceiling: a device range of twice
    the start read page by page twice refaults, the cache grows by those pages and the second
    pass misses once a group (a refault brings its evicted group back with it); a
    single pass over the whole device (4x the start) grows nothing and caches no more than
    the start.

    Broken variants: ``ceiling_ignored`` (PageCache builds its PageLRU without the ceiling);
    ``grow_on_every_insert`` (PageLRU grows on any miss, so a stream fills the ceiling)."""
    if variant == "ceiling_ignored":
        monkeypatch.setattr(
            PageCache, "__init__",
            mutant(PageCache, "__init__", "PageLRU(start_pages, max_pages)",
                   "PageLRU(start_pages)"),
        )
    elif variant == "grow_on_every_insert":
        monkeypatch.setattr(PageLRU, "insert", mutant(PageLRU, "insert", *GROW_ON_EVERY_INSERT))
    start, ceiling = 64 * PAGE_SIZE, 256 * PAGE_SIZE
    c = PageCache(MemoryDevice(DATA), cache_bytes=start, cache_max_bytes=ceiling,
                  readahead_max=0)
    misses = []
    for _ in range(2):
        before = c.misses
        for off in range(0, 2 * start, PAGE_SIZE):
            assert await c.read_dev(off, PAGE_SIZE) == DATA[off : off + PAGE_SIZE]
        misses.append(c.misses - before)
    s = c.stats()
    assert misses[0] == 128
    assert int(s["cache_bytes"]) <= int(s["cache_limit_bytes"]) <= int(s["cache_max_bytes"])
    working_set_grew = (
        s["cache_max_bytes"] == ceiling
        and s["cache_grown_pages"] == 64
        and s["cache_limit_bytes"] == 2 * start
        and misses[1] == 64 // GROUP
        and s["refault_around_pages"] == 64 - 64 // GROUP
    )

    stream = PageCache(MemoryDevice(DATA), cache_bytes=start, cache_max_bytes=ceiling,
                       readahead_max=0)
    for off in range(0, len(DATA), PAGE_SIZE):
        await stream.read_dev(off, PAGE_SIZE)
    s = stream.stats()
    stream_stayed = (
        s["cache_grown_pages"] == 0
        and s["cache_limit_bytes"] == start
        and int(s["pages_cached"]) <= start // PAGE_SIZE
    )
    assert (working_set_grew, stream_stayed) == {
        "kernel": (True, True), "ceiling_ignored": (False, True),
        "grow_on_every_insert": (False, False),
    }[variant], (misses, s)


@pytest.mark.parametrize("variant", ["kernel", "headroom_ignored", "page_by_page"])
async def test_refault_around_reads_the_evicted_group_back_in_one_read(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refault while the cache may grow brings back the reclaimed pages of its shadow group
    (GROUP pages) in one backend read per contiguous run; at the ceiling (no headroom) nothing
    more than the page asked for is read, and the cache never passes its ceiling.

    Broken variants: ``headroom_ignored`` (refault-around at the ceiling: the cache evicts
    other pages to make room and reads GROUP times what is asked); ``page_by_page`` (each
    brought-back page submitted as its own read)."""
    if variant == "headroom_ignored":
        monkeypatch.setattr(PageCache, "filemap_create_pages", mutant(
            PageCache, "filemap_create_pages", "if refaulted and self._lru.headroom:",
            "if refaulted:"))
        monkeypatch.setattr(PageCache, "_refault_around", mutant(
            PageCache, "_refault_around", "if budget <= 0 or j > last_dev:",
            "if j > last_dev:"))
    elif variant == "page_by_page":
        monkeypatch.setattr(PageCache, "_refault_around", mutant(
            PageCache, "_refault_around", "batch.add(p)", "batch.add(p); batch.flush()"))
    dev = MemoryDevice(DATA)
    c = PageCache(dev, cache_bytes=64 * PAGE_SIZE, cache_max_bytes=192 * PAGE_SIZE,
                  readahead_max=0)
    for off in range(0, 128 * PAGE_SIZE, PAGE_SIZE):  # pages 0..63 reclaimed, remembered
        await c.read_dev(off, PAGE_SIZE)
    dev.reads.clear()
    assert await c.read_dev(5 * PAGE_SIZE, PAGE_SIZE) == DATA[5 * PAGE_SIZE : 6 * PAGE_SIZE]
    # the refaulted page itself, then the rest of its group in two runs around it
    growing_ok = sorted(dev.reads) == [(0, 5 * PAGE_SIZE), (5 * PAGE_SIZE, PAGE_SIZE),
                                       (6 * PAGE_SIZE, (GROUP - 6) * PAGE_SIZE)]
    before = c.misses
    for off in range(0, GROUP * PAGE_SIZE, PAGE_SIZE):
        assert await c.read_dev(off, PAGE_SIZE) == DATA[off : off + PAGE_SIZE]
    growing_ok = (growing_ok and c.misses == before
                  and c.stats()["refault_around_pages"] == GROUP - 1)

    # At the ceiling: fill it (limit == max), then a refault reads only its own page.
    full = PageCache(MemoryDevice(DATA), cache_bytes=64 * PAGE_SIZE,
                     cache_max_bytes=64 * PAGE_SIZE, readahead_max=0)
    for off in range(0, 128 * PAGE_SIZE, PAGE_SIZE):
        await full.read_dev(off, PAGE_SIZE)
    fdev = full._dev
    assert isinstance(fdev, MemoryDevice)
    fdev.reads.clear()
    await full.read_dev(5 * PAGE_SIZE, PAGE_SIZE)
    ceiling_ok = (fdev.reads == [(5 * PAGE_SIZE, PAGE_SIZE)]
                  and len(full.lru) <= 64 and full.stats()["refault_around_pages"] == 0)
    assert (growing_ok, ceiling_ok) == {
        "kernel": (True, True), "headroom_ignored": (True, False),
        "page_by_page": (False, True),
    }[variant], (dev.reads, fdev.reads)


def test_cache_ceiling_below_start_is_refused() -> None:
    with pytest.raises(ValueError, match="below its start"):
        PageCache(MemoryDevice(DATA), cache_bytes=64 * PAGE_SIZE, cache_max_bytes=63 * PAGE_SIZE)
