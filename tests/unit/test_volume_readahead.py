"""Device readahead of the volume (engine/volume_ra.py): inode-table windows as ext4's
__ext4_get_inode_loc computes them, read-around of small files with the MMAP_LOTSAMISS cut-off,
and a cold walk of a real image through the real PageCache: same bytes, far fewer device reads."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from asyncfs.engine.cache import PageCache
from asyncfs.engine.volume import Volume
from asyncfs.engine.volume_ra import (
    EXT4_DEF_INODE_READAHEAD_BLKS,
    MMAP_LOTSAMISS,
    READAROUND_PAGES,
    DeviceReadahead,
)
from asyncfs.errors import WouldBlockError
from asyncfs.ext4 import group
from asyncfs.pagecache import PAGE_SIZE
from asyncfs.testing import GatedDevice, MemoryDevice, pattern
from asyncfs.testing.imagegen import make_image
from asyncfs.types import Run
from tests.mutants import breaks
from tests.unit.volume_walk import fails_unless_kernel

VARIANTS = ["kernel", "broken"]

DIRS = 6
FILES_PER_DIR = 60


def _small_tree(root: Path) -> dict[str, bytes]:
    rnd = random.Random(7)
    files: dict[str, bytes] = {}
    root.mkdir()
    for d in range(DIRS):
        (root / f"d{d}").mkdir()
        for f in range(FILES_PER_DIR):
            data = rnd.randbytes(rnd.randrange(1, 40_000))
            (root / f"d{d}" / f"f{f:03d}").write_bytes(data)
            files[f"d{d}/f{f:03d}"] = data
    return files


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, bytes]]:
    base = tmp_path_factory.mktemp("ra")
    files = _small_tree(base / "src")
    img = make_image(base / "src", base / "img", "ext4")
    return img.read_bytes(), files


async def _walk(vol: Volume) -> dict[str, bytes]:
    """find + cat: list every directory (stat'ing each entry, as readdirplus does), then read
    every file from offset 0 in 128 KiB requests."""
    out: dict[str, bytes] = {}
    todo: list[tuple[str, int]] = [("", vol.root_ino)]
    files: list[tuple[str, int]] = []
    while todo:
        path, ino = todo.pop()
        for e in await vol.readdir(ino, 0):
            if e.name in (b".", b"..", b"lost+found"):
                continue
            await vol.getattr(e.ino)
            child = f"{path}/{e.name.decode()}".lstrip("/")
            (todo if e.file_type == 2 else files).append((child, e.ino))
    for path, ino in files:
        h = await vol.open(ino)
        parts = []
        off = 0
        while chunk := await vol.read(h, off, 128 * 1024):
            parts.append(bytes(chunk))
            off += len(chunk)
        out[path] = b"".join(parts)
    return out


async def _cold_walk(image: bytes, readahead: bool) -> tuple[dict[str, bytes], int, Volume]:
    dev = MemoryDevice(image)
    cache = PageCache(dev, cache_bytes=64 << 20)
    try:
        vol = await Volume.mount(cache, device_size=dev.size, readahead=readahead)
        got = await _walk(vol)
    finally:
        await cache.aclose()
    return got, cache.backend_reads, vol


@pytest.mark.parametrize("variant", VARIANTS)
async def test_cold_walk_reads_same_bytes_with_far_fewer_device_reads(
    small_image: tuple[bytes, dict[str, bytes]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: ``small_file`` returning before ``start`` (one device read per file:
    the read count stays near the file count)."""
    breaks(variant, monkeypatch, DeviceReadahead, "small_file",
           "await self.start(first, first + window - 1)", "return")
    image, files = small_image
    plain, plain_reads, _ = await _cold_walk(image, readahead=False)
    fast, fast_reads, vol = await _cold_walk(image, readahead=True)
    assert plain == files
    assert fast == files
    nfiles = len(files)
    # without readahead: about one device read per file (small neighbours may share a page)
    assert plain_reads >= nfiles // 2
    with fails_unless_kernel(variant):
        assert fast_reads * 3 < plain_reads, (fast_reads, plain_reads)
    if variant != "kernel":
        return
    assert vol.device_readahead.windows > 0
    assert vol.device_readahead.mmap_miss <= MMAP_LOTSAMISS


@pytest.mark.parametrize("variant", VARIANTS)
async def test_inode_walk_reads_inode_table_in_windows(
    small_image: tuple[bytes, dict[str, bytes]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stat of every inode in order costs about one device read per 32 table blocks.

    Broken variant: no inode readahead in ``Volume.inode`` (one read per 4 KiB table block,
    23 here for 360 files at 16 inodes per block) fails the bound."""
    breaks(variant, monkeypatch, Volume, "inode", "if not self._ra.cached(loc):", "if False:")
    image, files = small_image
    dev = MemoryDevice(image)
    cache = PageCache(dev, cache_bytes=64 << 20)
    try:
        vol = await Volume.mount(cache, device_size=dev.size)
        before = cache.backend_reads
        n = 0
        for ino in range(11, 11 + len(files) + DIRS):
            await vol.getattr(ino)
            n += 1
        reads = cache.backend_reads - before
    finally:
        await cache.aclose()
    inodes_per_block = vol.sb.block_size // vol.sb.s_inode_size
    table_blocks = (11 + n) // inodes_per_block + 1
    assert table_blocks > 8  # the bound below is meaningful
    with fails_unless_kernel(variant):
        assert reads <= table_blocks // EXT4_DEF_INODE_READAHEAD_BLKS + 2, reads


_WINDOW_VARIANTS = {
    "unused-ignored": ("num -= min(gd.bg_itable_unused, num)", "pass"),
    "unaligned": ("b = max(block & ~(ra_blks - 1), table)", "b = block"),
}


@pytest.mark.parametrize("variant", ["kernel", *_WINDOW_VARIANTS])
async def test_inode_table_window_matches_kernel_rule(
    small_image: tuple[bytes, dict[str, bytes]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window is the aligned run of ``ra_blks`` blocks holding the inode, clipped at the
    table start and at the last block in use (bg_itable_unused, with group checksums).

    Broken variants: ignoring bg_itable_unused (the window runs to the aligned end, past the
    used part); not aligning the start (the window starts at the inode's own block)."""
    if variant != "kernel":
        breaks(variant, monkeypatch, group, "inode_table_readahead", *_WINDOW_VARIANTS[variant])
    image, _ = small_image
    dev = MemoryDevice(image)
    cache = PageCache(dev)
    try:
        vol = await Volume.mount(cache, device_size=dev.size)
    finally:
        await cache.aclose()
    sb = vol.sb
    gd = vol._gds[0]
    ipb = sb.block_size // sb.s_inode_size
    used = sb.s_inodes_per_group - gd.bg_itable_unused
    assert gd.bg_itable_unused > 0 and used // ipb < EXT4_DEF_INODE_READAHEAD_BLKS
    ra_blks = EXT4_DEF_INODE_READAHEAD_BLKS
    table = gd.bg_inode_table
    with fails_unless_kernel(variant):
        for ino in (1, 2, 11, 40, used):
            r = group.inode_table_readahead(sb, gd, ino, ra_blks)
            block = table + (ino - 1) // ipb
            start = max(block & ~(ra_blks - 1), table)  # aligned, clipped at the table
            assert r.start == start
            assert block in r
            # inclusive end, as the kernel's loop: the aligned end or the last block in use
            assert r.stop - 1 == min(start + ra_blks, table + used // ipb)
        # a smaller window: aligned down to a multiple of ra_blks (relative to block 0)
        r = group.inode_table_readahead(sb, gd, used, 4)
        block = gd.bg_inode_table + (used - 1) // ipb
        assert r.start == max(block & ~3, gd.bg_inode_table)
        assert r.stop - r.start <= 5 and block in r


class _FakeMap:
    def __init__(self, dev_off: int | None, size: int = 10_000) -> None:
        self._dev_off = dev_off
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def map(self, off: int, length: int) -> list[Run]:
        return [Run(off, min(length, self._size - off), self._dev_off)]


class _CountingReader:
    """lookup + read_dev(nowait) as PageCache answers them; every window is recorded."""

    def __init__(self) -> None:
        self.present: set[int] = set()
        self.windows: list[tuple[int, int]] = []

    def lookup(self, index: int) -> object | None:
        return True if index in self.present else None

    async def read_dev(self, off: int, length: int, *, nowait: bool = False) -> bytes:
        assert nowait
        self.windows.append((off, length))
        raise WouldBlockError("in flight")


_LOTSAMISS_VARIANTS = {
    "no-cutoff": ("if self.mmap_miss > MMAP_LOTSAMISS:", "if False:"),
    "hits-ignored": ("self.mmap_miss -= 1", "pass"),
}


@pytest.mark.parametrize("variant", ["kernel", *_LOTSAMISS_VARIANTS])
async def test_readaround_stops_after_lotsamiss_and_hits_revive_it(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variants: no MMAP_LOTSAMISS check (a window per miss forever: the count would be
    the number of misses); hits not lowering mmap_miss (the window after the hits is missing)."""
    if variant != "kernel":
        breaks(variant, monkeypatch, DeviceReadahead, "small_file",
               *_LOTSAMISS_VARIANTS[variant])
    r = _CountingReader()
    ra = DeviceReadahead(r, 1 << 40)
    with fails_unless_kernel(variant):
        for i in range(MMAP_LOTSAMISS + 50):
            await ra.small_file(_FakeMap((i * 7919 * READAROUND_PAGES + 3) * PAGE_SIZE))
        assert len(r.windows) == MMAP_LOTSAMISS
        off, length = r.windows[0]
        assert off == 0 and length == READAROUND_PAGES * PAGE_SIZE  # aligned window, whole
        # cached files (a neighbour's window served them) bring it back
        r.present.add(5)
        for _ in range(60):
            await ra.small_file(_FakeMap(5 * PAGE_SIZE))
        await ra.small_file(_FakeMap(10**6 * PAGE_SIZE))
        assert len(r.windows) == MMAP_LOTSAMISS + 1


@pytest.mark.parametrize("variant", VARIANTS)
async def test_readaround_skips_cached_pages_large_and_inline_files(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: ``start`` not skipping the cached head of the window (the request
    would begin at the window start and re-read cached pages)."""
    breaks(variant, monkeypatch, DeviceReadahead, "start",
           "while first <= last and r.lookup(first) is not None:", "while False:")
    r = _CountingReader()
    ra = DeviceReadahead(r, 1 << 40)
    r.present.update(range(READAROUND_PAGES, READAROUND_PAGES + 10))
    await ra.small_file(_FakeMap((READAROUND_PAGES + 20) * PAGE_SIZE))
    with fails_unless_kernel(variant):
        assert r.windows == [
            ((READAROUND_PAGES + 10) * PAGE_SIZE, (READAROUND_PAGES - 10) * PAGE_SIZE)]
    if variant != "kernel":
        return
    await ra.small_file(_FakeMap(0, size=10 << 20))  # large: its own readahead serves it
    await ra.small_file(_FakeMap(None))  # inline data / hole
    assert len(r.windows) == 1
    # the device end clips the window
    ra2 = DeviceReadahead(r, 3 * PAGE_SIZE)
    await ra2.small_file(_FakeMap(PAGE_SIZE))
    assert r.windows[-1] == (0, 3 * PAGE_SIZE)


async def test_readers_without_lookup_get_no_readahead() -> None:
    class Plain:
        async def read_dev(self, off: int, length: int) -> bytes:
            raise AssertionError("no readahead expected")

    ra = DeviceReadahead(Plain(), 1 << 30)
    assert not ra.enabled
    await ra.small_file(_FakeMap(0))
    await ra.blocks(range(0, 32), 4096)
    assert ra.cached(12345)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_start_returns_before_the_window_is_read(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One coalesced backend request per window, started and not waited for.

    Broken variant: ``read_dev(..., nowait=False)`` in ``start`` (the call parks until the
    device answers: the fail_after trips)."""
    breaks(variant, monkeypatch, DeviceReadahead, "start", "nowait=True", "nowait=False")
    data = pattern(2 << 20)
    dev = GatedDevice(data)
    cache = PageCache(dev)
    ra = DeviceReadahead(cache, len(data))
    if variant != "kernel":
        with pytest.raises(trio.TooSlowError), trio.fail_after(2):
            await ra.start(3, READAROUND_PAGES - 1)
        dev.release()
        await cache.aclose()
        return
    with trio.fail_after(2):
        await ra.start(3, READAROUND_PAGES - 1)
    await trio.testing.wait_all_tasks_blocked()
    assert dev.reads == [(3 * PAGE_SIZE, (READAROUND_PAGES - 3) * PAGE_SIZE)]
    dev.release()
    before = cache.backend_reads
    off = 10 * PAGE_SIZE
    assert await cache.read_dev(off, 100) == data[off : off + 100]
    assert cache.backend_reads == before
    await cache.aclose()


@pytest.mark.parametrize("variant", VARIANTS)
async def test_windows_stay_within_a_quarter_of_a_small_cache(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64-page cache reads around 16 pages at most, and a 16-page one not at all.

    Broken variant: no clamp (a 256-page window in a 64-page cache: reclaimed before use,
    evicting the pages the reader waits for)."""
    breaks(variant, monkeypatch, DeviceReadahead, "__init__",
           "pages = min(READAROUND_PAGES, quarter, ra_pages)",
           "pages = min(READAROUND_PAGES, ra_pages)")

    class Lru:
        def __init__(self, limit: int) -> None:
            self.limit = limit

    r = _CountingReader()
    r.lru = Lru(64)  # type: ignore[attr-defined]
    ra = DeviceReadahead(r, 1 << 40)
    await ra.small_file(_FakeMap(1000 * PAGE_SIZE))
    await ra.blocks(range(0, 64), PAGE_SIZE)
    with fails_unless_kernel(variant):
        assert r.windows == [(992 * PAGE_SIZE, 16 * PAGE_SIZE), (0, 16 * PAGE_SIZE)]
    r2 = _CountingReader()
    r2.lru = Lru(16)  # type: ignore[attr-defined]
    await DeviceReadahead(r2, 1 << 40).small_file(_FakeMap(1000 * PAGE_SIZE))
    with fails_unless_kernel(variant):
        assert r2.windows == []


@pytest.mark.parametrize("variant", VARIANTS)
async def test_readahead_zero_turns_read_around_off(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o readahead=0`` (a cache whose files get no readahead) reads no neighbours either;
    the window otherwise follows the file readahead size.

    Broken variant: a window fixed at READAROUND_PAGES (the 0 and 32-page caches would both
    read 256 pages)."""
    breaks(variant, monkeypatch, DeviceReadahead, "__init__",
           "pages = min(READAROUND_PAGES, quarter, ra_pages)", "pages = READAROUND_PAGES")

    class Ra:
        def __init__(self, pages: int) -> None:
            self.ra_pages = pages

    for ra_pages, want in ((0, []), (32, [(992 * PAGE_SIZE, 32 * PAGE_SIZE)])):
        r = _CountingReader()
        r.new_readahead = lambda n=ra_pages: Ra(n)  # type: ignore[attr-defined]
        await DeviceReadahead(r, 1 << 40).small_file(_FakeMap(1000 * PAGE_SIZE))
        with fails_unless_kernel(variant):
            assert r.windows == want
        if variant != "kernel":
            return
    dev = MemoryDevice(bytes(1 << 20))
    assert DeviceReadahead(PageCache(dev, readahead_max=0), dev.size).window_pages == 0
