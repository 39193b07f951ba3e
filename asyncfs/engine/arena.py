"""Page frames: the memory cached pages live in (the kernel's free page pool, in miniature).

Memory is carved from anonymous ``mmap`` chunks in *blocks* of ``FOLIO_PAGES`` frames of
``PAGE_SIZE`` bytes (64 KiB): the buddy allocator with two orders. A folio takes a whole block,
so its bytes are one contiguous frame (one view, one iovec, one slice per copy); a 4 KiB page
takes one frame of a *split* block. Frames are numbered (``pfn``, as the kernel's page frame
numbers) so a freed frame finds its block. Pages take frames from split blocks first and split
a whole block only when none has a free frame; a split block whose frames are all free again
merges back into a whole block.

One pool serves both sizes, so neither strands memory the other could use. A block is carved
from fresh memory for a folio only while fewer than ``slack_frames`` page frames lie free in
split blocks; otherwise ``alloc_block`` gives none and the caller reads 4 KiB pages instead
(which use those frames), as the kernel's readahead falls back to order-0 pages when a large
folio cannot be had. So the arena holds at most the frames in use, ``slack_frames`` and one
block, plus the chunk mapped ahead (it never shrinks, as a heap would not).

The backend reads straight into the frames of the pages it fills (``readv`` with one iovec per
page or folio), so a page's bytes are never copied out of a bounce buffer, and O_DIRECT reads
need no bounce buffer at all (frames are page-aligned).

Chunks are mapped with ``MAP_POPULATE`` *on a worker thread* (``mmap`` releases the GIL), one
chunk ahead of need, so their first-touch faults are taken off the trio thread; frames of
evicted pages are reused, already resident.

A frame is handed out as a writable ``memoryview``, made once per frame (and once per block)
and handed out again whenever that frame (block) is, so a read makes no view object of its own
(the arena's views live as long as the arena anyway). A reader may hold views
of frames only within one scheduler step (the read path copies them out before any
``await``; a single-page result is a view its caller uses before it awaits again), so a freed
frame or block goes to a *pending* list, and ``quiesce()`` makes pending memory reusable at a
point where the caller holds no views: a frame freed and reused within one step would change
bytes the reader has already gathered.
"""

from __future__ import annotations

import mmap

import outcome
import trio

from asyncfs.pagecache.page import PAGE_SIZE

FRAME_SIZE = PAGE_SIZE
# Frames of a block: a folio's pages (64 KiB). The page cache makes folios of this size.
FOLIO_PAGES = (64 << 10) // PAGE_SIZE
CHUNK_FRAMES = (4 << 20) // FRAME_SIZE  # 4 MiB a chunk
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def _map_chunk(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=_MAP_FLAGS)


class PageArena:
    """Frames of ``FRAME_SIZE`` bytes in blocks of ``block_frames``, carved from chunks of
    ``chunk_frames`` frames."""

    __slots__ = (
        "_bshift", "_bviews", "_carved", "_fviews", "_listed", "_nfree", "_partial", "_pending",
        "_pending_blocks", "_spare", "_spare_wanted", "_split", "_views", "_whole", "ahead",
        "block_frames", "chunk_frames", "maps_inline", "slack_frames",
    )

    def __init__(
        self,
        chunk_frames: int = CHUNK_FRAMES,
        *,
        block_frames: int = FOLIO_PAGES,
        slack_frames: int | None = None,
        ahead: bool = True,
    ) -> None:
        if block_frames < 1 or block_frames & (block_frames - 1):
            raise ValueError("a block is a power of two frames")
        if chunk_frames < block_frames or chunk_frames % block_frames:
            raise ValueError("a chunk holds whole blocks")
        self.chunk_frames = chunk_frames
        self.block_frames = block_frames
        self._bshift = block_frames.bit_length() - 1
        # Free page frames in split blocks beyond which no block is carved for a folio.
        self.slack_frames = chunk_frames if slack_frames is None else slack_frames
        self.ahead = ahead  # map the next chunk on a worker thread before it is needed
        self._views: list[memoryview] = []  # one per chunk
        self._fviews: list[memoryview | None] = []  # per frame: its view, once made
        self._bviews: list[memoryview | None] = []  # per block: its view, once made
        self._carved = 0  # blocks carved; block ``b`` is the ``b``-th carved
        self._whole: list[int] = []  # free whole blocks
        self._split: list[list[int]] = []  # per block: its free frames (pfns) while split
        self._partial: list[int] = []  # split blocks with free frames (stale entries skipped)
        self._listed = bytearray()  # per block: has an entry in ``_partial``
        self._nfree = 0  # free frames in split blocks
        self._pending: list[int] = []  # frames freed since the last quiesce
        self._pending_blocks: list[int] = []  # blocks freed since the last quiesce
        self._spare: outcome.Outcome[mmap.mmap] | None = None  # set by the worker thread
        self._spare_wanted = False
        self.maps_inline = 0  # chunks mapped on the calling thread (none was ready ahead)

    @property
    def frames(self) -> int:
        """Frames ever carved (the memory the arena holds, but for the chunk mapped ahead)."""
        return self._carved << self._bshift

    @property
    def chunks(self) -> int:
        return len(self._views)

    @property
    def free_frames(self) -> int:
        return self._nfree + (len(self._whole) << self._bshift)

    @property
    def pending_frames(self) -> int:
        return len(self._pending) + (len(self._pending_blocks) << self._bshift)

    def alloc(self) -> tuple[int, memoryview]:
        """A page frame: its pfn and a writable view of it (contents undefined). Raises
        OSError when no memory can be mapped."""
        partial = self._partial
        split = self._split
        while partial:
            b = partial[-1]
            free = split[b]
            if free:
                pfn = free.pop()
                if not free:
                    partial.pop()
                    self._listed[b] = 0
                self._nfree -= 1
                return pfn, self._fviews[pfn] or self._frame_view(pfn)
            partial.pop()  # merged back whole (or taken as a folio) since it was listed
            self._listed[b] = 0
        b = self._whole.pop() if self._whole else self._carve()
        pfn = b << self._bshift
        n = self.block_frames
        if n > 1:  # split it: this frame now, the others for the next pages
            split[b] = list(range(pfn + n - 1, pfn, -1))
            self._nfree += n - 1
            if not self._listed[b]:
                partial.append(b)
                self._listed[b] = 1
        return pfn, self._fviews[pfn] or self._frame_view(pfn)

    def alloc_block(self, *, force: bool = False) -> tuple[int, memoryview] | None:
        """A whole block for a folio: the pfn of its first frame and a writable view of all
        ``block_frames`` of them. None when no block is free and carving one would strand
        the page frames free in split blocks (``slack_frames`` or more), unless ``force``.
        Raises OSError when no memory can be mapped."""
        if self._whole:
            b = self._whole.pop()
        elif self._nfree >= self.slack_frames and not force:
            return None
        else:
            b = self._carve()
        pfn = b << self._bshift
        view = self._bviews[b]
        if view is None:
            view = self._bviews[b] = self._view(pfn, self.block_frames)
        return pfn, view

    def free(self, pfn: int, nr: int = 1) -> None:
        """Give back what ``alloc`` (``nr`` 1) or ``alloc_block`` (``nr`` > 1) gave as
        ``pfn``. It is reused only after the next ``quiesce``."""
        if nr == 1:
            self._pending.append(pfn)
        else:
            self._pending_blocks.append(pfn >> self._bshift)

    def quiesce(self) -> None:
        """The caller holds no frame views: memory freed since the last call may be reused."""
        if self._pending:
            split = self._split
            listed = self._listed
            n = self.block_frames
            bshift = self._bshift
            for pfn in self._pending:
                b = pfn >> bshift
                free = split[b]
                free.append(pfn)
                k = len(free)
                if k == n:  # every frame of the block is free: merge it back whole
                    free.clear()
                    self._whole.append(b)
                    self._nfree -= n - 1
                else:
                    self._nfree += 1
                    if k == 1 and not listed[b]:
                        self._partial.append(b)
                        listed[b] = 1
            self._pending.clear()
        if self._pending_blocks:
            self._whole.extend(self._pending_blocks)
            self._pending_blocks.clear()

    def _frame_view(self, pfn: int) -> memoryview:
        view = self._fviews[pfn] = self._view(pfn, 1)
        return view

    def _view(self, pfn: int, n: int) -> memoryview:
        chunk, i = divmod(pfn, self.chunk_frames)
        return self._views[chunk][i * FRAME_SIZE : (i + n) * FRAME_SIZE]

    def _carve(self) -> int:
        """A block of fresh memory: the next of the current chunk (mapping one if needed)."""
        per_chunk = self.chunk_frames >> self._bshift
        b = self._carved
        if b == len(self._views) * per_chunk:
            self._new_chunk()
        self._carved = b + 1
        self._split.append([])
        self._listed.append(0)
        self._bviews.append(None)
        self._fviews.extend([None] * self.block_frames)
        if self.ahead and not self._spare_wanted and b % per_chunk >= per_chunk // 2:
            self._map_ahead()
        return b

    def _new_chunk(self) -> None:
        spare = self._spare
        mm: mmap.mmap | None = None
        if spare is not None:  # (cleared only when set: a delivery is never overwritten)
            self._spare = None
            self._spare_wanted = False
            try:
                mm = spare.unwrap()
            except OSError:
                mm = None  # mapping ahead failed (memory?): try once more here, and report it
        if mm is None:
            self.maps_inline += 1
            mm = _map_chunk(self.chunk_frames * FRAME_SIZE)  # OSError: out of memory
        self._views.append(memoryview(mm))  # (the view keeps the mapping alive)

    def _map_ahead(self) -> None:
        """Map (and fault in) the next chunk on a worker thread; ``_carve`` takes it over when
        the current chunk runs out (or maps one itself if it is not ready yet)."""
        self._spare_wanted = True
        nbytes = self.chunk_frames * FRAME_SIZE

        def deliver(result: outcome.Outcome[mmap.mmap]) -> None:
            self._spare = result  # one reference store from the worker: atomic under the GIL

        trio.lowlevel.start_thread_soon(
            lambda: _map_chunk(nbytes), deliver, name="asyncfs-arena-populate")
