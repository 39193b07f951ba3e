"""Micro-benchmark: many readers parked on one page, async wait entries vs worker threads.

Run: .venv/bin/python bench/engine_parked.py [--trace] [readers] [thread pool sizes...]
Default: 10,000 readers; threads mode with pools of 16 and 1,000 (a pool the size of the
reader count would need 10,000 OS threads).

For each configuration: N reader tasks read the same uncached 4 KiB page from a device whose
read completes only when released. We report how many readers are actually parked on the
page's wait entries (async) or blocked in a worker thread (threads) when everything has
settled, the extra memory (RSS delta, and Python heap via tracemalloc), and the time from
the I/O completion until every reader has its bytes.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncfs.engine.cache import PageCache
from asyncfs.testing import GatedDevice

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


async def run(n: int, mode: str, threads: int, trace: bool) -> None:
    dev = GatedDevice(bytes(1 << 20))
    cache = PageCache(dev, wait_mode=mode, threads=threads)  # type: ignore[arg-type]
    done = 0

    async def reader() -> None:
        nonlocal done
        await cache.read_dev(0, 4096)
        done += 1

    gc.collect()
    base_rss = rss()
    if trace:
        tracemalloc.start()
        snap0 = tracemalloc.take_snapshot()
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        t_park = time.perf_counter() - t0
        extra_rss = rss() - base_rss
        heap = 0
        if trace:
            snap1 = tracemalloc.take_snapshot()
            heap = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
            tracemalloc.stop()
        s = cache.stats()
        in_threads = threading.active_count() - 1
        parked_entries = sum(1 for _ in cache.wait_table.queued_entries())
        t1 = time.perf_counter()
        dev.release()
        while done < n:
            await trio.sleep(0.001)
            dev.release()
        t_wake = time.perf_counter() - t1
    label = mode if mode == "async" else f"threads({threads})"
    print(
        f"{label:14} readers={n:6} on_wait_entries={parked_entries:6} "
        f"worker_threads={in_threads:5} parked_now={s['parked_now']:6} "
        f"extra_rss={extra_rss / 2**20:7.1f} MiB "
        + (f"py_heap={heap / 2**20:6.1f} MiB " if trace else "")
        + f"per_reader={extra_rss / n / 1024:5.1f} KiB "
        f"park_all={t_park * 1e3:7.0f} ms wake_all={t_wake * 1e3:7.0f} ms "
        f"backend_reads={cache.stats()['backend_reads']}"
    )


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--trace"]
    trace = "--trace" in sys.argv  # tracemalloc: Python heap split, but inflates RSS
    n = int(args[0]) if args else 10_000
    pools = [int(x) for x in args[1:]] or [16, 1000]
    trio.run(run, n, "async", 16, trace)
    for p in pools:
        trio.run(run, n, "threads", p, trace)


if __name__ == "__main__":
    main()
