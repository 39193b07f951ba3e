"""Pure page state: flags and their checked transitions (``transitions``), hashed wait table,
wake rules, eviction, readahead policy.

Nothing here imports trio, awaits or opens a file: the engine drives these objects from its one
trio thread, and tests drive them step by step. Kernel names are kept where they fit
(``PG_locked`` -> ``PageFlags.LOCKED``, ``page_waitqueue``, ``lock_page_async``, ...).
"""

from asyncfs.pagecache.lru import PageLRU
from asyncfs.pagecache.page import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_ERROR,
    PG_LOCKED,
    PG_READAHEAD,
    PG_REFERENCED,
    PG_UPTODATE,
    PG_WAITERS,
    Page,
    PageFlags,
    PageStateError,
)
from asyncfs.pagecache.readahead import FileReadahead, ReadaheadWindow
from asyncfs.pagecache.waitqueue import WaitEntry, WaitQueueHead, WaitTable

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PG_ERROR",
    "PG_LOCKED",
    "PG_READAHEAD",
    "PG_REFERENCED",
    "PG_UPTODATE",
    "PG_WAITERS",
    "FileReadahead",
    "Page",
    "PageFlags",
    "PageLRU",
    "PageStateError",
    "ReadaheadWindow",
    "WaitEntry",
    "WaitQueueHead",
    "WaitTable",
]
