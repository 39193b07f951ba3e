"""The invariants of docs/invariants.md at the engine level (trio glue and read path).

Each test runs against the real engine and against a deliberately broken variant named in its
docstring (built with ``mutants.mutant`` from the real source, so the variant differs by exactly
the rule under test); the same check must pass on the first and catch the second.
Invariants 1, 3, 4, 5 and the pure side of 6, 7 and 13 are in test_pagecache_*.py.
"""

from __future__ import annotations

import time
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from asyncfs.engine import cache as cache_mod
from asyncfs.engine import pageio as pageio_mod
from asyncfs.engine import waiting
from asyncfs.engine.cache import PageCache
from asyncfs.engine.pageio import PageIO
from asyncfs.engine.readahead import WindowReader
from asyncfs.engine.waiting import Waiter
from asyncfs.errors import DeviceIOError, WouldBlockError
from asyncfs.pagecache import (
    PAGE_SIZE,
    PG_ERROR,
    PG_LOCKED,
    PG_READAHEAD,
    PG_UPTODATE,
)
from asyncfs.pagecache import waitqueue as waitqueue_mod
from asyncfs.testing import (
    GatedDevice,
    ListFileMap,
    MemoryDevice,
    SlowBlockingDevice,
    contiguous_file,
    pattern,
)
from asyncfs.types import Run
from tests.mutants import breaks

DATA = pattern(256 * PAGE_SIZE)
VARIANTS = ["kernel", "broken"]



# -- 2. no lost wakeup (engine) --------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv2_no_lost_wakeup_across_an_await(
    variant: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """A reader that finds the page locked and the I/O completing "at the same time" is
    still woken.

    Broken variant: enqueue-after-check without the final test: the reader checks LOCKED,
    yields (the I/O completes and unlocks, seeing no WAITERS), then queues and sleeps for
    ever."""
    breaks(
        variant, monkeypatch, PageCache, "_wait_unlocked",
        "    if self._wt.wait_on_page_locked_async(page, entry):\n        return\n",
        "    if not page.flags & PG_LOCKED:\n        return\n"
        "    await trio.sleep(0.005)\n"
        "    self._wt.page_waitqueue(page).add_tail(entry)\n"
        "    entry.page = page\n"
        "    page.flags |= 1 << 3  # PG_WAITERS\n",
    )
    dev = MemoryDevice(DATA, delay=0.001)
    c = PageCache(dev)
    got = None
    with trio.move_on_after(10):
        got = await c.read_dev(0, 100)
    assert (got == DATA[:100]) == (variant == "kernel")
    c.wait_table.check_invariants()  # (the timed-out reader's cancel dequeued its entry)


# -- 6. hand-off, cancellation -------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv6_cancelled_waiter_does_not_swallow_exclusive_wake(
    variant: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """A lock waiter cancelled while parked leaves no entry queued; the next unlock's
    exclusive wake reaches the waiter behind it.

    Broken variant: the abort handler reports success but leaves the entry queued; the
    unlock then spends its one exclusive wake on the dead entry and the live waiter
    starves."""
    breaks(variant, monkeypatch, Waiter, "park",
           "if wt.remove_wait_entry(entry):", "if entry.queued:")
    c = PageCache(MemoryDevice(DATA))
    page = c.lookup(0)
    await c.read_dev(0, 1)
    page = c.lookup(0)
    assert page is not None
    await c.lock_page(page)  # we are the owner
    order: list[str] = []

    async def locker(name: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as cs:
            task_status.started(cs)
            await c.lock_page(page)
            order.append(name)
            c.unlock_page(page)

    async with trio.open_nursery() as n:
        cs_b = await n.start(locker, "b")
        await n.start(locker, "c")
        await trio.testing.wait_all_tasks_blocked()
        cs_b.cancel()
        await trio.testing.wait_all_tasks_blocked()
        c.unlock_page(page)
        with trio.move_on_after(5):
            while not order:
                await trio.sleep(0.1)
        n.cancel_scope.cancel()
    assert (order == ["c"]) == (variant == "kernel")


class Boom(Exception):
    pass


@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv6_handed_lock_released_by_failed_recipient(
    variant: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """With the unfairness budget spent, an unlock hands the lock to the first waiter (it
    owns the page when it resumes). If that recipient resumes with an error instead (it was
    cancelled), it releases the lock so the next waiter gets it.

    Broken variant: the recipient's error path only passes the wake on and forgets that it
    was handed the lock: the page stays locked for ever."""
    breaks(variant, monkeypatch, Waiter, "lock_page",
           "            if entry.handed:\n"
           "                wt.unlock_page(page)  # a lock handed to a cancelled waiter goes on\n"
           "            else:\n"
           "                wt.finish_wait(entry)\n",
           "            wt.finish_wait(entry)\n")
    monkeypatch.setattr(waitqueue_mod, "PAGE_LOCK_UNFAIRNESS", 0)  # hand off at once
    real_wake = waiting._wake_task
    doomed: set[trio.lowlevel.Task] = set()

    def wake(entry: waitqueue_mod.WaitEntry) -> None:
        assert isinstance(entry, waiting.TaskWaitEntry)
        task = entry.task
        if task in doomed:
            entry.task = None
            entry.counters.parked_now -= 1
            trio.lowlevel.reschedule(task, outcome.Error(Boom()))
        else:
            real_wake(entry)

    monkeypatch.setattr(waiting, "_wake_task", wake)
    c = PageCache(MemoryDevice(DATA))
    await c.read_dev(0, 1)
    page = c.lookup(0)
    assert page is not None
    await c.lock_page(page)
    got: list[str] = []

    async def doomed_locker() -> None:
        doomed.add(trio.lowlevel.current_task())
        with pytest.raises(Boom):
            await c.lock_page(page)

    async def next_locker() -> None:
        await c.lock_page(page)
        got.append("next")
        assert page.flags & PG_LOCKED
        c.unlock_page(page)

    async with trio.open_nursery() as n:
        n.start_soon(doomed_locker)
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(next_locker)
        await trio.testing.wait_all_tasks_blocked()
        c.unlock_page(page)  # hands the lock to doomed_locker, which fails on resume
        with trio.move_on_after(5):
            while not got:
                await trio.sleep(0.1)
        n.cancel_scope.cancel()
    assert (got == ["next"]) == (variant == "kernel")
    if variant == "kernel":
        assert not page.flags & PG_LOCKED


# -- 8. partial progress ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv8_waitq_read_continues_to_full_length(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that copied bytes ends without parking, and the read continues with the next
    step until the full length (or EOF): never a short read mid-file (pyfuse3 would pad it
    with zeros).

    Broken variant: the step's partial result is returned to the caller as the answer."""
    breaks(variant, monkeypatch, PageCache, "filemap_read",
           "if new_off >= end:", "if new_off >= end or new_off != off:")
    dev = GatedDevice(DATA)
    c = PageCache(dev, readahead_max=0)
    f = contiguous_file(64 * 1024)
    async with trio.open_nursery() as n:
        n.start_soon(c.read_dev, 0, 10)  # warm page 0 only
        await trio.testing.wait_all_tasks_blocked()
        dev.release()
    res: list[bytes] = []

    async def reader() -> None:
        res.append(bytes(await c.read_file(f, None, 0, 3 * PAGE_SIZE)))

    async with trio.open_nursery() as n:
        n.start_soon(c.read_dev, 2 * PAGE_SIZE, 10)  # page 2 under someone else's I/O
        await trio.testing.wait_all_tasks_blocked()
        n.start_soon(reader)  # copies page 0, creates page 1, parks on it
        await trio.testing.wait_all_tasks_blocked()
        dev.release(1, newest=True)  # page 1 arrives first: the reader copies it, stops at 2
        while not res:
            await trio.testing.wait_all_tasks_blocked()
            dev.release()
    assert (res[0] == DATA[: 3 * PAGE_SIZE]) == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv8_nowait_returns_what_it_copied(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOWAIT: a step that copied bytes returns them (a short read) instead of "would
    block"; only a step with no progress says would-block.

    Broken variant: would-block is raised even after bytes were copied (they are lost)."""
    breaks(variant, monkeypatch, PageCache, "_read_rest",
           "if parts:\n            return False", "if False:\n            return False")
    dev = GatedDevice(DATA)
    c = PageCache(dev, readahead_max=0)
    f = contiguous_file(64 * 1024)
    async with trio.open_nursery() as n:
        n.start_soon(c.read_dev, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        dev.release()
    got: bytes | None = None
    try:
        got = bytes(await c.read_file(f, None, 100, 3 * PAGE_SIZE, nowait=True))
    except WouldBlockError:
        got = None
    assert (got == DATA[100:PAGE_SIZE]) == (variant == "kernel")
    await trio.testing.wait_all_tasks_blocked()
    dev.release()


# -- 9. never block the loop -----------------------------------------------------------------
class StepTimer(trio.abc.Instrument):
    def __init__(self) -> None:
        self.t0: float | None = None
        self.longest = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.t0 = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.t0 is not None:
            self.longest = max(self.longest, time.perf_counter() - self.t0)


@pytest.mark.parametrize("variant", ["kernel", "blocking_backend"])
async def test_inv9_never_blocks_the_loop(variant: str) -> None:
    """A backend taking 100 ms per read does not slow cache hits on other pages: they keep
    completing in a few ms, and no task step is long.

    Broken variant: ``blocking_backend`` sleeps on the trio thread (a blocking pread)."""
    dev_cls = MemoryDevice if variant == "kernel" else SlowBlockingDevice
    dev = dev_cls(DATA, delay=0.1)
    c = PageCache(dev, readahead_max=0)
    dev.delay = 0.0
    await c.read_dev(0, 8 * PAGE_SIZE)  # warm pages 0..7 quickly
    dev.delay = 0.1
    timer = StepTimer()
    trio.lowlevel.add_instrument(timer)
    lat: list[float] = []
    try:
        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(c.read_dev, (100 + 10 * i) * PAGE_SIZE, 100)
            deadline = time.perf_counter() + 0.3
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await c.read_dev((len(lat) % 8) * PAGE_SIZE, 4096)
                await trio.sleep(0.002)
                lat.append(time.perf_counter() - t)
    finally:
        trio.lowlevel.remove_instrument(timer)
    lat.sort()
    # Thresholds leave room for a loaded 2-core machine; the broken variant blocks 100 ms.
    ok = lat[len(lat) // 2] < 0.005 and timer.longest < 0.06 and len(lat) > 20
    assert ok == (variant == "kernel"), (lat[len(lat) // 2], timer.longest, len(lat))


# -- 10. page states ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv10_page_states(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Created LOCKED and not UPTODATE; completion sets exactly one of UPTODATE/ERROR and
    unlocks; no reader returns data of a page that is not UPTODATE; the retry clears ERROR;
    UPTODATE data never changes.

    Broken variant: a failed read marks its pages UPTODATE (with no data) instead of ERROR."""
    breaks(variant, monkeypatch, pageio_mod, "end_page_read",
           "page.flags = (flags | PG_ERROR) & ~_RA_BITS",
           "page.flags = (flags | PG_UPTODATE) & ~_RA_BITS")
    dev = GatedDevice(DATA)
    c = PageCache(dev)
    outcomes: list[object] = []

    async def reader() -> None:
        try:
            outcomes.append(await c.read_dev(10, 20))
        except DeviceIOError:
            outcomes.append("EIO")

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        page = c.lookup(0)
        assert page is not None and page.flags & (PG_LOCKED | PG_UPTODATE) == PG_LOCKED
        dev.release(fail=True)
    sound = outcomes == ["EIO"] * 3 and page.flags & (PG_ERROR | PG_UPTODATE | PG_LOCKED) == (
        PG_ERROR
    )
    assert sound == (variant == "kernel")
    if variant != "kernel":
        return
    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert page.flags & PG_LOCKED and not page.flags & PG_ERROR  # retry cleared ERROR
        dev.release()
    assert outcomes[-1] == DATA[10:30]
    assert page.flags & (PG_ERROR | PG_UPTODATE | PG_LOCKED) == PG_UPTODATE
    data = page.data
    await c.read_dev(0, 4096)
    assert c.lookup(0) is page and page.data is data


# -- 11. revalidation ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv11_revalidate_after_wake(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a wake the reader looks the page up again: if the page it waited on was evicted
    and replaced before it ran, it uses (waits for) the replacement, never the old page.

    Broken variant: after the wake the reader copies from the page object it waited on."""
    if variant == "broken":

        async def stale_filemap_read(self: PageCache, off: int, end: int, parts: list[Any],
                                     ctx: object, nowait: bool) -> None:
            idx = off // PAGE_SIZE
            page = await self.filemap_get_pages(off, end, parts, None)
            assert page is not None
            await self.filemap_update_page(page, off, parts, nowait)
            parts.append(page.data[off - idx * PAGE_SIZE : end - idx * PAGE_SIZE])

        monkeypatch.setattr(PageCache, "filemap_read", stale_filemap_read)
    dev = GatedDevice(bytes(DATA))
    c = PageCache(dev)
    real_end_read = PageIO.end_read
    fired = False

    def end_read_then_replace(self: PageIO, pages: list[Any], *args: Any, **kw: Any) -> None:
        nonlocal fired
        real_end_read(self, pages, *args, **kw)  # wakes the reader (it has not run yet)
        if not fired:
            fired = True
            dev.data = b"\xee" * len(DATA)  # a later version of the device's bytes
            # A forced drop (as an invalidation would do): reclaim itself cannot take it,
            # the wake pinned it for the reader.
            c.lru.remove(pages[0])
            c.filemap_create_pages(0, 0)  # a replacement page, LOCKED, under new I/O

    monkeypatch.setattr(PageIO, "end_read", end_read_then_replace)
    res: list[bytes] = []

    async def reader() -> None:
        res.append(await c.read_dev(0, 16))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        while not res:
            await trio.testing.wait_all_tasks_blocked()
            dev.release()
    assert (res[0] == b"\xee" * 16) == (variant == "kernel")


# -- 12. dedup -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv12_one_backend_read_for_concurrent_misses(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many concurrent readers of one uncached range cause exactly one backend read.

    Broken variant: a reader that finds the page locked (I/O in flight) replaces it with a
    fresh page and reads it again itself."""
    breaks(variant, monkeypatch, PageCache, "filemap_create_pages",
           "        if p is None:\n            p = lock_page_new(Page(idx))\n",
           "        if p is None or p.flags & PG_LOCKED:\n"
           "            if p is not None:\n"
           "                self._lru.remove(p)\n"
           "            p = lock_page_new(Page(idx))\n")
    dev = GatedDevice(DATA)
    c = PageCache(dev)
    res: list[bytes] = []
    SPAN = 2 * PAGE_SIZE + 1000  # from 0..2900: first byte in page 0, last in page 2

    async def reader(i: int) -> None:
        # every range spans exactly pages 0-2, whichever reader trio happens to run first
        res.append(await c.read_dev(i * 100, SPAN))

    async with trio.open_nursery() as n:
        for i in range(30):
            n.start_soon(reader, i)
        while len(res) < 30:
            await trio.testing.wait_all_tasks_blocked()
            dev.release()
    assert sorted(res) == sorted(DATA[i * 100 : i * 100 + SPAN] for i in range(30))
    assert (c.stats()["backend_reads"] == 1) == (variant == "kernel")


# -- 13. readahead ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv13_marker_hit_starts_exactly_one_window(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The READAHEAD marker is test-and-cleared: of two readers that copy the marker page,
    only one starts the next async window.

    Broken variant: the marker is tested but not cleared, so every reader of the page starts
    another window."""
    breaks(variant, monkeypatch, cache_mod, "page_test_clear_readahead",
           "page.flags = flags & ~_RA_BITS", "page.flags = flags & ~PG_RA_UNUSED")
    windows = 0
    real = PageCache._readahead_task

    async def counting(self: PageCache, *args: Any) -> None:
        nonlocal windows
        windows += 1
        await real(self, *args)

    monkeypatch.setattr(PageCache, "_readahead_task", counting)
    c = PageCache(MemoryDevice(DATA), readahead_max=32 * PAGE_SIZE)
    f = contiguous_file(1 << 20)
    ra = c.new_readahead()
    await c.read_file(f, ra, 0, 100)  # window (0, 4), marker on file page 1
    marker = c.lookup(1)
    assert marker is not None and marker.flags & PG_READAHEAD
    ra2 = c.new_readahead()
    async with trio.open_nursery() as n:
        n.start_soon(c.read_file, f, ra, PAGE_SIZE, 100)
        n.start_soon(c.read_file, f, ra2, PAGE_SIZE, 100)
    await trio.testing.wait_all_tasks_blocked()
    assert (windows == 1) == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv13_marker_only_on_new_pages_and_within_eof(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marker goes only on a page the window itself created (a page already cached is
    not flagged), and the window never creates pages past the file's EOF.

    Broken variant: the marker is also set on an already cached page."""
    breaks(variant, monkeypatch, WindowReader, "_read_run",
           "        if idx in pages:  # cached, or in flight for someone else\n",
           "        if idx in pages and idx == rw.marker:\n"
           "            pages[idx].flags |= PG_READAHEAD\n"
           "        if idx in pages:\n")
    c = PageCache(MemoryDevice(DATA), readahead_max=32 * PAGE_SIZE)
    await c.read_dev(PAGE_SIZE, 10)  # device page 1 (file page 1) already cached
    f = contiguous_file(3 * PAGE_SIZE - 5)
    await c.read_file(f, c.new_readahead(), 0, 10)  # window (0, 4) clamped to 3 pages
    p1 = c.lookup(1)
    assert p1 is not None
    assert (not p1.flags & PG_READAHEAD) == (variant == "kernel")
    assert c.lookup(3) is None  # EOF clamp: nothing past the file
    assert all(not p.flags & PG_READAHEAD for p in c.lru if p.index != 1)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv13_io_error_shrinks_window(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error on a file read shrinks that file's readahead window.

    Broken variant: the error path forgets ``shrink_on_error``."""
    breaks(variant, monkeypatch, PageCache, "read_file",
           "            fra.shrink_on_error()", "            pass")
    dev = GatedDevice(DATA)
    c = PageCache(dev, readahead_max=32 * PAGE_SIZE)
    f = contiguous_file(1 << 20)
    ra = c.new_readahead()
    errors: list[DeviceIOError] = []

    async def reader() -> None:
        try:
            await c.read_file(f, ra, 0, 100)
        except DeviceIOError as e:
            errors.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        while not errors:
            # a failed coalesced read is retried page by page (only the pages that really
            # fail get ERROR): fail those retries too
            dev.release(fail=True)
            await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1
    assert (ra.ra_pages < 32) == (variant == "kernel")


async def test_random_reads_do_not_read_ahead() -> None:
    dev = MemoryDevice(DATA)
    c = PageCache(dev, readahead_max=32 * PAGE_SIZE)
    f = contiguous_file(1 << 20)
    ra = c.new_readahead()
    for off in (700_000, 100_000, 400_000, 900_000):
        await c.read_file(f, ra, off, 100)
    assert ra.state() == (0, 0, 0) and c.stats()["readahead_pages"] == 0
    assert all(length == PAGE_SIZE for _, length in dev.reads)


# -- 14. bounded memory -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv14_cache_stays_within_limit(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache exceeds its limit only by pages locked for I/O (and pinned between a
    reader's wake and its copy): once reads complete and readers copy, it is back within
    the limit, without re-reading pages that woken readers were about to copy.

    Broken variant: only insertion reclaims (not I/O completion nor the reader after its
    copy), so pages brought in while everything was locked stay over the limit."""
    breaks(variant, monkeypatch, PageIO, "end_read",
           "    if reclaim:\n        self._reclaim()\n", "")
    breaks(variant, monkeypatch, PageCache, "_copy_step",
           "self._shrink()  # pages pinned", "pass  # pages pinned")
    dev = GatedDevice(DATA)
    c = PageCache(dev, cache_bytes=8 * PAGE_SIZE, readahead_max=0)

    async def reader(i: int) -> None:
        await c.read_dev(i * 2 * PAGE_SIZE, PAGE_SIZE)

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(reader, i)
        await trio.testing.wait_all_tasks_blocked()
        locked = sum(1 for p in c.lru if p.flags & PG_LOCKED)
        assert len(c.lru) <= 8 + locked
        dev.release()
    within = len(c.lru) <= 8
    assert within == (variant == "kernel")
    assert c.stats()["backend_reads"] == 20  # no page was reclaimed under its woken reader


@pytest.mark.parametrize("variant", VARIANTS)
async def test_inv14_parked_reader_pins_nothing(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that copied part of its range and parks holds its own copy, not views of
    the pages it copied from: while it sleeps, those pages are evicted and their frames
    reused for other pages, and it still returns the right bytes.

    Broken variant: the reader parks holding views of the frames it copied from."""
    breaks(variant, monkeypatch, PageCache, "_own_parts",
           "if parts and (len(parts) > 1 or not isinstance(parts[0], bytearray)):",
           "if False:")
    dev = GatedDevice(DATA)
    c = PageCache(dev, cache_bytes=4 * PAGE_SIZE, readahead_max=0)
    async with trio.open_nursery() as n:
        n.start_soon(c.read_dev, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        dev.release()
    page0 = c.lookup(0)
    assert page0 is not None
    res: list[bytes] = []

    async def reader() -> None:
        res.append(await c.read_dev(100, 2 * PAGE_SIZE))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert c.stats()["parked_now"] == 1
        assert all(p.refcount == 0 for p in c.lru)
        # Other pages push page 0 out; the host cache answers them at once, into frames
        # that include page 0's old one.
        # (Each is read twice: page 0 is active, and only a busier active list ages it.)
        dev.host_cached = True
        for i in [j for j in range(10, 30) for _ in range(2)]:
            assert await c.read_dev(i * PAGE_SIZE, PAGE_SIZE) == DATA[
                i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        assert c.lookup(0) is None
        # frames were reused, not carved anew: 21 pages read into one block's frames
        assert c.arena.frames <= c.arena.block_frames
        dev.release()
    assert (res == [DATA[100 : 100 + 2 * PAGE_SIZE]]) == (variant == "kernel")


async def test_device_extent_past_end_is_eio() -> None:
    c = PageCache(MemoryDevice(DATA))
    f = ListFileMap(10, [Run(0, 10, dev_off=len(DATA) - 5)])
    with pytest.raises(DeviceIOError):
        await c.read_file(f, None, 0, 10)
