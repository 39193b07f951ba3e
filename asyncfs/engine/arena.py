"""Page frames: the memory cached pages live in (the kernel's free page pool, in miniature).

Each cached page owns one ``PAGE_SIZE`` *frame* (a folio one per page it covers), a slot of an
anonymous ``mmap`` chunk. The backend reads straight into the frames of the pages it fills
(``readv`` with one iovec per frame), so a page's bytes are never copied out of a bounce
buffer, and O_DIRECT reads need no bounce buffer at all (frames are page-aligned). With one
``bytes`` object per page, a stream copied every page out of the read's buffer and touched
fresh heap memory while the cache filled.

Chunks are mapped with ``MAP_POPULATE`` *on a worker thread* (``mmap`` releases the GIL), one
chunk ahead of need, so their first-touch faults are taken off the trio thread; frames of
evicted pages are reused, already resident.

A frame is handed out as a writable ``memoryview``. A reader may hold views of frames only
within one scheduler step (the read path copies them out before any ``await``; a single-page
result is a view its caller uses before it awaits again), so a freed frame goes to a *pending*
list, and ``quiesce()`` makes pending frames reusable at a point where the caller holds no
views: a frame freed and reused within one step would change bytes the reader has already
gathered.

The arena never shrinks: it holds as many frames as the cache has ever held pages at once, plus
the chunk mapped ahead, as a heap would.
"""

from __future__ import annotations

import mmap

import outcome
import trio

from asyncfs.pagecache.page import PAGE_SIZE

FRAME_SIZE = PAGE_SIZE
CHUNK_FRAMES = (4 << 20) // FRAME_SIZE  # 4 MiB a chunk
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


def _map_chunk(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=_MAP_FLAGS)


class PageArena:
    """Frames of ``FRAME_SIZE`` bytes, carved from chunks of ``chunk_frames`` frames."""

    __slots__ = (
        "_chunk_view", "_chunks", "_free", "_next", "_pending", "_spare", "_spare_wanted",
        "ahead", "chunk_frames", "frames", "maps_inline",
    )

    def __init__(self, chunk_frames: int = CHUNK_FRAMES, *, ahead: bool = True) -> None:
        if chunk_frames < 1:
            raise ValueError("a chunk holds at least one frame")
        self.chunk_frames = chunk_frames
        self.ahead = ahead  # map the next chunk on a worker thread before it is needed
        self._chunks: list[mmap.mmap] = []
        self._chunk_view: memoryview | None = None
        self._next = chunk_frames  # next unused frame of the current chunk (none yet)
        self._free: list[memoryview] = []
        self._pending: list[memoryview] = []
        self._spare: outcome.Outcome[mmap.mmap] | None = None  # set by the worker thread
        self._spare_wanted = False
        self.frames = 0  # frames ever carved
        self.maps_inline = 0  # chunks mapped on the calling thread (none was ready ahead)

    @property
    def chunks(self) -> int:
        return len(self._chunks)

    @property
    def free_frames(self) -> int:
        return len(self._free)

    @property
    def pending_frames(self) -> int:
        return len(self._pending)

    def alloc(self) -> memoryview:
        """A writable frame. Its previous contents are undefined."""
        if self._free:
            return self._free.pop()
        if self._next >= self.chunk_frames:
            self._new_chunk()
        view = self._chunk_view
        assert view is not None
        i = self._next
        self._next = i + 1
        self.frames += 1
        if self.ahead and not self._spare_wanted and i >= self.chunk_frames // 2:
            self._map_ahead()
        return view[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]

    def alloc_many(self, n: int) -> list[memoryview]:
        """``n`` frames (a folio's), as ``alloc`` would give them one by one; on OSError
        (no memory) the ones already taken go back first."""
        free = self._free
        if len(free) >= n:
            frames = free[-n:]
            del free[-n:]
            return frames
        frames = []
        try:
            for _ in range(n):
                frames.append(self.alloc())
        except BaseException:
            free.extend(frames)  # never handed out: reusable at once
            raise
        return frames

    def free(self, frame: memoryview) -> None:
        """Give a frame back. It is reused only after the next ``quiesce``."""
        self._pending.append(frame)

    def free_many(self, frames: list[memoryview]) -> None:
        """``free`` for each of ``frames``."""
        self._pending.extend(frames)

    def quiesce(self) -> None:
        """The caller holds no frame views: frames freed since the last call may be reused."""
        if self._pending:
            self._free.extend(self._pending)
            self._pending.clear()

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
        self._chunks.append(mm)
        self._chunk_view = memoryview(mm)
        self._next = 0

    def _map_ahead(self) -> None:
        """Map (and fault in) the next chunk on a worker thread; ``alloc`` takes it over when
        the current chunk runs out (or maps one itself if it is not ready yet)."""
        self._spare_wanted = True
        nbytes = self.chunk_frames * FRAME_SIZE

        def deliver(result: outcome.Outcome[mmap.mmap]) -> None:
            self._spare = result  # one reference store from the worker: atomic under the GIL

        trio.lowlevel.start_thread_soon(
            lambda: _map_chunk(nbytes), deliver, name="asyncfs-arena-populate")
