"""Reclaim: the active/inactive lists, pinned and locked pages, scan resistance (invariant 14)."""

from __future__ import annotations

import pytest

from asyncfs.pagecache import PG_LOCKED, PG_REFERENCED, Page, PageLRU
from asyncfs.pagecache.page import LRU_INACTIVE
from tests.mutants import mutant


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


# -- growth on refaults (workingset evidence) ---------------------------------------------


def read_page(lru: PageLRU, index: int) -> bool:
    """One read the way the engine does it: a hit marks the page accessed; a miss inserts it
    (a refault if its shadow is remembered) and reclaims. Returns whether it hit."""
    p = lru.lookup(index)
    if p is not None:
        lru.mark_accessed(p)
        return True
    p = Page(index)
    lru.insert(p)
    lru.mark_accessed(p)
    lru.shrink()
    return False


GROW_ON_EVERY_INSERT = (
    "pages[idx] = page",
    "pages[idx] = page; self.limit = min(self.limit + 1, self.max_limit)",
)
NO_CAP = ("if self.limit < self.max_limit:", "if True:")
SHADOW_CAP_LIMIT = ("cap = self.max_limit", "cap = self.limit")


def break_lru(monkeypatch: pytest.MonkeyPatch, name: str, edit: tuple[str, str]) -> None:
    monkeypatch.setattr(PageLRU, name, mutant(PageLRU, name, *edit))


@pytest.mark.parametrize("variant", ["kernel", "grow_on_every_insert"])
def test_stream_never_grows_the_cache(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-pass scan of 4x the ceiling never refaults: ``limit`` stays at its start and
    the cache never holds more than ``limit`` pages.

    Broken variant: ``grow_on_every_insert`` (growth not tied to a refault)."""
    if variant == "grow_on_every_insert":
        break_lru(monkeypatch, "insert", GROW_ON_EVERY_INSERT)
    lru = PageLRU(100, 400)
    peak = 0
    for i in range(1600):
        read_page(lru, i)
        peak = max(peak, len(lru))
    assert (lru.limit == 100 and lru.grown == 0 and peak <= 100) == (variant == "kernel")
    assert lru.refaults == 0


@pytest.mark.parametrize("variant", ["kernel", "shadow_capacity_still_limit"])
def test_reread_working_set_grows_until_it_hits(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A working set of 1.5x and one of 3x the start, each read three times: the second pass
    refaults and grows ``limit`` by those pages, so the third pass hits everywhere. The 3x set
    refaults from 2x the start away, so only a shadow set that remembers ``max_limit``
    indexes recognises it.

    Broken variant: ``shadow_capacity_still_limit`` (shadow set bounded by the current limit:
    the 3x set never refaults, never grows, and keeps missing)."""
    if variant == "shadow_capacity_still_limit":
        break_lru(monkeypatch, "_remember", SHADOW_CAP_LIMIT)
    for size in (150, 300):
        lru = PageLRU(100, 400)
        passes = [sum(read_page(lru, i) for i in range(size)) for _ in range(3)]
        assert passes[0] == 0 and passes[1] <= 100
        grew = lru.limit == size and lru.grown == size - 100 and passes[2] == size
        assert grew == (variant == "kernel" or size == 150), (size, lru.limit, passes)
        assert len(lru) <= lru.limit <= lru.max_limit


@pytest.mark.parametrize("variant", ["kernel", "no_cap"])
def test_growth_stops_at_max_limit(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random reads over a working set of 3x the ceiling refault again and again: ``limit``
    reaches ``max_limit`` and never passes it (nor does the number of cached pages).

    Broken variant: ``no_cap`` (every refault grows the limit)."""
    import random

    if variant == "no_cap":
        break_lru(monkeypatch, "insert", NO_CAP)
    rng = random.Random(6)
    lru = PageLRU(100, 200)
    over = False
    for _ in range(6000):
        read_page(lru, rng.randrange(600))
        over = over or lru.limit > 200 or len(lru) > 200
    assert (lru.limit == 200 and lru.grown == 100 and not over) == (variant == "kernel")


@pytest.mark.parametrize("variant", ["kernel", "default_ceiling_doubled"])
def test_default_is_a_fixed_bound(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``max_pages`` the limit never changes (the old behaviour), even for a working
    set that refaults; a ceiling below the start is refused.

    Broken variant: ``default_ceiling_doubled`` (no ``max_pages`` means room to grow)."""
    if variant == "default_ceiling_doubled":
        break_lru(monkeypatch, "__init__",
                  ("max_pages = limit_pages", "max_pages = 2 * limit_pages"))
    lru = PageLRU(100)
    for _ in range(3):
        for i in range(150):
            read_page(lru, i)
    assert lru.refaults > 0
    assert (lru.limit == lru.max_limit == 100 and lru.grown == 0) == (variant == "kernel")
    with pytest.raises(ValueError, match="below its start"):
        PageLRU(100, 99)
    assert PageLRU(100, 100).max_limit == 100


@pytest.mark.parametrize("variant", ["kernel", "entry_per_page"])
def test_shadow_set_of_a_long_stream_stays_small(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shadow set of a stream remembers ``max_limit`` pages in a few bytes each (bitmasks
    of 64 pages): a 2 GiB stream under a 2 GiB ceiling must not add tens of MiB to the
    daemon. At 1/8 scale: 65,536 remembered pages and 1,024 cached ones in under 1 MiB.

    Broken variant: ``entry_per_page`` (a group per page index, as one dict entry per
    shadow costs: ~8 MiB at this scale)."""
    import tracemalloc

    if variant == "entry_per_page":
        monkeypatch.setattr("asyncfs.pagecache.lru.SHADOW_SHIFT", 0)
        monkeypatch.setattr("asyncfs.pagecache.lru.SHADOW_MASK", 0)
    lru = PageLRU(1024, 65536)
    tracemalloc.start()
    try:
        for i in range(70000):
            read_page(lru, i)
        shadow_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert lru.grown == 0 and lru.refaults == 0
    # every reclaimed page is still recognised up to the ceiling: re-reading the newest
    # evictions refaults
    assert sum(not read_page(lru, i) for i in range(68000, 68900)) == 900
    assert lru.refaults == 900
    assert (shadow_bytes < 1 << 20) == (variant == "kernel"), shadow_bytes


@pytest.mark.parametrize("variant", ["kernel", "counts_a_folio_once", "remembers_its_head_only"])
def test_folio_is_indexed_counted_and_remembered_as_its_pages(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folio of 16 pages is found under each of its 16 indexes and counts 16 against
    ``limit``; reclaim drops all its indexes at once, counts 16 evictions and remembers all
    16 (a later miss on any of them is a refault); a page or folio overlapping a cached folio
    is refused.

    Broken variants: ``counts_a_folio_once`` (reclaim takes a folio as one page and evicts
    more than the excess); ``remembers_its_head_only`` (a miss inside a reclaimed folio is not
    seen as a refault, so a re-read working set read by folios never grows the cache)."""
    if variant == "counts_a_folio_once":
        break_lru(monkeypatch, "shrink", ("excess -= nr", "excess -= 1"))
    elif variant == "remembers_its_head_only":
        break_lru(monkeypatch, "_remember", (
            "bit = ((1 << page.nr) - 1) << (idx & SHADOW_MASK)",
            "bit = 1 << (idx & SHADOW_MASK)"))
    lru = PageLRU(40, 200)
    folio = Page(16, 0, nr=16)
    lru.insert(folio)
    assert all(lru.lookup(i) is folio for i in range(16, 32)) and len(lru) == 16
    assert lru.lookup(15) is None and lru.lookup(32) is None
    for clash in (Page(20), Page(0, 0, nr=32)):
        with pytest.raises(KeyError):
            lru.insert(clash)
    assert len(lru) == 16 and sum(1 for _ in lru) == 1
    fill(lru, range(64, 64 + 40))  # 56 pages cached: the folio is the oldest
    lru.shrink()
    counted = (len(lru) == 40 and lru.evictions == 16
               and all(lru.lookup(i) is None for i in range(16, 32)))
    refault = Page(27)
    lru.insert(refault)  # a page of the reclaimed folio is read again
    remembered = lru.refaults == 1 and refault.lru != LRU_INACTIVE
    assert (counted, remembered) == {
        "kernel": (True, True), "counts_a_folio_once": (False, True),
        "remembers_its_head_only": (True, False),
    }[variant]


@pytest.mark.parametrize("variant", ["kernel", "grows_by_one"])
def test_refaulting_folio_grows_the_cache_by_its_pages(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folio read again soon after it was reclaimed is a refault: it is put on the active
    list and the cache grows by its 16 pages (within the ceiling), so it fits next to the
    folio that pushed it out. Broken variant: ``grows_by_one`` (the cache grows by one page
    per refaulting folio and keeps evicting the working set)."""
    if variant == "grows_by_one":
        break_lru(monkeypatch, "_insert_folio", (
            "grow = min(page.nr, self.max_limit - self.limit)", "grow = 1"))
    lru = PageLRU(16, 64)
    lru.insert(Page(0, 0, nr=16))
    lru.insert(Page(16, 0, nr=16))
    lru.shrink()  # the older folio goes, remembered
    assert lru.lookup(0) is None and len(lru) == 16
    again = Page(0, 0, nr=16)
    lru.insert(again)
    lru.shrink()
    both = lru.lookup(5) is again and lru.lookup(20) is not None
    assert (lru.refaults, again.lru != LRU_INACTIVE) == (1, True)
    assert (lru.limit == 32 and both) == (variant == "kernel")
