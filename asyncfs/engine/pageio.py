"""Backend I/O of the page cache: starting the read of a run of LOCKED pages, its completion,
its retries and what is in flight (the kernel's ``read_pages`` -> ``->readahead`` ->
``end_page_read`` at bio completion, in one object).

``PageIO.read_pages(pages)`` is the one way a read starts, whatever the backend can do. The
backend's features are detected once, when the ``PageIO`` is built:

1. the non-blocking probe (``read_nowait_into`` into the pages' frames, else ``read_nowait``
   into a buffer): when the host already caches the bytes, the pages complete in the caller's
   step, with no task, park or wake (the only syscall the engine makes on the trio thread,
   invariant 9, docs/invariants.md);
2. a read by callback into the pages' frames (``submit_read_into``, io_uring);
3. a read by callback through the backend's bounce buffer (``submit_read``: where O_DIRECT
   cannot read into the frames, or no frames could be had);
4. else a trio *system task* per read, calling ``BlockDevice.read``.

No reader owns a read: a reader cancelled while parked never cancels I/O that others wait on.
Every read ends in ``end_read``, once: each page gets exactly one of UPTODATE or ERROR
(``end_page_read``) and is unlocked, which wakes its waiters (invariant 10). A failed read of
more than one page is retried page by page, a failed folio read is retried whole and then
split into pages, so only the pages that really fail get ERROR (invariant 18).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from asyncfs.engine.arena import PageArena
from asyncfs.errors import DeviceIOError
from asyncfs.io.device import BlockDevice, IntoCallback, ReadCallback
from asyncfs.pagecache import PageLRU, WaitTable
from asyncfs.pagecache.page import PAGE_SHIFT, PAGE_SIZE, PG_RA_UNUSED, Page
from asyncfs.pagecache.transitions import end_folio_split, end_page_read, lock_page_new

log = logging.getLogger(__name__)

# Largest single backend read (1 MiB, in pages); longer runs are split.
MAX_IO_PAGES = (1 << 20) >> PAGE_SHIFT

# ``(bytes, None, False)``, or ``(None, why, is_device_error)``.
RangeResult = tuple[bytes | None, str | None, bool]


def _splittable(pages: list[Page]) -> bool:
    """Whether a failed read of ``pages`` is retried in smaller reads (more than one page)."""
    return len(pages) > 1 or pages[0].nr > 1


class ReadBatch:
    """Contiguous LOCKED pages gathered for one backend read: ``add`` starts the read of what
    was gathered when the next page does not follow it or would make it longer than
    ``MAX_IO_PAGES``; ``flush`` starts it now."""

    __slots__ = ("_io", "_npages", "_pages")

    def __init__(self, io: PageIO) -> None:
        self._io = io
        self._pages: list[Page] = []
        self._npages = 0

    def add(self, page: Page) -> None:
        pages = self._pages
        if pages:
            last = pages[-1]
            if page.index != last.index + last.nr or self._npages + page.nr > MAX_IO_PAGES:
                self.flush()
                pages = self._pages
        pages.append(page)
        self._npages += page.nr

    def flush(self) -> None:
        if self._pages:
            pages = self._pages
            self._pages = []
            self._npages = 0
            self._io.read_pages(pages)


class PageIO:
    """Reads of LOCKED pages of one device, from start to ``end_read``."""

    def __init__(
        self,
        device: BlockDevice,
        arena: PageArena,
        wait_table: WaitTable,
        lru: PageLRU,
        reclaim: Callable[[], None],
    ) -> None:
        self._dev = device
        self._arena = arena
        self._wt = wait_table
        self._lru = lru
        self._reclaim = reclaim  # the cache's reclaim back to its limit
        self._dev_size = device.size
        # What the backend can do, asked once (``CallbackReads``, ``IntoReads``).
        submit_read = getattr(device, "submit_read", None)
        self._submit_bounce: Callable[[int, int, ReadCallback], bool] | None = (
            submit_read if callable(submit_read) else None)
        submit_into = getattr(device, "submit_read_into", None)
        self._submit_into: Callable[[int, list[memoryview], IntoCallback], bool] | None = (
            submit_into if callable(submit_into) else None)
        nowait_into = getattr(device, "read_nowait_into", None)
        self._nowait_into: Callable[[int, list[memoryview]], bool] | None = (
            nowait_into if callable(nowait_into) else None)
        # Frames are given before the read only where the backend reads into them.
        self._frames_first = self._submit_into is not None or self._nowait_into is not None
        # Reads started by callback, by key, until their completion (or ``aclose``).
        self._cb_reads: dict[int, list[Page]] = {}
        self._cb_next = 0
        self._io_scopes: set[trio.CancelScope] = set()
        self._idle: trio.Event | None = None
        self.closed = False
        self.backend_reads = 0  # reads started (each retry counts)
        self.backend_bytes = 0  # bytes of reads that succeeded
        self.backend_nowait_reads = 0  # reads the probe answered
        self.inflight_io = 0  # reads started and not ended

    # -- start ----------------------------------------------------------------------------
    def read_pages(self, pages: list[Page]) -> None:
        """Start one backend read of contiguous LOCKED ``pages``. It ends in ``end_read``:
        here already when the probe answers (the caller then reclaims, once it has pinned
        the page it needs next, so a request larger than the cache still makes progress),
        else from a callback or a system task."""
        self.inflight_io += 1
        self.backend_reads += 1
        if self.closed or not self._start(pages):
            trio.lowlevel.spawn_system_task(self._io_task, pages, name="asyncfs-pageio")

    def _start(self, pages: list[Page]) -> bool:
        """The probe, then a read by callback; False: read it in a task."""
        off, length = self.span(pages)
        views = self.frames(pages, length) if self._frames_first else None
        if self._probe(pages, views, off, length):
            return True
        # By callback: into the frames, else through the backend's buffer.
        if views is not None and self._submit_into is not None and self._by_callback(
                pages, self._submit_into, views, self._into_done):
            return True
        return self._submit_bounce is not None and self._by_callback(
            pages, self._submit_bounce, length, self._read_done)

    def _probe(
        self, pages: list[Page], views: list[memoryview] | None, off: int, length: int
    ) -> bool:
        """``preadv2(RWF_NOWAIT)``: if the host caches the bytes, end the read now."""
        if self._nowait_into is not None:
            if views is None or not self._nowait_into(off, views):
                return False
            self.backend_nowait_reads += 1
            self.end_read(pages, None, None, off, length, filled=True, reclaim=False)
            return True
        got = self._dev.read_nowait(off, length)
        if got is None or len(got) != length:
            return False
        self.backend_nowait_reads += 1
        self.end_read(pages, got, None, off, length, reclaim=False)
        return True

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

    # -- completion by callback (on the trio thread, from the pass that reaps it) ---------
    def _into_done(self, key: int, err: DeviceIOError | None, released: bool) -> None:
        """A ``submit_read_into`` read ended: the frames hold the bytes, or ``err``;
        ``released`` False means the kernel may still write the frames (the backend failed
        with the read in flight)."""
        pages = self._cb_reads.pop(key, None)
        if pages is None:
            return  # aclose already failed these pages
        off, length = self.span(pages)
        if err is not None and not released:
            self.drop_frames(pages)
        if err is not None and _splittable(pages) and not self.closed:
            self._spawn_retry(pages, off, length)
            return
        self.end_read(pages, None, None if err is None else str(err), off, length,
                      filled=err is None)

    def _read_done(self, key: int, buf: memoryview | None, err: DeviceIOError | None) -> None:
        """A ``submit_read`` read ended. ``buf`` is the backend's buffer, valid only during
        this call: ``end_read`` copies it into the frames."""
        pages = self._cb_reads.pop(key, None)
        if pages is None:
            return  # aclose already failed these pages
        off, length = self.span(pages)
        why: str | None = str(err) if err is not None else None
        if buf is not None and len(buf) != length:
            why = f"short read: {len(buf)} of {length} bytes at {off}"
            buf = None
        if buf is None and _splittable(pages) and not self.closed:
            self._spawn_retry(pages, off, length)
            return
        self.end_read(pages, buf, why, off, length)

    def _spawn_retry(self, pages: list[Page], off: int, length: int) -> None:
        trio.lowlevel.spawn_system_task(self._retry_pages, pages, off, length,
                                        name="asyncfs-pageio-retry")

    # -- reads in a task, and retries -------------------------------------------------------
    async def _io_task(self, pages: list[Page]) -> None:
        off, length = self.span(pages)
        done = False
        try:
            buf, err, eio = await self._read_range(off, length)
            if eio and _splittable(pages) and not self.closed:
                done = True
                await self._retry_pages(pages, off, length)
                return
            done = True
            self.end_read(pages, buf, err, off, length)
        finally:
            if not done:  # KeyboardInterrupt or a bug above: never leave pages locked
                self.end_read(pages, None, "read aborted", off, length)

    async def _retry_pages(self, pages: list[Page], off: int, length: int) -> None:
        """A coalesced read failed, perhaps for one bad sector: read its pages one by one (the
        kernel's readpage after a failed readahead), so only the pages that really fail get
        ERROR and a reader of a good neighbour still gets its bytes."""
        self.inflight_io += len(pages) - 1  # each page now ends on its own
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
        self.end_read([page], buf, err, off, length)

    async def _retry_folio(self, folio: Page, reread: bool) -> None:
        """A read that held ``folio`` failed: read the folio again on its own (``reread``:
        the failed read held more than this folio); if that fails too, split it (below)."""
        if reread:
            off = folio.index << PAGE_SHIFT
            length = folio.nr << PAGE_SHIFT
            buf, err, eio = await self._read_range(off, length)
            if not eio or self.closed:
                self.end_read([folio], buf, err, off, length)
                return
        await self._split_folio(folio)

    async def _split_folio(self, folio: Page) -> None:
        """Replace a folio whose read failed by its pages, LOCKED, and read those one by one,
        so only the pages that really fail get ERROR (a folio lies whole inside the device,
        so each is a full page). The folio is unlocked with neither UPTODATE nor ERROR: its
        waiters look their index up again and wait on the page now there."""
        lru = self._lru
        lru.remove(folio)
        self.free_frame(folio)  # (it has none if the kernel may still write it)
        keep = folio.flags & PG_RA_UNUSED
        small = [lock_page_new(Page(i, keep)) for i in range(folio.index, folio.index + folio.nr)]
        for p in small:
            lru.insert(p)
        end_folio_split(folio)
        self._wt.unlock_page(folio)
        self.inflight_io += len(small) - 1
        self.backend_reads += len(small) - 1
        async with trio.open_nursery() as nursery:
            for p in small:
                nursery.start_soon(self._retry_page, p, p.index << PAGE_SHIFT, PAGE_SIZE)

    async def _read_range(self, off: int, length: int) -> RangeResult:
        """One ``BlockDevice.read``: ``(bytes, None, False)``, or ``(None, why,
        is_device_error)``. Never raises for a failed read (the pages must end whatever
        happens)."""
        try:
            if self.closed:
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

    # -- the end of every read ------------------------------------------------------------
    def end_read(
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
        """Each page gets exactly one of UPTODATE/ERROR and is unlocked (waking its waiters);
        then the cache reclaims back to its limit (unless ``reclaim`` is False: the caller
        does, once it has pinned its page). The bytes are ``buf``, copied into the frames,
        or, when ``filled``, already in them."""
        self.inflight_io -= 1
        if buf is not None and not self._copy_in(pages, buf, length):
            buf, err = None, "no memory for page frames"
        ok = buf is not None or filled
        if ok:
            self.backend_bytes += length
        elif err:
            log.debug("device read at %d+%d failed: %s", off, length, err)
        unlock = self._wt.unlock_page
        for p in pages:
            end_page_read(p, ok)
            unlock(p)
        if reclaim:
            self._reclaim()
        if self._idle is not None and not self.inflight_io:
            self._idle.set()

    def _copy_in(self, pages: list[Page], buf: bytes | memoryview, length: int) -> bool:
        """Copy the bytes of a read that came in a buffer into the pages' frames."""
        views = self.frames(pages, length)
        if views is None:
            return False
        mv = memoryview(buf)
        pos = 0
        for v in views:
            end = pos + len(v)
            v[:] = mv[pos:end]
            pos = end
        return True

    # -- frames -----------------------------------------------------------------------------
    def span(self, pages: list[Page]) -> tuple[int, int]:
        """Device offset and length of the read of contiguous ``pages`` (the last page of
        the device may be short)."""
        off = pages[0].index << PAGE_SHIFT
        last = pages[-1]
        return off, min(((last.index + last.nr) << PAGE_SHIFT) - off, self._dev_size - off)

    def frames(self, pages: list[Page], length: int) -> list[memoryview] | None:
        """The frames of ``pages``, one per page or folio (given one where it has none), the
        last cut to the device's end: what a read of ``length`` bytes into them fills. None
        when the arena cannot map more memory (the read then ends with an error: a reader
        gets EIO, not a hang)."""
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

    @staticmethod
    def drop_frames(pages: list[Page]) -> None:
        """Forget the frames of pages whose read the kernel may still be writing: they are
        never reused (the pages get new ones if read again)."""
        for p in pages:
            p.data = b""
            p.pfn = -1

    def free_frame(self, page: Page) -> None:
        """Give the frame of a page or folio that left the cache back to the arena."""
        if page.pfn >= 0:
            self._arena.free(page.pfn, page.nr)
            page.pfn = -1
            page.data = b""

    # -- close ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Cancel the reads in tasks and fail the reads by callback now (their pages get
        ERROR, waking every waiter; a completion that comes later finds nothing to do, and
        their frames, which the kernel may still write, are never reused); then wait until
        nothing is in flight."""
        self.closed = True
        for cs in list(self._io_scopes):
            cs.cancel()
        cb_reads, self._cb_reads = self._cb_reads, {}
        for pages in cb_reads.values():
            self.drop_frames(pages)
            self.end_read(pages, None, "page cache closed", pages[0].index << PAGE_SHIFT, 0)
        if self.inflight_io:
            self._idle = trio.Event()
            with trio.CancelScope(shield=True):
                await self._idle.wait()
