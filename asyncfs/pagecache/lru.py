"""Page lookup and size-bounded reclaim with the kernel's active/inactive lists.

Policy (after mm/swap.c ``mark_page_accessed`` and mm/vmscan.c): a new page enters the tail of
the *inactive* list. A read marks it REFERENCED; a second read while still inactive *activates*
it. Reclaim takes pages from the head (oldest end) of the inactive list; when the active list
outgrows the inactive one, its oldest pages are aged: a REFERENCED one loses the bit and gets a
second round, an unreferenced one is moved to the inactive list. A one-pass scan therefore only
churns the inactive list and cannot flush a working set that was read twice.

A new working set must be able to displace an old one even when it does not fit in the
inactive list: like the kernel's workingset shadow entries (and the ghost queue of S3-FIFO),
the indexes of recently reclaimed pages are remembered (at most ``limit`` of them); a page
that faults back in while still remembered is inserted straight into the active list. A scan
never refaults, so it only churns the shadow set.

Pages that are LOCKED (I/O in flight) or pinned (``refcount``, a read step copying from them)
are never reclaimed; so the cache may exceed its limit by those pages only (§4.14).
Lists are ``OrderedDict``s: O(1) append, remove and pop-oldest (a plain dict's
``next(iter(d))`` degrades to a scan over deleted slots when used as a FIFO).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from asyncfs.pagecache.page import (
    LRU_ACTIVE,
    LRU_INACTIVE,
    LRU_NONE,
    PG_LOCKED,
    PG_REFERENCED,
    Page,
)


class PageLRU:
    """The page index (key -> Page) plus the two reclaim lists, bounded to ``limit`` pages."""

    __slots__ = ("_active", "_inactive", "_shadow", "evictions", "limit", "pages", "refaults")

    def __init__(self, limit_pages: int) -> None:
        if limit_pages < 1:
            raise ValueError("cache must hold at least one page")
        self.limit = limit_pages
        self.pages: dict[int, Page] = {}
        self._inactive: OrderedDict[int, Page] = OrderedDict()
        self._active: OrderedDict[int, Page] = OrderedDict()
        self._shadow: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0
        self.refaults = 0

    def __len__(self) -> int:
        return len(self.pages)

    def __iter__(self) -> Iterator[Page]:
        return iter(self.pages.values())

    def lookup(self, index: int) -> Page | None:
        return self.pages.get(index)

    def insert(self, page: Page) -> None:
        """Add a new page (normally LOCKED) at the young end of the inactive list. The caller
        runs ``shrink`` afterwards, once the new pages are in."""
        if page.index in self.pages:
            raise KeyError(f"page {page.index} already cached")
        self.pages[page.index] = page
        if self._shadow and self._shadow.pop(page.index, 0) is None:
            # Refault of a recently reclaimed page: it was part of a working set.
            self.refaults += 1
            self._active[page.index] = page
            page.lru = LRU_ACTIVE
        else:
            self._inactive[page.index] = page
            page.lru = LRU_INACTIVE

    def mark_accessed(self, page: Page) -> None:
        """``mark_page_accessed``: inactive+unreferenced -> referenced; inactive+referenced ->
        active (bit cleared); active -> referenced."""
        flags = page.flags
        if page.lru == LRU_INACTIVE:
            if flags & PG_REFERENCED:
                del self._inactive[page.index]
                self._active[page.index] = page
                page.lru = LRU_ACTIVE
                page.flags = flags & ~PG_REFERENCED
            else:
                page.flags = flags | PG_REFERENCED
        elif not flags & PG_REFERENCED:
            page.flags = flags | PG_REFERENCED

    def remove(self, page: Page) -> None:
        """Drop a page from the index and lists (not a reclaim: no counter)."""
        if self.pages.get(page.index) is not page:
            return
        del self.pages[page.index]
        if page.lru == LRU_INACTIVE:
            del self._inactive[page.index]
        elif page.lru == LRU_ACTIVE:
            del self._active[page.index]
        page.lru = LRU_NONE

    @staticmethod
    def evictable(page: Page) -> bool:
        return not page.flags & PG_LOCKED and page.refcount == 0

    def _age_active(self, budget: int, force: bool = False) -> None:
        """``shrink_active_list``: move up to ``budget`` old active pages to inactive, giving
        REFERENCED ones a second round at the young end of the active list."""
        active = self._active
        inactive = self._inactive
        scanned = 0
        while active and (force or len(active) > len(inactive)) and scanned < budget:
            scanned += 1
            idx, page = active.popitem(last=False)
            if page.flags & PG_REFERENCED:
                page.flags &= ~PG_REFERENCED
                active[idx] = page
            else:
                inactive[idx] = page
                page.lru = LRU_INACTIVE

    def shrink(self) -> list[Page]:
        """Reclaim until within ``limit`` or nothing evictable is left; returns the evicted
        pages (already removed). Skipped (locked/pinned) pages rotate to the young end."""
        excess = len(self.pages) - self.limit
        if excess <= 0:
            return []
        evicted: list[Page] = []
        inactive = self._inactive
        for _ in range(2):
            if len(self._active) > len(inactive):
                self._age_active(2 * excess + 32)
            skipped: list[Page] = []
            while excess > 0 and inactive:
                idx, page = inactive.popitem(last=False)
                if page.flags & PG_LOCKED or page.refcount:
                    skipped.append(page)
                    continue
                del self.pages[idx]
                page.lru = LRU_NONE
                evicted.append(page)
                shadow = self._shadow
                shadow[idx] = None
                if len(shadow) > self.limit:
                    shadow.popitem(last=False)
                excess -= 1
            for page in skipped:
                inactive[page.index] = page
            if excess <= 0:
                break
            # Inactive list exhausted: let the active list feed it, then one more pass.
            self._age_active(len(self._active) * 2, force=True)
            if not inactive:
                break
        self.evictions += len(evicted)
        return evicted

    def evict(self, page: Page) -> bool:
        """Drop one page now if it may be dropped (used by tests and the soak)."""
        if self.pages.get(page.index) is not page or not self.evictable(page):
            return False
        self.remove(page)
        self.evictions += 1
        return True

    def counts(self) -> tuple[int, int]:
        return len(self._active), len(self._inactive)
