"""Page lookup and size-bounded reclaim with the kernel's active/inactive lists.

Policy (after mm/swap.c ``mark_page_accessed`` and mm/vmscan.c): a new page enters the tail of
the *inactive* list. A read marks it REFERENCED; a second read while still inactive *activates*
it. Reclaim takes pages from the head (oldest end) of the inactive list; when the active list
outgrows the inactive one, its oldest pages are aged: a REFERENCED one loses the bit and gets a
second round, an unreferenced one is moved to the inactive list. A one-pass scan therefore only
churns the inactive list and cannot flush a working set that was read twice.

A new working set must be able to displace an old one even when it does not fit in the
inactive list: like the kernel's workingset shadow entries (and the ghost queue of S3-FIFO),
the indexes of recently reclaimed pages are remembered (at most ``max_limit`` of them); a page
that faults back in while still remembered is inserted straight into the active list. A scan
never refaults, so it only churns the shadow set.

A refault is also the evidence that more memory would have turned the miss into a hit (the
page was reclaimed too early, mm/workingset.c): while ``limit`` is below ``max_limit`` each
refault raises ``limit`` by that page instead of evicting another. A stream never refaults, so
it never grows the cache (touching fresh memory is what makes a big cache slow for streams); a
working set that is read again grows it until it fits or ``max_limit`` is reached. The shadow
set remembers ``max_limit`` indexes so a refault is recognised over that larger distance; it
keeps them as bitmasks, one per group of consecutive indexes covering 256 KiB (64 pages; a group
is forgotten whole, oldest first), so remembering a 2 GiB stream costs ~1 MiB, not the ~60 MiB of
one dict entry per index.

Pages that are LOCKED (I/O in flight) or pinned (``refcount``, a read step copying from them)
are never reclaimed; so the cache may exceed its limit by those pages only (invariant 14,
docs/invariants.md).
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
    PAGE_SHIFT,
    PG_LOCKED,
    PG_REFERENCED,
    Page,
)

SHADOW_SHIFT = 18 - PAGE_SHIFT
SHADOW_MASK = (1 << SHADOW_SHIFT) - 1  # a group: the pages of 256 KiB, consecutive


class PageLRU:
    """The page index (key -> Page) plus the two reclaim lists, bounded to ``limit`` pages;
    ``limit`` starts at ``limit_pages`` and grows on refaults up to ``max_pages`` (default:
    ``limit_pages``, a fixed bound)."""

    __slots__ = (
        "_active", "_inactive", "_shadow", "_shadow_n", "evictions", "grown", "limit",
        "max_limit", "pages", "refaults",
    )

    def __init__(self, limit_pages: int, max_pages: int | None = None) -> None:
        if limit_pages < 1:
            raise ValueError("cache must hold at least one page")
        if max_pages is None:
            max_pages = limit_pages
        elif max_pages < limit_pages:
            raise ValueError(
                f"cache ceiling ({max_pages} pages) is below its start ({limit_pages} pages)"
            )
        self.limit = limit_pages
        self.max_limit = max_pages
        self.pages: dict[int, Page] = {}
        self._inactive: OrderedDict[int, Page] = OrderedDict()
        self._active: OrderedDict[int, Page] = OrderedDict()
        # Shadow entries as bitmasks of a group's pages (a stream's evictions fill whole
        # groups): ~2 bytes a remembered page instead of ~120 for one dict entry each.
        self._shadow: OrderedDict[int, int] = OrderedDict()
        self._shadow_n = 0  # shadow entries remembered (bits set)
        self.evictions = 0
        self.refaults = 0
        self.grown = 0  # pages added to ``limit`` by refaults

    def __len__(self) -> int:
        """Cached pages, a folio counting as its ``nr`` pages (what ``limit`` bounds)."""
        return len(self.pages)

    def __iter__(self) -> Iterator[Page]:
        """Each cached Page once (a folio is indexed under each of its indexes)."""
        return (p for i, p in self.pages.items() if i == p.index)

    def lookup(self, index: int) -> Page | None:
        return self.pages.get(index)

    def insert(self, page: Page) -> None:
        """Add a new page (normally LOCKED) at the young end of the inactive list. The caller
        runs ``shrink`` afterwards, once the new pages are in."""
        if page.nr > 1:
            self._insert_folio(page)
            return
        idx = page.index
        pages = self.pages
        if idx in pages:
            raise KeyError(f"page {idx} already cached")
        pages[idx] = page
        shadow = self._shadow
        if shadow and shadow.get(idx >> SHADOW_SHIFT, 0) >> (idx & SHADOW_MASK) & 1:
            # Refault of a recently reclaimed page: it was part of a working set.
            self._forget(idx)
            self.refaults += 1
            if self.limit < self.max_limit:
                # Evicted too early: a bigger cache would have hit. Grow by this page.
                self.limit += 1
                self.grown += 1
            self._active[idx] = page
            page.lru = LRU_ACTIVE
        else:
            self._inactive[idx] = page
            page.lru = LRU_INACTIVE

    def _insert_folio(self, page: Page) -> None:
        """``insert`` for a folio: indexed under each of its indexes; a refault if any of them
        is remembered, and then the cache grows by its pages. (A folio is aligned to its
        size, which divides a shadow group's: its shadow entries are one run of bits.)"""
        idx = page.index
        pages = self.pages
        span = range(idx, idx + page.nr)
        if not pages.keys().isdisjoint(span):
            raise KeyError(f"pages {idx}..{span[-1]} already partly cached")
        pages.update(dict.fromkeys(span, page))
        shadow = self._shadow
        group = idx >> SHADOW_SHIFT
        mask = shadow.get(group, 0)
        bits = mask & (((1 << page.nr) - 1) << (idx & SHADOW_MASK))
        if bits:
            if mask == bits:
                del shadow[group]
            else:
                shadow[group] = mask & ~bits
            self._shadow_n -= bits.bit_count()
            self.refaults += 1
            grow = min(page.nr, self.max_limit - self.limit)
            self.limit += grow
            self.grown += grow
            self._active[idx] = page
            page.lru = LRU_ACTIVE
        else:
            self._inactive[idx] = page
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
        for i in range(page.index, page.index + page.nr):
            del self.pages[i]
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
        pages = self.pages
        n_evicted = 0
        for _ in range(2):
            if len(self._active) > len(inactive):
                self._age_active(2 * excess + 32)
            skipped: list[Page] = []
            while excess > 0 and inactive:
                idx, page = inactive.popitem(last=False)
                if page.flags & PG_LOCKED or page.refcount:
                    skipped.append(page)
                    continue
                nr = page.nr
                if nr == 1:
                    del pages[idx]
                else:
                    for i in range(idx, idx + nr):
                        del pages[i]
                page.lru = LRU_NONE
                evicted.append(page)
                excess -= nr
                n_evicted += nr
            for page in skipped:
                inactive[page.index] = page
            if excess <= 0:
                break
            # Inactive list exhausted: let the active list feed it, then one more pass.
            self._age_active(len(self._active) * 2, force=True)
            if not inactive:
                break
        if evicted:
            self._remember(evicted, n_evicted)
        self.evictions += n_evicted
        return evicted

    def _remember(self, evicted: list[Page], n_pages: int) -> None:
        """Add shadow entries for reclaimed pages; then forget the oldest groups while more
        than ``max_limit`` entries are remembered. (A group keeps the age of its first entry.
        A reclaimed page's bit is never already set: inserting a page clears its bit.)"""
        shadow = self._shadow
        get = shadow.get
        for page in evicted:
            idx = page.index
            group = idx >> SHADOW_SHIFT
            mask = get(group)
            bit = ((1 << page.nr) - 1) << (idx & SHADOW_MASK)  # a folio: one run of bits
            shadow[group] = bit if mask is None else mask | bit
        n = self._shadow_n + n_pages
        cap = self.max_limit
        while n > cap:
            _, old = shadow.popitem(last=False)
            n -= old.bit_count()
        self._shadow_n = n

    def remembered_near(self, idx: int) -> list[int]:
        """The shadow entries in ``idx``'s group (ascending): pages reclaimed near a
        page that just refaulted, which a refault-around read can bring back with it."""
        group = idx >> SHADOW_SHIFT
        mask = self._shadow.get(group, 0)
        base = group << SHADOW_SHIFT
        out = []
        while mask:
            low = mask & -mask
            out.append(base + low.bit_length() - 1)
            mask ^= low
        return out

    @property
    def headroom(self) -> int:
        """Pages ``limit`` may still grow by (refaults) before reaching ``max_limit``."""
        return self.max_limit - self.limit

    def _forget(self, idx: int) -> None:
        group = idx >> SHADOW_SHIFT
        mask = self._shadow[group] & ~(1 << (idx & SHADOW_MASK))
        if mask:
            self._shadow[group] = mask
        else:
            del self._shadow[group]
        self._shadow_n -= 1

    def evict(self, page: Page) -> bool:
        """Drop one page now if it may be dropped (used by tests and the soak)."""
        if self.pages.get(page.index) is not page or not self.evictable(page):
            return False
        self.remove(page)
        self.evictions += page.nr
        return True

    def counts(self) -> tuple[int, int]:
        return len(self._active), len(self._inactive)
