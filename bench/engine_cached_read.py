"""Micro-benchmark: engine cost of cached reads (no FUSE), per request.

Run: .venv/bin/python bench/engine_cached_read.py
Measures read_dev and read_file on a warm cache for 4 KiB, 128 KiB (what the kernel sends for
cached files) and 1 MiB (direct_io) requests, plus a 4 KiB read at an unaligned offset.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncfs.engine.cache import PageCache
from asyncfs.testing import MemoryDevice, contiguous_file

Reader = Callable[[int], Awaitable[object]]


async def bench() -> None:
    size = 32 << 20
    dev = MemoryDevice(bytes(size))
    cache = PageCache(dev, cache_bytes=64 << 20)
    fmap = contiguous_file(size)
    ra = cache.new_readahead()
    await cache.read_file(fmap, ra, 0, size)  # warm everything
    print(f"{'request':34} {'µs/request':>12} {'MB/s':>9}")
    def dev_at(shift: int) -> Reader:
        return lambda i: cache.read_dev((i % 8000) * 4096 + shift, 4096)

    def file_req(size: int, slots: int) -> Reader:
        return lambda i: cache.read_file(fmap, ra, (i % slots) * size, size)

    cases: list[tuple[str, Reader, int, int]] = [
        ("read_dev 4 KiB aligned", dev_at(0), 4096, 200_000),
        ("read_dev 4 KiB unaligned", dev_at(100), 4096, 200_000),
        ("read_file 4 KiB", file_req(4096, 8000), 4096, 200_000),
        ("read_file 128 KiB", file_req(131072, 250), 131072, 30_000),
        ("read_file 1 MiB", file_req(1 << 20, 31), 1 << 20, 3_000),
    ]
    for label, fn, n_bytes, iters in cases:
        for i in range(1000):
            await fn(i)
        t = time.perf_counter()
        for i in range(iters):
            await fn(i)
        dt = (time.perf_counter() - t) / iters
        print(f"{label:34} {dt * 1e6:12.2f} {n_bytes / dt / 1e6:9.0f}")
    s = cache.stats()
    print(f"hits={s['cache_hits']} misses={s['cache_misses']} backend_reads={s['backend_reads']}")


if __name__ == "__main__":
    trio.run(bench)
