"""Page-aligned read buffers, reused across reads (O_DIRECT needs aligned memory and offsets).

Buffers come from anonymous ``mmap`` (always page-aligned) in power-of-two size classes; a
freed buffer goes back to a bounded free list so the hot path neither maps memory nor faults
fresh pages in. Each buffer keeps a memoryview of its full length, so the common read (a whole
size class, e.g. one aligned 4 KiB page) builds no new objects.
"""

from __future__ import annotations

import mmap

ALIGN = 4096  # O_DIRECT alignment for offsets, lengths and memory (>= any logical block size)
_KEEP_SMALL = 256  # free buffers kept per class up to 64 KiB
_KEEP_LARGE = 16  # free buffers kept per larger class
_SMALL_LIMIT = 64 * 1024


def align_down(n: int) -> int:
    return n & ~(ALIGN - 1)


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def size_class(n: int) -> int:
    return ALIGN if n <= ALIGN else 1 << (n - 1).bit_length()


class Buffer:
    """One page-aligned buffer and a view of all of it."""

    __slots__ = ("mm", "view")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.mm)


class AlignedPool:
    """Free lists of page-aligned buffers by size class."""

    __slots__ = ("_free",)

    def __init__(self) -> None:
        self._free: dict[int, list[Buffer]] = {}

    def get(self, n: int) -> Buffer:
        """A buffer of at least ``n`` bytes (its length is the size class)."""
        c = size_class(n)
        free = self._free.get(c)
        if free:
            return free.pop()
        return Buffer(c)

    def put(self, buf: Buffer) -> None:
        """Return a buffer no one references any more (no in-flight I/O may target it)."""
        c = len(buf.mm)
        free = self._free.get(c)
        if free is None:
            free = self._free[c] = []
        if len(free) < (_KEEP_SMALL if c <= _SMALL_LIMIT else _KEEP_LARGE):
            free.append(buf)
