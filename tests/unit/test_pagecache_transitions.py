"""The page-state transitions (``pagecache.transitions``, invariant 10 of docs/invariants.md):
each right transition gives the state it promises, each wrong one raises ``PageStateError``.

Every precondition check is also removed in turn (``mutants.mutant``: the check's ``if`` made
``if False:``), and the same test must then see the wrong transition go through: that is
the test's proof that it looks at that check.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asyncfs.pagecache import PG_ERROR, PG_LOCKED, PG_UPTODATE, Page, PageLRU, PageStateError
from asyncfs.pagecache import transitions as tr
from asyncfs.pagecache.page import PG_RA_UNUSED, PG_READAHEAD
from tests.mutants import mutant

VARIANTS = ["kernel", "unchecked"]
L, U, E = PG_LOCKED, PG_UPTODATE, PG_ERROR


def _on_lru(flags: int) -> Page:
    """A page already in a cache (on a reclaim list)."""
    p = Page(3, flags)
    PageLRU(4).insert(p)
    return p


# (transition, how it is called, its check's anchor, a page that check must refuse)
CHECKS: list[tuple[str, Callable[..., object], str, Callable[[], Page]]] = [
    ("lock_page_new", lambda f, p: f(p),
     "if flags & (PG_LOCKED | PG_UPTODATE | PG_ERROR) or page.lru != LRU_NONE:",
     lambda: Page(3, U)),
    ("lock_page_new", lambda f, p: f(p),
     "if flags & (PG_LOCKED | PG_UPTODATE | PG_ERROR) or page.lru != LRU_NONE:",
     lambda: _on_lru(0)),
    ("lock_page_for_retry", lambda f, p: f(p), "if flags & PG_LOCKED:", lambda: Page(3, L | E)),
    ("lock_page_for_retry", lambda f, p: f(p), "if flags & PG_UPTODATE:", lambda: Page(3, U)),
    ("clear_page_error", lambda f, p: f(p), "if not flags & PG_LOCKED:", lambda: Page(3, E)),
    ("clear_page_error", lambda f, p: f(p), "if flags & PG_UPTODATE:", lambda: Page(3, L | U)),
    ("end_page_read", lambda f, p: f(p, True), "if not flags & PG_LOCKED:", lambda: Page(3)),
    ("end_page_read", lambda f, p: f(p, False), "if not flags & PG_LOCKED:", lambda: Page(3)),
    ("end_page_read", lambda f, p: f(p, False), "if flags & PG_UPTODATE:",
     lambda: Page(3, L | U)),
    ("end_folio_split", lambda f, p: f(p), "if not flags & PG_LOCKED:",
     lambda: Page(0, 0, nr=16)),
    ("end_folio_split", lambda f, p: f(p), "if flags & PG_UPTODATE:",
     lambda: Page(0, L | U, nr=16)),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("name", "call", "check", "bad"), CHECKS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CHECKS)])
def test_wrong_transition_raises(
    variant: str, name: str, call: Callable[..., object], check: str,
    bad: Callable[[], Page],
) -> None:
    """Each transition refuses a page in a state it must not start from: a new page that is
    already locked, up to date or cached; a retry of a locked or up-to-date page; clearing
    ERROR without holding the lock; ending the read of a page that is not LOCKED (its read
    was ended twice, or it was unlocked under the I/O) or is already UPTODATE (whose bytes
    never change again); splitting a folio nobody holds.

    Broken variant: ``unchecked`` (that one check removed from the transition: the wrong
    transition goes through silently)."""
    fn = getattr(tr, name)
    if variant == "unchecked":
        fn = mutant(tr, name, check, "if False:")
    raised = False
    try:
        call(fn, bad())
    except PageStateError:
        raised = True
    assert raised == (variant == "kernel")


def test_a_page_read_twice_through_every_transition() -> None:
    """The life of a page whose first read fails: new -> LOCKED; the failed read -> ERROR
    (readahead bits dropped); unlocked; the retry -> LOCKED without ERROR; the good read ->
    UPTODATE only. A folio being split loses its readahead bits and gains neither outcome."""
    p = tr.lock_page_new(Page(7, PG_RA_UNUSED | PG_READAHEAD))
    assert p.flags == L | PG_RA_UNUSED | PG_READAHEAD
    tr.end_page_read(p, False)
    assert p.flags == L | E
    p.flags &= ~L  # (the wait table's unlock_page, which also wakes)
    tr.lock_page_for_retry(p)
    assert p.flags == L
    tr.end_page_read(p, True)
    assert p.flags == L | U
    q = Page(5, L | E)
    tr.clear_page_error(q)
    assert q.flags == L
    folio = tr.lock_page_new(Page(0, PG_RA_UNUSED, nr=16))
    tr.end_folio_split(folio)
    assert folio.flags == L


@pytest.mark.parametrize("variant", VARIANTS)
def test_readahead_marker_is_consumed_once(variant: str) -> None:
    """``page_test_clear_readahead`` answers True once per marker: the first reader that
    meets it consumes it (and the page's "not read yet" bit), so one marker starts one async
    window (invariant 13). ``page_test_clear_ra_unused`` likewise counts a page once.

    Broken variant: the marker tested but not cleared (every reader of the page sees it)."""
    fn = tr.page_test_clear_readahead
    if variant == "unchecked":
        fn = mutant(tr, "page_test_clear_readahead",
                    "page.flags = flags & ~_RA_BITS", "page.flags = flags & ~PG_RA_UNUSED")
    p = Page(1, U | PG_READAHEAD | PG_RA_UNUSED)
    answers = [fn(p), fn(p)]
    assert (answers == [True, False]) == (variant == "kernel")
    assert not p.flags & PG_RA_UNUSED
    q = Page(2, U | PG_RA_UNUSED)
    assert [tr.page_test_clear_ra_unused(q), tr.page_test_clear_ra_unused(q)] == [True, False]
    assert not tr.page_test_clear_readahead(q) and q.flags == U
