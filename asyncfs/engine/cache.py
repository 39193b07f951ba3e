"""The page cache and its read step, in the shape of the kernel's mm/filemap.c.

``PageCache`` owns the pages of one filesystem device (keyed by device page index), the hashed
wait table, reclaim and the per-file readahead state, and implements
``engine.interfaces.DeviceReader``. Backend I/O (start, completion, retries, what is in
flight) is ``engine.pageio.PageIO``; turning readahead windows into pages and folios is
``engine.readahead.WindowReader``; the page-state transitions are
``pagecache.transitions``.

A read (``read_dev``, ``read_file``) first copies the UPTODATE prefix of its range
(``_copy_uptodate``); only a read that stops short goes on to ``filemap_read``, whose every
step is:

1. ``filemap_get_pages``: the file's ``page_cache_sync_readahead`` on its first miss, else
   ``filemap_create_pages``: the missing pages of the request created LOCKED and read, one
   backend read per contiguous run;
2. ``filemap_update_page``: wait for the page the read needs next, with the async page lock
   of the Linux patch "mm: add support for async page locking": a page under I/O gets a wait
   entry whose callback reschedules the reader (``wait_on_page_locked_async``); a page whose
   read failed is locked (``lock_page_async``) and read again;
3. ``_copy_step``: copy what is UPTODATE now, reclaim, and start the async readahead of a
   marker met (``page_cache_async_readahead``).

A step that copied bytes never parks (invariant 8, docs/invariants.md) and every wake is
followed by a fresh lookup (invariant 11). Everything runs on one trio thread; the pure state
in ``asyncfs.pagecache`` is only changed between awaits, so each step is atomic.
"""

from __future__ import annotations

import logging
from typing import Literal

import trio

from asyncfs.engine.arena import PageArena
from asyncfs.engine.interfaces import FileMap
from asyncfs.engine.pageio import MAX_IO_PAGES, PageIO, ReadBatch
from asyncfs.engine.readahead import ReadCtx, WindowReader
from asyncfs.engine.waiting import Waiter
from asyncfs.errors import AsyncfsError, DeviceIOError, WouldBlockError
from asyncfs.io.device import BlockDevice
from asyncfs.pagecache import FileReadahead, PageLRU, ReadaheadWindow, WaitTable
from asyncfs.pagecache.lru import SHADOW_SHIFT
from asyncfs.pagecache.page import (
    LRU_ACTIVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_ERROR,
    PG_LOCKED,
    PG_RA_UNUSED,
    PG_READAHEAD,
    PG_REFERENCED,
    PG_UPTODATE,
    Page,
)
from asyncfs.pagecache.transitions import (
    clear_page_error,
    lock_page_for_retry,
    lock_page_new,
    page_test_clear_ra_unused,
    page_test_clear_readahead,
)
from asyncfs.types import Run

__all__ = ["MAX_IO_PAGES", "PageCache"]  # (MAX_IO_PAGES: bench/soak.py reads it from here)

log = logging.getLogger(__name__)

Parts = list[bytes | bytearray | memoryview]

_ZEROS = bytes(1 << 20)
_RA_BITS = PG_READAHEAD | PG_RA_UNUSED


def _zeros(n: int) -> bytes | memoryview:
    if n <= len(_ZEROS):
        return memoryview(_ZEROS)[:n]
    return bytes(n)


def _unmapped_bytes(run: Run) -> bytes | memoryview:
    """The bytes of a run with no device extent: inline data, or a hole's zeros."""
    if run.data is not None:
        return run.data[: run.length]
    return _zeros(run.length)


class PageCache:
    """A size-bounded page cache of one block device, with the async page lock."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        cache_bytes: int = 256 * 2**20,
        cache_max_bytes: int | None = None,
        wait_mode: Literal["async", "threads"] = "async",
        threads: int = 16,
        readahead_max: int = 128 * 1024,
        wait_table_bits: int = 8,
        arena: PageArena | None = None,
    ) -> None:
        self._dev = device
        self._arena = arena if arena is not None else PageArena()
        if self._arena.block_frames > 1 << SHADOW_SHIFT:  # (its shadow entries: one run)
            raise ValueError("a folio's pages must lie in one shadow group")
        self._dev_size = device.size
        # ``cache_bytes`` is where the cache starts; it grows towards ``cache_max_bytes`` only
        # on refaults (PageLRU), so a stream never pays for touching the larger ceiling.
        start_pages = max(1, cache_bytes // PAGE_SIZE)
        max_pages = None if cache_max_bytes is None else max(1, cache_max_bytes // PAGE_SIZE)
        self._lru = PageLRU(start_pages, max_pages)  # ValueError if max < start
        self._wt = WaitTable(wait_table_bits)
        self._waiter = Waiter(self._wt, wait_mode, threads)
        # A window larger than a quarter of the cache would be locked beyond the cache's
        # limit while in flight and reclaimed before it is read (a 4 MiB cache with the 8 MiB
        # default window grew RSS in the soak and wasted the I/O): clamp it.
        self._ra_pages = min(max(0, readahead_max), cache_bytes // 4) // PAGE_SIZE
        self._io = PageIO(device, self._arena, self._wt, self._lru, self._shrink)
        self._windows = WindowReader(self._lru, self._arena, self._io, self._dev_size,
                                     self._shrink)
        self.hits = 0  # pages copied that were UPTODATE when reached
        self.misses = 0  # read steps stopped at a page that was not UPTODATE
        self.readahead_used = 0
        self.refault_around_pages = 0  # pages read back with a refaulted neighbour

    # -- introspection (tests, soak, stats) ---------------------------------------------
    @property
    def wait_table(self) -> WaitTable:
        return self._wt

    @property
    def lru(self) -> PageLRU:
        return self._lru

    @property
    def waiter(self) -> Waiter:
        return self._waiter

    @property
    def arena(self) -> PageArena:
        return self._arena

    @property
    def pageio(self) -> PageIO:
        return self._io

    @property
    def device_size(self) -> int:
        return self._dev_size

    @property
    def backend_reads(self) -> int:
        return self._io.backend_reads

    @property
    def backend_bytes(self) -> int:
        return self._io.backend_bytes

    @property
    def backend_nowait_reads(self) -> int:
        return self._io.backend_nowait_reads

    @property
    def inflight_io(self) -> int:
        return self._io.inflight_io

    @property
    def readahead_pages(self) -> int:
        return self._windows.readahead_pages

    @property
    def folios_created(self) -> int:
        return self._windows.folios_created

    def lookup(self, index: int) -> Page | None:
        return self._lru.pages.get(index)

    def stats(self) -> dict[str, int | str]:
        n = len(self._lru.pages)
        c = self._waiter.counters
        io = self._io
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "backend_reads": io.backend_reads,
            "backend_bytes": io.backend_bytes,
            "backend_nowait_reads": io.backend_nowait_reads,
            "parked_now": c.parked_now,
            "parked_total": c.parked_total,
            "wakeups": self._wt.wakeups,
            "inflight_io": io.inflight_io,
            "pages_cached": n,
            "frames_mapped": self._arena.frames,
            "folios_created": self._windows.folios_created,
            "cache_bytes": n * PAGE_SIZE,
            "cache_limit_bytes": self._lru.limit * PAGE_SIZE,
            "cache_max_bytes": self._lru.max_limit * PAGE_SIZE,
            "cache_grown_pages": self._lru.grown,
            "readahead_pages": self._windows.readahead_pages,
            "readahead_used": self.readahead_used,
            "refault_around_pages": self.refault_around_pages,
            "evictions": self._lru.evictions,
            "wait_mode": self._waiter.mode,
        }

    def new_readahead(self) -> FileReadahead:
        return FileReadahead(self._ra_pages)

    # -- public reads -------------------------------------------------------------------
    async def read_dev(self, off: int, length: int, *, nowait: bool = False) -> bytes:
        """``length`` bytes of the device at ``off`` through the cache (no readahead).
        ``nowait`` (IOCB_NOWAIT): never park; start any needed I/O, return the bytes that are
        ready (a short result) or raise ``WouldBlockError`` if none are."""
        if length <= 0:
            return b""
        end = off + length
        if off < 0 or end > self._dev_size:
            raise DeviceIOError(
                f"read of {length} bytes at {off} is outside the device ({self._dev_size} bytes)"
            )
        self._check_open()
        self._arena.quiesce()  # this task holds no frame views now (see _own_parts)
        parts: Parts = []
        got = self._copy_uptodate(off, end, parts, None)
        if got < end:
            await self._read_rest(got, end, parts, None, nowait)
        if len(parts) == 1:
            p = parts[0]
            return p if isinstance(p, bytes) else bytes(p)
        return b"".join(parts)

    async def read_file(
        self,
        fmap: FileMap,
        ra: object | None,
        off: int,
        size: int,
        *,
        nowait: bool = False,
    ) -> bytes | memoryview:
        """Up to ``size`` bytes of the file at ``off``, short only at EOF (or, with
        ``nowait``, when the rest would need to wait). Raises ``DeviceIOError`` on EIO.
        A ``memoryview`` result may view a page's frame, which is reused once evicted: it is
        valid only until the caller's next ``await`` (copy it to keep it longer)."""
        fsize = fmap.size
        if size <= 0 or off >= fsize or off < 0:
            return b""
        end = min(off + size, fsize)
        self._check_open()
        runs = await fmap.map(off, end - off)
        self._arena.quiesce()  # this task holds no frame views now (see _own_parts)
        fra = ra if isinstance(ra, FileReadahead) and self._ra_pages else None
        parts: Parts = []
        markers: list[int] | None = [] if fra is not None else None
        ctx: ReadCtx | None = None  # made only when readahead may be needed
        try:
            for run in runs:  # device extents through the cache; inline data, holes as is
                if run.dev_off is None:
                    parts.append(_unmapped_bytes(run))
                    continue
                dev_off, dev_end = self._run_range(run)
                got = self._copy_uptodate(dev_off, dev_end, parts, markers)
                if got == dev_end and not markers:
                    continue  # all cached, no marker met: the common case
                if fra is not None:
                    if ctx is None:
                        ctx = ReadCtx(fmap, fra, off, end)
                    ctx.run = run
                    if markers:
                        self.page_cache_async_readahead(ctx, markers)
                if got < dev_end and not await self._read_rest(
                        got, dev_end, parts, ctx, nowait):
                    break  # NOWAIT after progress: a short read, the caller continues
        except DeviceIOError:
            if fra is not None:
                fra.shrink_on_error()
            raise
        if fra is not None:
            fra.note_read((end - 1) >> PAGE_SHIFT)
        if len(parts) == 1:
            # A single page is handed out as a view of its frame, not copied (the copy would
            # be a large share of a cache hit's cost): valid until the caller's next await.
            p = parts[0]
            return bytes(p) if isinstance(p, bytearray) else p
        return b"".join(parts)

    def _run_range(self, run: Run) -> tuple[int, int]:
        """The device byte range of a file's mapped run; DeviceIOError if it lies (partly)
        outside the device (a corrupt extent)."""
        assert run.dev_off is not None
        dev_off = run.dev_off
        dev_end = dev_off + max(run.length, 0)
        if dev_off < 0 or dev_off + run.length > self._dev_size:
            raise DeviceIOError(f"file extent at device offset {dev_off} runs past the device end")
        return dev_off, dev_end

    async def _read_rest(
        self, off: int, end: int, parts: Parts, ctx: ReadCtx | None, nowait: bool
    ) -> bool:
        """``filemap_read`` for the part of a range past its cached prefix. False when,
        with ``nowait``, it would block after bytes were copied: those bytes are the (short)
        answer; with none copied, WouldBlockError."""
        try:
            await self.filemap_read(off, end, parts, ctx, nowait)
        except WouldBlockError:
            if parts:
                return False
            raise
        return True

    async def lock_page(self, page: Page) -> None:
        """Take a page lock for a trio task (async lock with hand-off; see Waiter)."""
        await self._waiter.lock_page(page)

    def unlock_page(self, page: Page) -> None:
        self._wt.unlock_page(page)
        self._shrink()

    async def aclose(self) -> None:
        """Stop: cancel backend reads in flight (their pages fail with EIO, waking every
        waiter) and wait for them to finish. Does not close the device (its owner does)."""
        await self._io.aclose()

    # -- the read step (mm/filemap.c) -----------------------------------------------------
    async def filemap_read(
        self, off: int, end: int, parts: Parts, ctx: ReadCtx | None, nowait: bool
    ) -> None:
        """Read device range ``[off, end)`` whose page at ``off`` is not UPTODATE, step by
        step until the end: each step starts or waits for the page it needs, then copies.
        Progress never ends the read early (invariant 8): the next step goes on from where
        this one stopped."""
        markers: list[int] | None = [] if ctx is not None else None
        while True:
            page = await self.filemap_get_pages(off, end, parts, ctx)
            if page is not None:
                await self.filemap_update_page(page, off, parts, nowait)
            new_off = self._copy_step(off, end, parts, markers, ctx)
            if new_off >= end:
                return
            off = new_off

    async def filemap_get_pages(
        self, off: int, end: int, parts: Parts, ctx: ReadCtx | None
    ) -> Page | None:
        """Start what the read needs at ``off``: on a file read's first missing page its
        sync readahead, else the missing pages of the rest of the range. The page to wait
        for, or None when the step should just look again (readahead ran, or the probe
        filled the page at once)."""
        idx = off >> PAGE_SHIFT
        pages = self._lru.pages
        if ctx is not None and not ctx.ra_done and idx not in pages:
            ctx.ra_done = True
            self._own_parts(parts)
            await self.page_cache_sync_readahead(ctx, idx)
            return None  # (this stop is counted when the step looks again)
        self.misses += 1  # the page this read needs next is not UPTODATE
        self.filemap_create_pages(idx, (end - 1) >> PAGE_SHIFT)
        page = pages.get(idx)
        if page is None or page.flags & PG_UPTODATE:
            return None  # ended by the RWF_NOWAIT probe: copy it in this same step
        return page

    async def filemap_update_page(
        self, page: Page, off: int, parts: Parts, nowait: bool
    ) -> None:
        """Wait until ``page`` (not UPTODATE) is no longer under I/O; the caller looks it up
        again afterwards (invariant 11). A page a failed read left unlocked is locked and
        read again, with or without ``nowait``."""
        if not page.flags & PG_LOCKED:
            self._own_parts(parts)
            await self._lock_and_retry(page)
            return
        if nowait:
            raise WouldBlockError(f"device page {off >> PAGE_SHIFT} needs I/O")
        self._own_parts(parts)
        await self._wait_unlocked(page)

    def _copy_step(
        self, off: int, end: int, parts: Parts, markers: list[int] | None,
        ctx: ReadCtx | None,
    ) -> int:
        """Copy what is UPTODATE from ``off`` on, reclaim back to the limit, and start the
        async readahead of a marker met. Returns where the copy stopped."""
        got = self._copy_uptodate(off, end, parts, markers)
        if len(self._lru.pages) > self._lru.limit:
            self._shrink()  # pages pinned for this copy may be reclaimed now
        if markers and ctx is not None:
            self.page_cache_async_readahead(ctx, markers)
        return got

    def _copy_uptodate(
        self, off: int, end: int, parts: Parts, markers: list[int] | None,
    ) -> int:
        """``filemap_get_read_batch`` and the copy in one pass: append the UPTODATE prefix of
        device range ``[off, end)`` to ``parts`` as views of the frames; return where it
        stopped. Readahead markers met are consumed into ``markers`` (when given)."""
        get = self._lru.pages.get
        lru = self._lru
        append = parts.append
        idx = off >> PAGE_SHIFT
        start_idx = idx
        while off < end:
            p = get(idx)
            if p is None:
                break
            flags = p.flags
            if not flags & PG_UPTODATE:
                break
            if flags & _RA_BITS:
                flags = self._readahead_hit(p, idx, markers)
            if p.lru != LRU_ACTIVE or not flags & PG_REFERENCED:
                lru.mark_accessed(p)
            base = p.index << PAGE_SHIFT  # (a folio's first page may lie before ``off``)
            pend = base + (p.nr << PAGE_SHIFT)
            if off == base and end >= pend:
                append(p.data)  # the whole page or folio (a short last page never gets here)
                off = pend
            else:
                if pend > end:
                    pend = end
                append(p.data[off - base : pend - base])
                off = pend
            idx = p.index + p.nr
        self.hits += idx - start_idx
        return off

    def _readahead_hit(self, page: Page, idx: int, markers: list[int] | None) -> int:
        """A page readahead brought in is read: count it once, and consume its marker into
        ``markers`` (a file read) so exactly one reader starts the next window. Returns the
        page's flags now."""
        if page_test_clear_ra_unused(page):
            self.readahead_used += page.nr
        if markers is not None and page_test_clear_readahead(page):
            markers.append(idx)
        return page.flags

    def _own_parts(self, parts: Parts) -> None:
        """Before a read step ends (an ``await``): copy out the bytes gathered so far, so the
        sleeping request pins no page (invariant 14) and holds no view of a frame, which may
        be reused once this step ends. Frames freed until now may then be reused."""
        if parts and (len(parts) > 1 or not isinstance(parts[0], bytearray)):
            joined = bytearray().join(parts)
            parts.clear()
            parts.append(joined)
        self._arena.quiesce()

    async def _wait_unlocked(self, page: Page) -> None:
        """Park until ``page`` unlocks (``wait_on_page_locked_async``). EIO if its read
        failed; the caller looks the page up again either way (invariant 11)."""
        entry = self._waiter.new_entry(exclusive=False)
        if self._wt.wait_on_page_locked_async(page, entry):
            return
        await self._waiter.park(entry)
        flags = entry.flags_at_wake
        if flags & PG_ERROR and not flags & PG_UPTODATE:
            raise DeviceIOError(
                f"I/O error reading device bytes {page.index * PAGE_SIZE}"
                f"..{(page.index + page.nr) * PAGE_SIZE - 1}"
            )

    async def _lock_and_retry(self, page: Page) -> None:
        """A page a failed read left !UPTODATE: lock it (``lock_page_async``), and if it is
        still cached and still not UPTODATE, clear ERROR and read it again (invariant 10)."""
        await self._waiter.lock_page(page)
        if self._lru.pages.get(page.index) is not page or page.flags & PG_UPTODATE:
            self._wt.unlock_page(page)
            return
        clear_page_error(page)
        self._io.read_pages([page])
        if not page.flags & (PG_LOCKED | PG_UPTODATE):
            # Failed at once (no memory for its frame): report it rather than retry forever.
            raise DeviceIOError(f"cannot read device page {page.index}: no memory for it")

    def filemap_create_pages(self, first: int, last: int) -> None:
        """``filemap_create_folio`` for a range: create the missing pages of ``[first,
        last]`` LOCKED and start one read per contiguous run; pages after ``first`` that a
        failed read left unlocked join the runs (trylock, ERROR cleared). A refault brings
        its reclaimed neighbours back with it (``_refault_around``)."""
        pages = self._lru.pages
        last = min(last, (self._dev_size - 1) >> PAGE_SHIFT)
        batch = ReadBatch(self._io)
        created = False
        refaulted: list[int] = []
        idx = first
        while idx <= last:
            p = pages.get(idx)
            if p is None:
                p = lock_page_new(Page(idx))
                self._lru.insert(p)
                if p.lru == LRU_ACTIVE:  # a refault (PageLRU puts only those there)
                    refaulted.append(idx)
                created = True
            elif p.nr == 1 and not p.flags & (PG_UPTODATE | PG_LOCKED) and idx != first:
                lock_page_for_retry(p)
            else:  # cached, in flight, the caller's own page to retry, or a folio
                batch.flush()
                idx = p.index + p.nr
                continue
            batch.add(p)
            idx += 1
        batch.flush()
        if refaulted and self._lru.headroom:
            self._refault_around(refaulted)
        if created:
            self._reclaim_keeping(first)

    def _reclaim_keeping(self, index: int) -> None:
        """Reclaim, with the page at ``index`` pinned: it may have been filled at once by the
        probe, and reclaim must not undo the step's progress."""
        head = self._lru.pages.get(index)
        if head is None:  # pragma: no cover - `index` was just created or already present
            self._shrink()
            return
        head.refcount += 1
        self._shrink()
        head.refcount -= 1

    def _refault_around(self, refaulted: list[int]) -> None:
        """Bring back, with the refaulted pages, the pages reclaimed next to them (their
        shadow group of 64), while the cache may still grow: a working set that was pushed
        out together (by a stream, or by a cache that was too small) comes back in a few
        large reads instead of one miss per page. A refault is the evidence (PageLRU); the
        cache grows by each page brought back, within ``headroom``, so a cache at its
        ceiling never does this."""
        lru = self._lru
        last_dev = (self._dev_size - 1) >> PAGE_SHIFT
        budget = lru.headroom
        batch = ReadBatch(self._io)
        for idx in refaulted:
            # A remembered page is never cached, and inserting it forgets it: a group already
            # brought back (two refaults in one group) yields nothing the second time.
            for j in lru.remembered_near(idx):
                if budget <= 0 or j > last_dev:
                    break
                p = lock_page_new(Page(j, PG_RA_UNUSED))
                lru.insert(p)  # a refault too: grows ``limit`` by this page
                budget -= 1
                self.refault_around_pages += 1
                batch.add(p)
            batch.flush()

    # -- readahead (mm/readahead.c) ----------------------------------------------------------
    async def page_cache_sync_readahead(self, ctx: ReadCtx, dev_idx: int) -> None:
        """A file read missed at device page ``dev_idx``: let the file's readahead state
        choose a window and read it, unless it is just the request (a random read)."""
        index = ctx.file_page(dev_idx)
        win = ctx.ra.ondemand(
            index, ctx.req_last - index + 1, hit_marker=False, eof_pages=ctx.eof_pages
        )
        if win is None or not win.size:
            return
        if win.marker is None and win.start >= index and win.start + win.size - 1 <= ctx.req_last:
            # A random read ("read as is"): the window is the request itself, which the
            # step's own filemap_create_pages reads; mapping it again would only cost CPU.
            return
        await self._windows.read_window(ctx, win)

    def page_cache_async_readahead(self, ctx: ReadCtx, markers: list[int]) -> None:
        """A marker was hit: start the next window without waiting for its I/O. Mapping the
        window may itself need metadata reads, so it runs as its own system task."""
        index = ctx.file_page(markers[-1])
        markers.clear()
        win = ctx.ra.ondemand(index, 1, hit_marker=True, eof_pages=ctx.eof_pages)
        if win is None or not win.size:
            return
        trio.lowlevel.spawn_system_task(
            self._readahead_task, ctx, win, name="asyncfs-readahead"
        )

    async def _readahead_task(self, ctx: ReadCtx, win: ReadaheadWindow) -> None:
        try:
            await self._windows.read_window(ctx, win)
        except (trio.Cancelled, AsyncfsError) as e:
            # Readahead is a hint: a bad extent or a failing device is reported to the
            # reader that actually needs the bytes, not here.
            log.debug("readahead of file pages %d+%d dropped: %s", win.start, win.size, e)
        except Exception:  # a readahead failure must never take the loop down
            log.exception("readahead of file pages %d+%d failed", win.start, win.size)

    # -- reclaim ----------------------------------------------------------------------------
    def _shrink(self) -> None:
        lru = self._lru
        if len(lru.pages) > lru.limit:
            free_frame = self._io.free_frame
            for p in lru.shrink():
                free_frame(p)

    def _check_open(self) -> None:
        if self._io.closed:
            raise DeviceIOError("the page cache is closed")
