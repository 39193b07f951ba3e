"""File readahead windows made into pages and folios (the kernel's ``page_cache_ra_order``
and ``read_pages`` for one window; the policy that chooses the window is
``pagecache.readahead.FileReadahead``).

``WindowReader.read_window`` maps a window of file pages onto the device and creates the
missing pages LOCKED, one backend read per contiguous device run (``ReadBatch``). Each
``FOLIO_PAGES``-aligned group of missing pages that lies whole inside one mapped run becomes
one *folio* in a whole block of the arena (one Page, one lock, one wake, one reclaim per
64 KiB of a stream), except the group holding the window's marker: the marker stays on a page
of its own, so a hit on it reports its exact index. Where the arena has no block to give, the
group is read as pages (the kernel's fallback to order-0 pages). The marker goes on its page
only if this window created it (invariant 13, docs/invariants.md).

``ReadCtx`` is what a read of device ranges needs to know about the file it serves.
"""

from __future__ import annotations

from collections.abc import Callable

from asyncfs.engine.arena import PageArena
from asyncfs.engine.interfaces import FileMap
from asyncfs.engine.pageio import PageIO, ReadBatch
from asyncfs.pagecache import FileReadahead, PageLRU, ReadaheadWindow
from asyncfs.pagecache.page import PAGE_SHIFT, PAGE_SIZE, PG_RA_UNUSED, PG_READAHEAD, Page
from asyncfs.pagecache.transitions import lock_page_new
from asyncfs.types import Run


class ReadCtx:
    """A file read's readahead context: the file, its readahead state, the request in file
    pages, and the mapped run the read is in now (to turn device pages into file pages)."""

    __slots__ = ("eof_pages", "fmap", "ra", "ra_done", "req_first", "req_last", "run")

    def __init__(self, fmap: FileMap, ra: FileReadahead, off: int, end: int) -> None:
        self.fmap = fmap
        self.ra = ra
        self.req_first = off >> PAGE_SHIFT
        self.req_last = (end - 1) >> PAGE_SHIFT
        self.eof_pages = (fmap.size + PAGE_SIZE - 1) >> PAGE_SHIFT
        self.ra_done = False  # the sync readahead of this request has run
        self.run: Run | None = None

    def file_page(self, dev_idx: int) -> int:
        """The file page that device page ``dev_idx`` of the current run holds."""
        run = self.run
        assert run is not None and run.dev_off is not None
        dev_byte = max(dev_idx << PAGE_SHIFT, run.dev_off)
        return (run.file_off + dev_byte - run.dev_off) >> PAGE_SHIFT


class _RunWindow:
    """One mapped run of a window, in device pages: which pages to look at, which lie whole
    inside the run (a folio must hold this run's bytes only), and the marker's page."""

    __slots__ = ("first", "last", "marker", "whole_end", "whole_first")

    def __init__(self, run: Run, dev_off: int, marker_byte: int, dev_size: int) -> None:
        dev_end = dev_off + run.length
        self.first = dev_off >> PAGE_SHIFT
        self.last = min((dev_end - 1) >> PAGE_SHIFT, (dev_size - 1) >> PAGE_SHIFT)
        self.whole_first = (dev_off + PAGE_SIZE - 1) >> PAGE_SHIFT
        # (exclusive; a short last page of the device is never part of a folio)
        self.whole_end = min(dev_end >> PAGE_SHIFT, dev_size >> PAGE_SHIFT)
        self.marker = -1
        if run.file_off <= marker_byte < run.file_off + run.length:
            self.marker = (dev_off + marker_byte - run.file_off) >> PAGE_SHIFT


class WindowReader:
    """Reads readahead windows into the cache; counts what it brought in."""

    __slots__ = ("_arena", "_dev_size", "_folio_pages", "_io", "_lru", "_reclaim",
                 "folios_created", "readahead_pages")

    def __init__(
        self, lru: PageLRU, arena: PageArena, io: PageIO, dev_size: int,
        reclaim: Callable[[], None],
    ) -> None:
        self._lru = lru
        self._dev_size = dev_size
        self._arena = arena
        self._io = io
        self._reclaim = reclaim
        self._folio_pages = arena.block_frames
        self.readahead_pages = 0  # pages created outside the request that made them
        self.folios_created = 0

    async def read_window(self, ctx: ReadCtx, win: ReadaheadWindow) -> None:
        """Map file pages ``win`` onto the device and start the reads of its missing pages.
        (On a stream this runs for every page read, so it does no more per page than
        create, flag and insert it.)"""
        if self._io.closed:
            return
        runs = await ctx.fmap.map(win.start << PAGE_SHIFT, win.size << PAGE_SHIFT)
        marker_byte = win.marker << PAGE_SHIFT if win.marker is not None else -1
        dev_size = self._dev_size
        batch = ReadBatch(self._io)
        created = 0
        for run in runs:
            dev_off = run.dev_off
            if dev_off is None or run.length <= 0 or dev_off < 0 or (
                    dev_off + run.length > dev_size):
                continue
            rw = _RunWindow(run, dev_off, marker_byte, dev_size)
            created += self._read_run(ctx, run, rw, batch)
        batch.flush()
        if created:
            self._reclaim()

    def _read_run(self, ctx: ReadCtx, run: Run, rw: _RunWindow, batch: ReadBatch) -> int:
        """Create the missing pages (and folios) of one mapped run into ``batch``; return
        how many pages were created."""
        pages = self._lru.pages
        created = 0
        idx = rw.first
        while idx <= rw.last:
            if idx in pages:  # cached, or in flight for someone else
                batch.flush()
                idx += 1
                continue
            page = self._new_page(ctx, run, rw, idx)
            self._lru.insert(page)
            batch.add(page)
            created += page.nr
            idx += page.nr
        return created

    def _new_page(self, ctx: ReadCtx, run: Run, rw: _RunWindow, idx: int) -> Page:
        """The LOCKED page (or folio) for missing device page ``idx`` of a window: flagged as
        readahead if it lies outside the request, and as the marker if it is the marker's."""
        block = self._folio_block(rw, idx)
        nr = 1 if block is None else self._folio_pages
        # A page shared by two runs (blocks smaller than a page) is created by the first;
        # it counts as readahead only if outside the request.
        assert run.dev_off is not None
        file_page = (run.file_off + max(idx << PAGE_SHIFT, run.dev_off) - run.dev_off
                     ) >> PAGE_SHIFT
        outside = file_page + nr - 1 < ctx.req_first or file_page > ctx.req_last
        if outside:
            self.readahead_pages += nr
        page = lock_page_new(Page(
            idx, (PG_RA_UNUSED if outside else 0) | (PG_READAHEAD if idx == rw.marker else 0),
            nr))
        if block is not None:
            page.pfn, page.data = block
            self.folios_created += 1
        return page

    def _folio_block(self, rw: _RunWindow, idx: int) -> tuple[int, memoryview] | None:
        """The arena block for a folio at ``idx`` if the aligned group starting there may be
        one: whole inside the run, all missing, and not holding the marker. None: read it as
        pages (also when the arena has no block to give)."""
        nr = self._folio_pages
        if (nr > 1 and not idx & (nr - 1) and rw.whole_first <= idx
                and idx + nr <= rw.whole_end and not idx <= rw.marker < idx + nr
                and self._lru.pages.keys().isdisjoint(range(idx + 1, idx + nr))):
            try:
                return self._arena.alloc_block()
            except OSError:  # no memory: pages, whose reads report it
                return None
        return None
