"""A shortened soak (bench/soak.py) for CI: 25 seconds of fio, find and cat over a mount with a
4 MiB cache, 1 ms device latency and injected EIO windows; then every byte against the source,
the stats relations, and a flat RSS."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from asyncfs.cli.options import MountOptions
from asyncfs.cli.wiring import open_stack
from bench.soak import check_stats, run_soak
from tests.mount.helpers import require_fuse

SOAK_MINUTES = float(os.environ.get("ASYNCFS_SOAK_MINUTES", "0.4"))


def test_soak_short(tmp_path: Path) -> None:
    """Bytes exact and the cache within its limit under a mixed load: a page cache that
    marked failed pages UPTODATE with zeros (EIO turned into silent zeros) would show up as
    wrong bytes here, one that never reclaimed as cache_bytes > cache_limit_bytes (the
    unit-level variants: tests/unit/test_engine_invariants.py)."""
    require_fuse()
    if shutil.which("fio") is None:
        pytest.fail("fio is not installed (mount.sh installs it)")
    rep = run_soak(SOAK_MINUTES, tmp_path, cat_workers=3, seed=1)
    summary = {k: v for k, v in rep.summary().items() if k not in ("rss_samples",)}
    assert rep.wrong_bytes == [], summary
    assert rep.spurious_eio == [], summary
    assert rep.fio_failures == [], summary
    assert rep.final_diffs == [], summary
    assert rep.stats_problems == [], summary
    assert rep.rss_flat, summary
    assert rep.eio_windows >= 2 and rep.find_runs > 0 and rep.fio_runs > 0, summary
    assert rep.bytes_checked_during > 0 and rep.bytes_checked_final > 0, summary


def test_check_stats_catches_inconsistent_counters() -> None:
    """The stats relations the soak relies on reject counters that do not add up."""
    good = {"parked_now": 0, "inflight_io": 0, "cache_bytes": 4096, "cache_limit_bytes": 8192,
            "pages_cached": 1, "readahead_used": 1, "readahead_pages": 2,
            "backend_nowait_reads": 0, "backend_reads": 3, "backend_bytes": 12288,
            "wakeups": 2, "parked_total": 2, "evictions": 1, "requests_failed": 1}
    assert check_stats(good, client_eio=1) == []
    for key, value in (("parked_now", 1), ("cache_bytes", 16384), ("readahead_used", 3),
                       ("wakeups", 3), ("backend_bytes", 0), ("requests_failed", 0)):
        assert check_stats({**good, key: value}, client_eio=1), key


async def test_readahead_window_clamped_to_a_quarter_of_the_cache(fuzz_ext4: Path) -> None:
    """A readahead window never exceeds a quarter of the cache: with ``cache_size=4M`` and
    the 8 MiB default window, each window's pages were locked beyond the limit while in
    flight and reclaimed before use (the soak's RSS grew by 14 MiB in 25 s).

    Guards the cap on ``readahead_max``: taken as is, the first 128 KiB read of a 260 KiB
    file reads ahead the rest of it, 33 pages, into a 64-page cache."""
    opts = MountOptions(cache_size=256 * 1024, readahead=8 << 20)
    async with open_stack(fuzz_ext4, opts) as stack:
        vol = stack.volume
        files = await vol.lookup(vol.root_ino, b"files")
        big = await vol.lookup(files.ino, b"big")
        fh = await vol.open(big.ino)
        assert len(await vol.read(fh, 0, 128 * 1024)) == 128 * 1024  # one FUSE-sized read
        assert int(stack.cache.stats()["readahead_pages"]) <= 16
