"""The page cache read path (``generic_file_buffered_read`` with the seed's IOCB_WAITQ/NOWAIT).

``PageCache`` owns the pages of one filesystem device (keyed by device page index), the hashed
wait table, reclaim, per-file readahead and the backend I/O tasks. It implements
``engine.interfaces.DeviceReader``. Everything runs on one trio thread; the pure state lives in
``asyncfs.pagecache`` and is only mutated between awaits, so each step below is atomic.

A read step copies the UPTODATE prefix of its range; at the first page that is not UPTODATE it
creates the missing pages LOCKED, submits one coalesced backend read per contiguous run, and
(unless it copied bytes, §4.8) parks on a wait entry until the page unlocks, then looks the
page up again (§4.11). No reader owns a backend read: it completes by callback from the ring
(``submit_read``) or, on backends without one, in a trio system task, so a cancelled reader
never cancels an I/O other readers wait on; completion sets UPTODATE or ERROR, unlocks and
wakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Literal

import trio

from asyncfs.engine.arena import PageArena
from asyncfs.engine.interfaces import FileMap
from asyncfs.engine.waiting import Waiter
from asyncfs.errors import AsyncfsError, DeviceIOError, WouldBlockError
from asyncfs.io.device import BlockDevice, IntoCallback, ReadCallback
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
from asyncfs.types import Run

log = logging.getLogger(__name__)

# Largest single backend read the cache submits (1 MiB, in pages); longer runs are split.
MAX_IO_PAGES = (1 << 20) >> PAGE_SHIFT
# A folio is one block of the arena (``arena.FOLIO_PAGES``, 64 KiB): a file readahead window
# covers each aligned group of that many pages that it reads whole with one folio, so a stream
# costs one Page, one lock, one wake, one iovec and one reclaim per 64 KiB instead of per
# 4 KiB. Random reads and metadata keep 4 KiB pages.
_ZEROS = bytes(1 << 20)
_SPECIAL = PG_READAHEAD | PG_RA_UNUSED


def _splittable(pages: list[Page]) -> bool:
    """Whether a failed read of ``pages`` is retried page by page (more than one page)."""
    return len(pages) > 1 or pages[0].nr > 1


def _zeros(n: int) -> bytes | memoryview:
    if n <= len(_ZEROS):
        return memoryview(_ZEROS)[:n]
    return bytes(n)


class _FileCtx:
    """What a device-range read needs to know about the file it serves (readahead glue)."""

    __slots__ = ("eof_pages", "fmap", "ra", "ra_done", "req_first", "req_last", "run")

    def __init__(self, fmap: FileMap, ra: FileReadahead, off: int, end: int) -> None:
        self.fmap = fmap
        self.ra = ra
        self.req_first = off >> PAGE_SHIFT
        self.req_last = (end - 1) >> PAGE_SHIFT
        self.eof_pages = (fmap.size + PAGE_SIZE - 1) >> PAGE_SHIFT
        self.ra_done = False
        self.run: Run | None = None

    def file_page(self, dev_idx: int) -> int:
        run = self.run
        assert run is not None and run.dev_off is not None
        dev_byte = max(dev_idx << PAGE_SHIFT, run.dev_off)
        return (run.file_off + dev_byte - run.dev_off) >> PAGE_SHIFT


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
        self._folio_pages = self._arena.block_frames  # pages of a folio
        if self._folio_pages > 1 << SHADOW_SHIFT:  # (its shadow entries: one run of bits)
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
        self._closed = False
        submit_read = getattr(device, "submit_read", None)
        self._submit_read: Callable[[int, int, ReadCallback], bool] | None = (
            submit_read if callable(submit_read) else None
        )
        # Backends that read straight into the pages' frames (``IntoReads``).
        self._submit_into: Callable[[int, list[memoryview], IntoCallback], bool] | None = (
            getattr(device, "submit_read_into", None))
        self._nowait_into: Callable[[int, list[memoryview]], bool] | None = getattr(
            device, "read_nowait_into", None)
        # Reads started through ``submit_read``, by key, until their callback (or aclose).
        self._cb_reads: dict[int, list[Page]] = {}
        self._cb_next = 0
        self._io_scopes: set[trio.CancelScope] = set()
        self._idle: trio.Event | None = None
        # counters
        self.hits = 0
        self.misses = 0
        self.backend_reads = 0
        self.backend_bytes = 0
        self.backend_nowait_reads = 0
        self.inflight_io = 0
        self.readahead_pages = 0
        self.readahead_used = 0
        self.refault_around_pages = 0  # pages read back with a refaulted neighbour
        self.folios_created = 0

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
    def device_size(self) -> int:
        return self._dev_size

    def lookup(self, index: int) -> Page | None:
        return self._lru.pages.get(index)

    def stats(self) -> dict[str, int | str]:
        n = len(self._lru.pages)
        c = self._waiter.counters
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "backend_reads": self.backend_reads,
            "backend_bytes": self.backend_bytes,
            "backend_nowait_reads": self.backend_nowait_reads,
            "parked_now": c.parked_now,
            "parked_total": c.parked_total,
            "wakeups": self._wt.wakeups,
            "inflight_io": self.inflight_io,
            "pages_cached": n,
            "frames_mapped": self._arena.frames,
            "folios_created": self.folios_created,
            "cache_bytes": n * PAGE_SIZE,
            "cache_limit_bytes": self._lru.limit * PAGE_SIZE,
            "cache_max_bytes": self._lru.max_limit * PAGE_SIZE,
            "cache_grown_pages": self._lru.grown,
            "readahead_pages": self.readahead_pages,
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
        parts: list[bytes | bytearray | memoryview] = []
        got = self._copy_prefix(off, end, parts, None)
        if got < end:
            try:
                await self._read_slow(got, end, parts, None, nowait)
            except WouldBlockError:
                if not parts:
                    raise
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
        ctx: _FileCtx | None = None
        parts: list[bytes | bytearray | memoryview] = []
        markers: list[int] = []
        dev_size = self._dev_size
        try:
            for run in runs:
                if run.dev_off is None:
                    if run.data is not None:
                        parts.append(run.data[: run.length])
                    else:
                        parts.append(_zeros(run.length))
                    continue
                d0 = run.dev_off
                d1 = d0 + run.length
                if d0 < 0 or d1 > dev_size:
                    raise DeviceIOError(
                        f"file extent at device offset {d0} runs past the device end"
                    )
                if run.length <= 0:
                    continue
                got = self._copy_prefix(d0, d1, parts, markers if fra is not None else None)
                if markers and fra is not None:
                    if ctx is None:
                        ctx = _FileCtx(fmap, fra, off, end)
                    ctx.run = run
                    self._async_readahead(ctx, markers)
                if got < d1:
                    if fra is not None and ctx is None:
                        ctx = _FileCtx(fmap, fra, off, end)
                    if ctx is not None:
                        ctx.run = run
                    try:
                        await self._read_slow(got, d1, parts, ctx, nowait)
                    except WouldBlockError:
                        if parts:
                            break  # partial progress: a short read, the caller continues
                        raise
        except DeviceIOError:
            if fra is not None:
                fra.shrink_on_error()
            raise
        if fra is not None:
            fra.note_read((end - 1) >> PAGE_SHIFT)
        if len(parts) == 1:
            # A single page is handed out as a view of its frame, not copied (a 4 KiB copy
            # was a third of a cache hit's cost): valid until the caller's next await.
            p = parts[0]
            return bytes(p) if isinstance(p, bytearray) else p
        return b"".join(parts)

    async def lock_page(self, page: Page) -> None:
        """Take a page lock for a trio task (async lock with hand-off; see Waiter)."""
        await self._waiter.lock_page(page)

    def unlock_page(self, page: Page) -> None:
        self._wt.unlock_page(page)
        self._shrink()

    async def aclose(self) -> None:
        """Stop: cancel backend reads in flight (their pages fail with EIO, waking every
        waiter) and wait for them to finish. Does not close the device (its owner does)."""
        self._closed = True
        for cs in list(self._io_scopes):
            cs.cancel()
        # Reads the backend completes by callback: fail their pages now (waking every waiter);
        # the callback, when it comes, finds nothing to do.
        cb_reads, self._cb_reads = self._cb_reads, {}
        for pages in cb_reads.values():
            self._drop_frames(pages)  # still the target of a read in the kernel
            self._complete(pages, None, "page cache closed", pages[0].index << PAGE_SHIFT, 0)
        if self.inflight_io:
            self._idle = trio.Event()
            with trio.CancelScope(shield=True):
                await self._idle.wait()

    # -- the step -----------------------------------------------------------------------
    def _copy_prefix(
        self,
        off: int,
        end: int,
        parts: list[bytes | bytearray | memoryview],
        markers: list[int] | None,
    ) -> int:
        """Copy the UPTODATE prefix of device range ``[off, end)`` into ``parts``; return
        where it stopped. READAHEAD markers met are test-and-cleared into ``markers``."""
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
            if flags & _SPECIAL:
                if flags & PG_RA_UNUSED:
                    self.readahead_used += p.nr
                if flags & PG_READAHEAD and markers is not None:
                    markers.append(idx)
                    p.flags = flags = flags & ~(PG_RA_UNUSED | PG_READAHEAD)
                else:
                    p.flags = flags = flags & ~PG_RA_UNUSED
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
        n = idx - start_idx
        self.hits += n
        return off

    async def _read_slow(
        self,
        off: int,
        end: int,
        parts: list[bytes | bytearray | memoryview],
        ctx: _FileCtx | None,
        nowait: bool,
    ) -> None:
        """The WAITQ loop: step, and park only in a step that copied nothing."""
        pages = self._lru.pages
        markers: list[int] | None = [] if ctx is not None else None
        first = True
        while True:
            if not first:
                new_off = self._copy_prefix(off, end, parts, markers)
                if len(pages) > self._lru.limit:
                    self._shrink()  # pages pinned for this copy may be reclaimed now
                if markers and ctx is not None:
                    self._async_readahead(ctx, markers)
                if new_off >= end:
                    return
                if new_off != off:
                    off = new_off
                    continue  # copied bytes: this step ends here (§4.8), the next may park
            first = False
            idx = off >> PAGE_SHIFT
            page = pages.get(idx)
            if page is None and ctx is not None and not ctx.ra_done:
                ctx.ra_done = True
                self._own_parts(parts)
                await self._sync_readahead(ctx, idx)
                continue  # (this stop is counted below, when the step looks again)
            self.misses += 1  # the page this read needs next is not UPTODATE
            self._populate(idx, (end - 1) >> PAGE_SHIFT)
            page = pages.get(idx)
            if page is None or page.flags & PG_UPTODATE:
                continue  # completed by the RWF_NOWAIT probe: copy it in this same step
            if not page.flags & PG_LOCKED:
                # !UPTODATE and unlocked: the seed's lock_page_async path, then read again.
                self._own_parts(parts)
                await self._lock_and_retry(page)
                continue
            if nowait:
                raise WouldBlockError(f"device page {idx} needs I/O")
            self._own_parts(parts)
            await self._wait_unlocked(page)

    def _own_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Before a read step ends (an ``await``): copy out the bytes gathered so far, so the
        sleeping request pins no page (§4.14) and holds no view of a frame, which may be
        reused once this step ends. Frames freed until now may then be reused."""
        if parts and (len(parts) > 1 or not isinstance(parts[0], bytearray)):
            joined = bytearray().join(parts)
            parts.clear()
            parts.append(joined)
        self._arena.quiesce()

    async def _wait_unlocked(self, page: Page) -> None:
        """Park until ``page`` unlocks (``wait_on_page_locked_async``). EIO if its I/O
        failed; the caller looks the page up again either way (§4.11)."""
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
        """A page left !UPTODATE by a failed read: lock it (async), and if it is still
        cached and still not UPTODATE, clear ERROR and read it again (§4.10)."""
        await self._waiter.lock_page(page)
        if self._lru.pages.get(page.index) is not page or page.flags & PG_UPTODATE:
            self._wt.unlock_page(page)
            return
        page.flags &= ~PG_ERROR
        self._submit([page])
        if not page.flags & (PG_LOCKED | PG_UPTODATE):
            # Failed at once (no memory for its frame): report it rather than retry forever.
            raise DeviceIOError(f"cannot read device page {page.index}: no memory for it")

    def _populate(self, first: int, last: int) -> None:
        """Create the missing pages of ``[first, last]`` LOCKED and submit one read per
        contiguous run; also retry (trylock, clear ERROR) unlocked !UPTODATE pages."""
        pages = self._lru.pages
        last = min(last, (self._dev_size - 1) >> PAGE_SHIFT)
        run: list[Page] = []
        created = False
        refaulted: list[int] = []
        idx = first
        while idx <= last:
            p = pages.get(idx)
            if p is None:
                p = Page(idx, PG_LOCKED)
                self._lru.insert(p)
                if p.lru == LRU_ACTIVE:  # a refault (PageLRU puts only those there)
                    refaulted.append(idx)
                created = True
                run.append(p)
            elif p.nr == 1 and not p.flags & (PG_UPTODATE | PG_LOCKED) and idx != first:
                p.flags = (p.flags | PG_LOCKED) & ~PG_ERROR
                run.append(p)
            else:  # cached, in flight, the caller's own page to retry, or a folio
                if run:
                    self._submit(run)
                    run = []
                idx = p.index + p.nr
                continue
            idx += 1
            if len(run) >= MAX_IO_PAGES:
                self._submit(run)
                run = []
        if run:
            self._submit(run)
        if refaulted and self._lru.headroom:
            self._refault_around(refaulted)
        if created:
            # The page this read needs next may have completed synchronously (RWF_NOWAIT
            # probe): pin it so reclaim cannot undo the step's progress.
            head = pages.get(first)
            if head is not None:
                head.refcount += 1
                self._shrink()
                head.refcount -= 1
            else:  # pragma: no cover - `first` was just created or already present
                self._shrink()

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
        for idx in refaulted:
            # A remembered page is never cached, and inserting it forgets it: a group already
            # brought back (two refaults in one group) yields nothing the second time.
            batch: list[Page] = []
            for j in lru.remembered_near(idx):
                if budget <= 0 or j > last_dev:
                    break
                p = Page(j, PG_LOCKED | PG_RA_UNUSED)
                lru.insert(p)  # a refault too: grows ``limit`` by this page
                budget -= 1
                self.refault_around_pages += 1
                if batch and j != batch[-1].index + 1:
                    self._submit(batch)
                    batch = []
                batch.append(p)
            if batch:
                self._submit(batch)

    # -- readahead ----------------------------------------------------------------------
    async def _sync_readahead(self, ctx: _FileCtx, dev_idx: int) -> None:
        index = ctx.file_page(dev_idx)
        win = ctx.ra.ondemand(
            index, ctx.req_last - index + 1, hit_marker=False, eof_pages=ctx.eof_pages
        )
        if win is None or not win.size:
            return
        if win.marker is None and win.start >= index and win.start + win.size - 1 <= ctx.req_last:
            # A random read ("read as is"): the window is the request itself, which the
            # step's own _populate reads; mapping it again here would only cost CPU.
            return
        await self._submit_window(ctx, win)

    def _async_readahead(self, ctx: _FileCtx, markers: list[int]) -> None:
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

    async def _readahead_task(self, ctx: _FileCtx, win: ReadaheadWindow) -> None:
        try:
            await self._submit_window(ctx, win)
        except (trio.Cancelled, AsyncfsError) as e:
            # Readahead is a hint: a bad extent or a failing device is reported to the
            # reader that actually needs the bytes, not here.
            log.debug("readahead of file pages %d+%d dropped: %s", win.start, win.size, e)
        except Exception:  # a readahead failure must never take the loop down
            log.exception("readahead of file pages %d+%d failed", win.start, win.size)

    async def _submit_window(self, ctx: _FileCtx, win: ReadaheadWindow) -> None:
        """Map file pages ``win`` onto the device and read the missing ones, one I/O per
        contiguous device run; the marker goes on its page only if this window created it.
        Each folio-aligned group of missing pages that lies whole inside one mapped run becomes
        one folio (``page_cache_ra_order``), in a whole block of the arena, except the
        marker's: the marker stays on a page of its own, so a hit on it reports its exact
        index. Where the arena has no block to give, the group is read as pages (the kernel's
        fallback to order 0).
        (One pass per mapped run: on a stream this loop runs for every page read, so it does
        no more than create, flag and insert each page.)"""
        if self._closed:
            return
        runs = await ctx.fmap.map(win.start << PAGE_SHIFT, win.size << PAGE_SHIFT)
        pages = self._lru.pages
        insert = self._lru.insert
        dev_size = self._dev_size
        last_dev = (dev_size - 1) >> PAGE_SHIFT
        req_first, req_last = ctx.req_first, ctx.req_last
        marker_byte = win.marker << PAGE_SHIFT if win.marker is not None else -1
        fnr = self._folio_pages
        fmask = fnr - 1
        alloc_block = self._arena.alloc_block
        whole_dev = dev_size >> PAGE_SHIFT  # pages before a short last page
        batch: list[Page] = []
        batched = created = ra_created = folios = 0
        for run in runs:
            d0 = run.dev_off
            if d0 is None or run.length <= 0 or d0 < 0 or d0 + run.length > dev_size:
                continue
            f0 = run.file_off
            d1 = d0 + run.length
            marker_dev = -1
            if f0 <= marker_byte < f0 + run.length:
                marker_dev = (d0 + marker_byte - f0) >> PAGE_SHIFT
            # a folio's pages must all hold this run's bytes only: whole pages inside it
            whole_first = (d0 + PAGE_SIZE - 1) >> PAGE_SHIFT
            whole_end = min(d1 >> PAGE_SHIFT, whole_dev)  # (exclusive)
            idx = d0 >> PAGE_SHIFT
            stop = min((d1 - 1) >> PAGE_SHIFT, last_dev)
            while idx <= stop:
                if idx in pages:  # cached, or in flight for someone else
                    if batch:
                        self._submit(batch)
                        batch = []
                        batched = 0
                    idx += 1
                    continue
                nr = 1
                block = None
                if (fnr > 1 and not idx & fmask and whole_first <= idx
                        and idx + fnr <= whole_end and not idx <= marker_dev < idx + fnr
                        and pages.keys().isdisjoint(range(idx + 1, idx + fnr))):
                    try:
                        block = alloc_block()
                    except OSError:  # no memory: pages, whose reads report it
                        block = None
                    if block is not None:
                        nr = fnr
                        folios += 1
                # A page shared by two runs (blocks smaller than a page) is created by the
                # first; it counts as readahead only if outside the request.
                fpage = (f0 + max(idx << PAGE_SHIFT, d0) - d0) >> PAGE_SHIFT
                flags = PG_LOCKED
                if fpage + nr - 1 < req_first or fpage > req_last:
                    flags |= PG_RA_UNUSED
                    ra_created += nr
                if idx == marker_dev:
                    flags |= PG_READAHEAD
                p = Page(idx, flags, nr)
                if block is not None:
                    p.pfn, p.data = block
                insert(p)
                created += nr
                if batch and (idx != batch[-1].index + batch[-1].nr
                              or batched + nr > MAX_IO_PAGES):
                    self._submit(batch)
                    batch = []
                    batched = 0
                batch.append(p)
                batched += nr
                idx += nr
        if batch:
            self._submit(batch)
        self.readahead_pages += ra_created
        self.folios_created += folios
        if created:
            self._shrink()

    # -- backend I/O --------------------------------------------------------------------
    def _span(self, pages: list[Page]) -> tuple[int, int]:
        """Device offset and length of the read of contiguous ``pages`` (the last page of
        the device may be short)."""
        off = pages[0].index << PAGE_SHIFT
        last = pages[-1]
        return off, min(((last.index + last.nr) << PAGE_SHIFT) - off, self._dev_size - off)

    def _frames(self, pages: list[Page], length: int) -> list[memoryview] | None:
        """The frames of ``pages``, one per page or folio (given one where it has none), the
        last cut to the device's end: what a read of ``length`` bytes into them fills. None
        when the arena cannot map more memory (the read then completes with an error: a
        reader gets EIO, not a hang)."""
        arena = self._arena
        views = []
        try:
            for p in pages:
                frame = p.data
                if not isinstance(frame, memoryview):
                    # (a folio has its block from its creation, unless a read failed in flight)
                    got = arena.alloc() if p.nr == 1 else arena.alloc_block(force=True)
                    assert got is not None  # (``force``)
                    p.pfn, frame = got
                    p.data = frame
                views.append(frame)
        except (OSError, MemoryError) as exc:
            log.warning("no memory for the frames of %d pages: %s", len(pages), exc)
            return None
        tail = length - ((pages[-1].index - pages[0].index) << PAGE_SHIFT)
        if tail < len(views[-1]):
            views[-1] = views[-1][:tail]
        return views

    def _drop_frames(self, pages: list[Page]) -> None:
        """Forget the frames of pages whose read the kernel may still be writing: they are
        never reused (the pages get new ones if read again)."""
        for p in pages:
            p.data = b""
            p.pfn = -1

    def _submit(self, pages: list[Page]) -> None:
        """Start one backend read for contiguous LOCKED pages, into their frames (a system
        task: a reader's cancellation must not cancel I/O that others wait on).

        First the non-blocking probe (``preadv2(RWF_NOWAIT)`` in buffered backends): if the
        host already caches the bytes, the pages complete right here, with no task, park or
        wake. The completion then skips reclaim; the caller reclaims once its own page is
        pinned, so a request larger than the cache still makes progress."""
        self.inflight_io += 1
        self.backend_reads += 1
        if not self._closed:
            off, length = self._span(pages)
            views: list[memoryview] | None = None
            if self._nowait_into is not None or self._submit_into is not None:
                views = self._frames(pages, length)
            if views is not None and self._nowait_into is not None:
                if self._nowait_into(off, views):
                    self.backend_nowait_reads += 1
                    self._complete(pages, None, None, off, length, filled=True, reclaim=False)
                    return
            elif self._nowait_into is None:
                got = self._dev.read_nowait(off, length)
                if got is not None and len(got) == length:
                    self.backend_nowait_reads += 1
                    self._complete(pages, got, None, off, length, reclaim=False)
                    return
            # By callback: into the frames, else through the backend's buffer (an O_DIRECT
            # span the frames cannot take, or no frames to be had); else a task below.
            if views is not None and self._submit_into is not None and self._by_callback(
                    pages, self._submit_into, views, self._into_done):
                return
            if self._submit_read is not None and self._by_callback(
                    pages, self._submit_read, length, self._read_done):
                return
        trio.lowlevel.spawn_system_task(self._io_task, pages, name="asyncfs-pageio")

    def _by_callback(
        self, pages: list[Page], submit: Callable[..., bool], what: object,
        done: Callable[..., None],
    ) -> bool:
        """Start the read of ``pages`` with ``submit(off, what, callback)``; its completion
        calls ``done(key, ...)``. A DeviceIOError (closed, past the end) starts nothing: the
        task path then reports it to the readers."""
        key = self._cb_next
        self._cb_next = key + 1
        try:
            started = submit(pages[0].index << PAGE_SHIFT, what, partial(done, key))
        except DeviceIOError:
            return False
        if started:
            self._cb_reads[key] = pages
        return bool(started)

    def _into_done(self, key: int, err: DeviceIOError | None, released: bool) -> None:
        """Completion of a ``submit_read_into`` read, on the trio thread (``end_page_read``):
        the frames hold the bytes, or ``err``; ``released`` False means the kernel may still
        write the frames (the backend failed with the read in flight)."""
        pages = self._cb_reads.pop(key, None)
        if pages is None:
            return  # aclose already failed these pages
        off, length = self._span(pages)
        if err is not None and not released:
            self._drop_frames(pages)
        if err is not None and _splittable(pages) and not self._closed:
            trio.lowlevel.spawn_system_task(self._retry_pages, pages, off, length,
                                            name="asyncfs-pageio-retry")
            return
        self._complete(pages, None, None if err is None else str(err), off, length,
                       filled=err is None)

    def _read_done(self, key: int, buf: memoryview | None, err: DeviceIOError | None) -> None:
        """Completion of a ``submit_read`` read, on the trio thread (``end_page_read``).
        ``buf`` is the backend's buffer, valid only during this call: the pages copy it."""
        pages = self._cb_reads.pop(key, None)
        if pages is None:
            return  # aclose already failed these pages
        off, length = self._span(pages)
        why: str | None = str(err) if err is not None else None
        if buf is not None and len(buf) != length:
            why = f"short read: {len(buf)} of {length} bytes at {off}"
            buf = None
        if buf is None and _splittable(pages) and not self._closed:
            trio.lowlevel.spawn_system_task(self._retry_pages, pages, off, length,
                                            name="asyncfs-pageio-retry")
            return
        self._complete(pages, buf, why, off, length)

    async def _io_task(self, pages: list[Page]) -> None:
        off, length = self._span(pages)
        done = False
        try:
            buf, err, eio = await self._read_range(off, length)
            if eio and _splittable(pages) and not self._closed:
                done = True
                await self._retry_pages(pages, off, length)
                return
            done = True
            self._complete(pages, buf, err, off, length)
        finally:
            if not done:  # KeyboardInterrupt or a bug above: never leave pages locked
                self._complete(pages, None, "read aborted", off, length)

    async def _retry_pages(self, pages: list[Page], off: int, length: int) -> None:
        """A coalesced read failed, perhaps for one bad sector: read its pages one by one (the
        kernel's readpage after a failed readahead), so only the pages that really fail get
        ERROR and a reader of a good neighbour still gets its bytes."""
        self.inflight_io += len(pages) - 1  # each page now completes on its own
        self.backend_reads += len(pages)
        async with trio.open_nursery() as nursery:
            for p in pages:
                if p.nr > 1:
                    nursery.start_soon(self._retry_folio, p, len(pages) > 1)
                else:
                    p_off = p.index << PAGE_SHIFT
                    nursery.start_soon(self._retry_page, p, p_off,
                                       min(PAGE_SIZE, off + length - p_off))

    async def _retry_page(self, page: Page, off: int, length: int) -> None:
        buf, err, _ = await self._read_range(off, length)
        self._complete([page], buf, err, off, length)

    async def _retry_folio(self, folio: Page, reread: bool) -> None:
        """A read that held ``folio`` failed: read the folio again on its own (``reread``:
        the failed read held more than this folio); if that fails too, split it into its
        pages and read those one by one, so only the pages that really fail get ERROR (a
        folio lies whole inside the device, so each is a full page). Its waiters are then
        woken with neither UPTODATE nor ERROR: they look their index up again and wait on
        the page that replaced the folio there."""
        if reread:
            off = folio.index << PAGE_SHIFT
            length = folio.nr << PAGE_SHIFT
            buf, err, eio = await self._read_range(off, length)
            if not eio or self._closed:
                self._complete([folio], buf, err, off, length)
                return
        lru = self._lru
        lru.remove(folio)
        self._free_frame(folio)  # (it has none if the kernel may still write it)
        keep = folio.flags & PG_RA_UNUSED
        small = [Page(i, PG_LOCKED | keep) for i in range(folio.index, folio.index + folio.nr)]
        for p in small:
            lru.insert(p)
        folio.flags &= ~(PG_READAHEAD | PG_RA_UNUSED)
        self._wt.unlock_page(folio)
        self.inflight_io += len(small) - 1
        self.backend_reads += len(small) - 1
        async with trio.open_nursery() as nursery:
            for p in small:
                nursery.start_soon(self._retry_page, p, p.index << PAGE_SHIFT, PAGE_SIZE)

    async def _read_range(self, off: int, length: int) -> tuple[bytes | None, str | None, bool]:
        """One backend read: ``(bytes, None, False)``, or ``(None, why, is_device_error)``.
        Never raises for a failed read (the pages must be completed whatever happens)."""
        try:
            if self._closed:
                return None, "page cache closed", False
            with trio.CancelScope() as cs:
                self._io_scopes.add(cs)
                try:
                    got = await self._dev.read(off, length)
                finally:
                    self._io_scopes.discard(cs)
            if cs.cancelled_caught:
                return None, "read cancelled (page cache closing)", False
            if len(got) != length:
                return None, f"short read: {len(got)} of {length} bytes at {off}", False
            return (got if isinstance(got, bytes) else bytes(got)), None, False
        except DeviceIOError as e:
            return None, str(e), True
        except trio.Cancelled:
            return None, "read cancelled", False
        except Exception as e:  # backend bug: fail these pages, keep the loop alive
            log.exception("backend read at %d failed", off)
            return None, f"{type(e).__name__}: {e}", False

    def _complete(
        self,
        pages: list[Page],
        buf: bytes | memoryview | None,
        err: str | None,
        off: int,
        length: int,
        *,
        filled: bool = False,
        reclaim: bool = True,
    ) -> None:
        """``end_page_read``: set exactly one of UPTODATE/ERROR, unlock, wake (§4.10). The
        bytes are ``buf`` (copied into the frames) or, when ``filled``, already in them."""
        self.inflight_io -= 1
        wt = self._wt
        views = None
        if buf is not None:
            views = self._frames(pages, length)
            if views is None:
                buf, err = None, "no memory for page frames"
        if buf is not None or filled:
            self.backend_bytes += length
            if buf is not None and views is not None:
                mv = memoryview(buf)
                pos = 0
                for v in views:
                    end = pos + len(v)
                    v[:] = mv[pos:end]
                    pos = end
            for p in pages:
                p.flags = (p.flags & ~PG_ERROR) | PG_UPTODATE
                wt.unlock_page(p)
        else:
            if err:
                log.debug("device read at %d+%d failed: %s", off, length, err)
            for p in pages:
                p.flags = (p.flags | PG_ERROR) & ~(PG_READAHEAD | PG_RA_UNUSED)
                wt.unlock_page(p)
        if reclaim:
            self._shrink()
        if self._idle is not None and not self.inflight_io:
            self._idle.set()

    def _shrink(self) -> None:
        lru = self._lru
        if len(lru.pages) > lru.limit:
            for p in lru.shrink():
                self._free_frame(p)

    def _free_frame(self, p: Page) -> None:
        """Give the frame of a page or folio that left the cache back to the arena."""
        if p.pfn >= 0:
            self._arena.free(p.pfn, p.nr)
            p.pfn = -1
            p.data = b""

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceIOError("the page cache is closed")
