"""Reclaim: the active/inactive lists, pinned and locked pages, scan resistance (§4.14)."""

from __future__ import annotations

import pytest

from asyncfs.pagecache import PG_LOCKED, PG_REFERENCED, Page, PageLRU
from asyncfs.pagecache.page import LRU_INACTIVE
from tests.unit.fakes import mutant


def fill(lru: PageLRU, indexes: range, flags: int = 0) -> list[Page]:
    out = []
    for i in indexes:
        p = Page(i, flags)
        lru.insert(p)
        out.append(p)
    return out


@pytest.mark.parametrize("variant", ["kernel", "broken"])
def test_inv14_never_evicts_locked_or_pinned(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reclaim skips LOCKED pages (I/O in flight) and pinned ones (a read copying from
    them); the cache exceeds its limit by those pages only.

    Broken variant: reclaim checks LOCKED but ignores the pin count."""
    if variant == "broken":
        monkeypatch.setattr(
            PageLRU, "shrink",
            mutant(PageLRU, "shrink", "if page.flags & PG_LOCKED or page.refcount:",
                   "if page.flags & PG_LOCKED:"),
        )
    lru = PageLRU(4)
    locked = fill(lru, range(0, 3), PG_LOCKED)
    pinned = fill(lru, range(3, 5))
    for p in pinned:
        p.refcount = 1
    fill(lru, range(5, 10))
    lru.shrink()
    kept = all(lru.lookup(p.index) is p for p in locked + pinned)
    assert kept == (variant == "kernel")
    if variant == "kernel":
        unevictable = sum(1 for p in lru if not PageLRU.evictable(p))
        assert len(lru) <= lru.limit + unevictable
        assert len(lru) == 5  # only the unevictable ones survive
        for p in pinned:
            p.refcount = 0
        for p in locked:
            p.flags &= ~PG_LOCKED
        lru.shrink()
        assert len(lru) == 4 and lru.evictions == 6


def plain_lru_mark_accessed(self: PageLRU, page: Page) -> None:
    """Broken variant for the scan test: plain LRU (move to the young end, never activate)."""
    self._inactive.pop(page.index, None)
    self._inactive[page.index] = page
    page.lru = LRU_INACTIVE


@pytest.mark.parametrize("variant", ["kernel", "plain_lru"])
def test_scan_does_not_flush_working_set(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hot set read twice survives a one-pass scan of 10x the cache.

    Broken variant: ``plain_lru`` (every access moves the page to the young end of one list)."""
    if variant == "plain_lru":
        monkeypatch.setattr(PageLRU, "mark_accessed", plain_lru_mark_accessed)
    lru = PageLRU(100)
    hot = fill(lru, range(0, 30))
    for _ in range(2):
        for p in hot:
            lru.mark_accessed(p)
    for i in range(1000, 2000):  # the scan: each page inserted and read once
        p = Page(i)
        lru.insert(p)
        lru.mark_accessed(p)
        lru.shrink()
    survived = sum(1 for p in hot if lru.lookup(p.index) is p)
    assert (survived == 30) == (variant == "kernel")
    assert len(lru) == 100


def test_active_list_ages_back_when_working_set_moves() -> None:
    """A new working set displaces an old one: its pages refault while remembered (shadow
    entries) and go straight to the active list; old active pages that are not referenced
    again are aged to the inactive list and reclaimed (the cache is not frozen by old hot
    pages even when the new set does not fit in the inactive list)."""
    lru = PageLRU(20)
    old = fill(lru, range(0, 15))
    for _ in range(2):
        for p in old:
            lru.mark_accessed(p)
    new = [Page(i) for i in range(100, 115)]
    for _ in range(3):
        for p in new:
            if lru.lookup(p.index) is None:
                p.flags &= ~PG_REFERENCED
                lru.insert(p)
            lru.mark_accessed(p)
            lru.shrink()
    assert all(lru.lookup(p.index) is p for p in new)
    assert sum(1 for p in old if lru.lookup(p.index) is p) <= 5
    assert lru.refaults > 0


def test_insert_duplicate_and_remove() -> None:
    lru = PageLRU(2)
    p = Page(1)
    lru.insert(p)
    with pytest.raises(KeyError):
        lru.insert(Page(1))
    assert lru.evict(p) and lru.lookup(1) is None and not lru.evict(p)
    with pytest.raises(ValueError):
        PageLRU(0)
