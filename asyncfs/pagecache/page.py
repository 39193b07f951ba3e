"""One cached page of the filesystem device: its key, flag bits and bytes (``struct page``).

The cache is keyed by *device page index* (``dev_off // PAGE_SIZE``) of the filesystem device,
so metadata and file data share one cache and hard links share pages. ``PAGE_SIZE`` is a module
constant so the choice can be revisited (see docs/architecture.md).

Flags are kept as a plain ``int`` on the hot path (``IntFlag`` arithmetic is much slower in
CPython); ``PageFlags`` is the readable view of the same bits.
"""

from __future__ import annotations

from enum import IntFlag

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class PageFlags(IntFlag):
    """The kernel's page flag bits that the cache uses (``PG_*``)."""

    LOCKED = 1 << 0  # I/O in flight (or a retry owns the page)
    UPTODATE = 1 << 1  # data valid; never changes again while the page is cached
    ERROR = 1 << 2  # last I/O failed; cleared by the retry that re-locks the page
    WAITERS = 1 << 3  # some wait entry for this page may be queued in its wait-queue head
    READAHEAD = 1 << 4  # readahead marker: hitting it starts the next async window
    REFERENCED = 1 << 5  # accessed since it was last aged (active/inactive promotion)


PG_LOCKED = int(PageFlags.LOCKED)
PG_UPTODATE = int(PageFlags.UPTODATE)
PG_ERROR = int(PageFlags.ERROR)
PG_WAITERS = int(PageFlags.WAITERS)
PG_READAHEAD = int(PageFlags.READAHEAD)
PG_REFERENCED = int(PageFlags.REFERENCED)

# Private bit (not a kernel flag): brought in by readahead and not read yet (statistics only).
PG_RA_UNUSED = 1 << 6

# Page.lru values: which reclaim list holds the page.
LRU_NONE = 0
LRU_INACTIVE = 1
LRU_ACTIVE = 2


class PageStateError(RuntimeError):
    """A page-state rule was broken by the caller (a bug, never a user error): e.g.
    unlocking an unlocked page (``WaitTable.unlock_page``), or ending the read of a page that
    is not locked (``transitions.end_page_read``; every checked transition is in
    ``pagecache/transitions.py``)."""


class Page:
    """A page of the device: ``index`` is the key, ``data`` valid only when UPTODATE.

    ``data`` is the page's frame (a ``PAGE_SIZE`` ``memoryview`` the engine's arena hands out,
    which the backend reads into), or ``b""`` while it has none; ``pfn`` is the frame's number
    in the arena (-1 while it has none). A frame is whole even for the short last page of a
    device: the bytes past the device end are never read.

    ``refcount`` pins the page against eviction while a read step copies from it (the
    kernel's page reference); parked waiters hold no reference.

    ``nr`` > 1 makes it a *folio*: one Page for the ``nr`` consecutive indexes from ``index``
    (aligned to ``nr``), with one set of flags, one lock and one wait queue for all of them;
    the index maps each of its indexes to it. Its ``data`` is one contiguous frame of ``nr``
    pages (a whole block of the arena), so a read of it is one slice and its backend read one
    iovec.
    """

    __slots__ = ("data", "flags", "index", "lru", "nr", "pfn", "refcount")

    def __init__(self, index: int, flags: int = 0, nr: int = 1) -> None:
        self.index = index
        self.flags = flags
        self.nr = nr
        self.data: memoryview | bytes = b""
        self.pfn = -1
        self.refcount = 0
        self.lru = LRU_NONE

    @property
    def key(self) -> int:
        return self.index

    @property
    def page_flags(self) -> PageFlags:
        return PageFlags(self.flags & ~PG_RA_UNUSED)

    def trylock(self) -> bool:
        """``trylock_page``: take LOCKED if free. No waiting, no wake."""
        if self.flags & PG_LOCKED:
            return False
        self.flags |= PG_LOCKED
        return True

    def __repr__(self) -> str:
        nr = f", nr={self.nr}" if self.nr > 1 else ""
        return f"Page({self.index}, {self.page_flags!r}{nr})"
