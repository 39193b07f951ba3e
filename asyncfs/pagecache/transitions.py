"""The page-state transitions of the read path, each a small function that checks its
preconditions (pure: no wait table, no trio).

Every change the engine makes to a page's ``LOCKED``/``UPTODATE``/``ERROR`` bits and to the
readahead bits goes through one of these, so the rules of invariant 10 (docs/invariants.md)
live in one place and a wrong transition raises ``PageStateError`` where it happens instead of
surfacing later as wrong bytes or a reader parked for ever:

=========================  ==========================================  ======================
transition                 from                                        to
=========================  ==========================================  ======================
``lock_page_new``          a new page: no LOCKED/UPTODATE/ERROR         LOCKED
``lock_page_for_retry``    unlocked, not UPTODATE (a failed read)       LOCKED, ERROR cleared
``clear_page_error``       LOCKED by the caller, not UPTODATE           ERROR cleared
``end_page_read``          LOCKED, not UPTODATE                         UPTODATE or ERROR
``end_folio_split``        LOCKED, not UPTODATE (a folio being split)   no readahead bits
=========================  ==========================================  ======================

The unlock itself (``WaitTable.unlock_page``) is the wait table's, since it wakes; it raises
``PageStateError`` on a page that is not LOCKED. ``page_test_clear_readahead`` and
``page_test_clear_ra_unused`` are the kernel's ``TestClearPageReadahead``: a marker is
consumed by exactly one reader (invariant 13).

Kernel names: ``__folio_set_locked`` on a new folio (``filemap_add_folio``), ``ClearPageError``
before ``->readpage`` (``filemap_read_page``), ``folio_end_read`` / ``SetPageUptodate`` /
``SetPageError`` at I/O completion.
"""

from __future__ import annotations

from asyncfs.pagecache.page import (
    LRU_NONE,
    PG_ERROR,
    PG_LOCKED,
    PG_RA_UNUSED,
    PG_READAHEAD,
    PG_UPTODATE,
    Page,
    PageStateError,
)

_RA_BITS = PG_READAHEAD | PG_RA_UNUSED


def lock_page_new(page: Page) -> Page:
    """A page about to enter the cache, LOCKED for the read that will fill it (pages enter
    the cache locked, so no reader can copy one before its bytes are there)."""
    flags = page.flags
    if flags & (PG_LOCKED | PG_UPTODATE | PG_ERROR) or page.lru != LRU_NONE:
        raise PageStateError(f"{page!r} is not a new page")
    page.flags = flags | PG_LOCKED
    return page


def lock_page_for_retry(page: Page) -> None:
    """Take the lock of an unlocked page whose last read failed, to read it again: LOCKED,
    ERROR cleared (a reader woken from now on must not see the old failure)."""
    flags = page.flags
    if flags & PG_LOCKED:
        raise PageStateError(f"retry of locked {page!r}")
    if flags & PG_UPTODATE:
        raise PageStateError(f"retry of up-to-date {page!r}")
    page.flags = (flags | PG_LOCKED) & ~PG_ERROR


def clear_page_error(page: Page) -> None:
    """The caller holds the lock of a page it will read again: clear ERROR first."""
    flags = page.flags
    if not flags & PG_LOCKED:
        raise PageStateError(f"clear_page_error on unlocked {page!r}")
    if flags & PG_UPTODATE:
        raise PageStateError(f"clear_page_error on up-to-date {page!r}")
    page.flags = flags & ~PG_ERROR


def end_page_read(page: Page, ok: bool) -> None:
    """The read of a LOCKED page ended: exactly one of UPTODATE (``ok``) or ERROR is set.
    A failed page also loses its readahead bits (it is read again on demand). The caller
    then unlocks it, which wakes its waiters."""
    flags = page.flags
    if not flags & PG_LOCKED:
        raise PageStateError(f"end of a read of unlocked {page!r}")
    if flags & PG_UPTODATE:
        raise PageStateError(f"end of a read of up-to-date {page!r}")
    if ok:
        page.flags = (flags & ~PG_ERROR) | PG_UPTODATE
    else:
        page.flags = (flags | PG_ERROR) & ~_RA_BITS


def end_folio_split(folio: Page) -> None:
    """A folio whose read failed is being replaced by its pages: it leaves the cache with
    neither UPTODATE nor ERROR, so its waiters look their index up again (invariant 11)
    and wait on the page that replaced it."""
    flags = folio.flags
    if not flags & PG_LOCKED:
        raise PageStateError(f"split of unlocked {folio!r}")
    if flags & PG_UPTODATE:
        raise PageStateError(f"split of up-to-date {folio!r}")
    folio.flags = flags & ~_RA_BITS


def page_test_clear_readahead(page: Page) -> bool:
    """``TestClearPageReadahead``: whether ``page`` carried the readahead marker; a hit on it
    consumes it, so one marker starts one async window. (Its "not read yet" bit goes too.)"""
    flags = page.flags
    if not flags & PG_READAHEAD:
        return False
    page.flags = flags & ~_RA_BITS
    return True


def page_test_clear_ra_unused(page: Page) -> bool:
    """Whether ``page`` was brought in by readahead and not read until now (statistics)."""
    flags = page.flags
    if not flags & PG_RA_UNUSED:
        return False
    page.flags = flags & ~PG_RA_UNUSED
    return True
