"""Micro-benchmark: a one-pass scan of a large file must not flush a hot working set.

Run: .venv/bin/python bench/engine_scan.py
A 16 MiB cache; a 4 MiB hot file read three times (so it is active), then a 128 MiB file
read once sequentially (8x the cache), interleaved with reads of the hot file every 24 MiB
of scan; finally the hot file is read again. Reported: the hot file's hit ratio during and
after the scan, for the engine's active/inactive policy and for a plain LRU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncfs.engine.cache import PageCache
from asyncfs.pagecache import Page, PageLRU
from asyncfs.pagecache.page import LRU_INACTIVE
from asyncfs.testing import MemoryDevice, contiguous_file

MiB = 1 << 20
HOT = 4 * MiB
SCAN = 128 * MiB
REQ = 128 * 1024


def plain_lru_mark_accessed(self: PageLRU, page: Page) -> None:
    self._inactive.pop(page.index, None)
    self._inactive[page.index] = page
    page.lru = LRU_INACTIVE


async def read_all(cache: PageCache, fmap: object, size: int) -> None:
    ra = cache.new_readahead()
    for off in range(0, size, REQ):
        await cache.read_file(fmap, ra, off, REQ)  # type: ignore[arg-type]


async def hot_pass(cache: PageCache, hot: object) -> float:
    """Fraction of the hot file's pages still cached (a hit) when it is read again."""
    pages = HOT // 4096
    resident = sum(1 for i in range(pages) if cache.lookup(i) is not None)
    await read_all(cache, hot, HOT)
    return resident / pages


async def run(policy: str) -> None:
    dev = MemoryDevice(bytes(HOT + SCAN))
    cache = PageCache(dev, cache_bytes=16 * MiB)
    hot = contiguous_file(HOT, 0)
    big = contiguous_file(SCAN, HOT)
    for _ in range(3):
        await read_all(cache, hot, HOT)
    t = time.perf_counter()
    during = []
    ra = cache.new_readahead()
    for off in range(0, SCAN, REQ):
        await cache.read_file(big, ra, off, REQ)
        if off % (24 * MiB) == 0 and off:
            during.append(await hot_pass(cache, hot))
    scan_s = time.perf_counter() - t
    after = await hot_pass(cache, hot)
    s = cache.stats()
    print(
        f"{policy:18} hot hit ratio during scan {sum(during) / len(during):6.1%}, after scan "
        f"{after:6.1%}; scan {SCAN / MiB / scan_s:6.0f} MiB/s; evictions {s['evictions']}"
    )


def main() -> None:
    trio.run(run, "active/inactive")
    PageLRU.mark_accessed = plain_lru_mark_accessed  # type: ignore[method-assign]
    trio.run(run, "plain LRU")


if __name__ == "__main__":
    main()
