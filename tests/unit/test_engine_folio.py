"""Folios: a file readahead window reads each aligned ``FOLIO_PAGES`` group it covers whole
as one Page (one lock, one wake, one reclaim), while random reads keep 4 KiB pages; every
read still returns exactly the device's bytes, and a failed folio read fails only the pages
that really fail."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from asyncfs.engine.arena import FOLIO_PAGES
from asyncfs.engine.cache import PageCache
from asyncfs.engine.pageio import PageIO
from asyncfs.engine.readahead import WindowReader
from asyncfs.errors import DeviceIOError
from asyncfs.pagecache import PAGE_SIZE
from asyncfs.testing import MemoryDevice, contiguous_file, pattern
from tests.mutants import breaks

FOLIO = FOLIO_PAGES * PAGE_SIZE  # bytes
DATA = pattern(32 * FOLIO)
VARIANTS = ["kernel", "broken"]


async def _stream(c: PageCache, size: int, req: int = 2 * FOLIO) -> bytes:
    f = contiguous_file(size)
    ra = c.new_readahead()
    out = []
    for off in range(0, size, req):
        out.append(bytes(await c.read_file(f, ra, off, req)))
    return b"".join(out)


@pytest.mark.parametrize("variant", ["kernel", "no_folios", "folio_base"])
async def test_stream_caches_folios_and_every_read_is_exact(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream through file readahead is cached mostly in folios (few Page objects for its
    pages); then reads at random offsets and lengths, through ``read_dev`` and ``read_file``,
    starting and ending anywhere inside folios, return exactly the device's bytes.

    Broken variants: ``no_folios`` (the window never makes a folio: the stream costs one Page
    per 4 KiB); ``folio_base`` (a read that starts inside a folio slices its frame from the
    page it starts in, not from the folio's first page)."""
    if variant == "no_folios":
        breaks(variant, monkeypatch, WindowReader, "_folio_block",
               "if (nr > 1 and", "if (nr < 1 and")
    elif variant == "folio_base":
        breaks(variant, monkeypatch, PageCache, "_copy_uptodate",
               "base = p.index << PAGE_SHIFT", "base = idx << PAGE_SHIFT")
    c = PageCache(MemoryDevice(DATA), cache_bytes=len(DATA), readahead_max=8 * FOLIO)
    streamed = await _stream(c, len(DATA))
    npages = len(DATA) // PAGE_SIZE
    objects = sum(1 for _ in c.lru)
    folios = sum(1 for p in c.lru if p.nr == FOLIO_PAGES)
    rng = random.Random(11)
    f = contiguous_file(len(DATA))
    exact = streamed == DATA
    for _ in range(300):
        off = rng.randrange(len(DATA))
        n = rng.choice([1, 100, PAGE_SIZE - 1, PAGE_SIZE, 3 * PAGE_SIZE + 17, 70_000, 300_000])
        want = DATA[off : off + n]
        exact = exact and await c.read_dev(off, len(want)) == want
        exact = exact and bytes(await c.read_file(f, None, off, n)) == want
    assert all(c.lookup(i) is not None for i in range(npages))  # the stream cached all
    mostly_folios = folios * FOLIO_PAGES >= npages // 2 and objects < npages // 2
    assert (mostly_folios, exact) == {
        "kernel": (True, True), "no_folios": (False, True),
        "folio_base": (True, False),
    }[variant], (folios, objects)


async def test_random_reads_and_metadata_keep_small_pages() -> None:
    """Reads without file readahead (random reads, ``read_dev``: metadata and the volume's
    readaround) never make a folio, so a small read caches no more than its pages."""
    c = PageCache(MemoryDevice(DATA), readahead_max=8 * FOLIO)
    f = contiguous_file(len(DATA))
    rng = random.Random(3)
    for _ in range(100):
        off = rng.randrange(0, len(DATA) - PAGE_SIZE)
        assert bytes(await c.read_file(f, None, off, 100)) == DATA[off : off + 100]
        assert await c.read_dev(off, 2 * PAGE_SIZE) == DATA[off : off + 2 * PAGE_SIZE]
    assert c.folios_created == 0
    assert all(p.nr == 1 for p in c.lru)


class BadPageDevice(MemoryDevice):
    """Reads touching device page ``bad`` fail; every read takes ``delay`` seconds."""

    def __init__(self, data: bytes, bad: int, delay: float) -> None:
        super().__init__(data, delay=delay)
        self.bad = bad

    async def read(self, offset: int, length: int) -> bytes:
        got = await super().read(offset, length)
        if offset <= self.bad * PAGE_SIZE < offset + length:
            raise DeviceIOError(f"bad sector in page {self.bad}")
        return got


@pytest.mark.parametrize("variant", VARIANTS)
async def test_failed_folio_read_fails_only_its_bad_page(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's window fails on one bad page inside a folio. A reader parked on a good
    page of that same folio gets its bytes; the stream's request and later reads of the bad
    page get EIO; every other page of the folio reads back exactly.

    Broken variant: ``PageIO._retry_folio`` completing the folio with ERROR after its re-read fails
    (no split): the parked reader of the good page gets EIO."""
    if variant == "broken":
        breaks(variant, monkeypatch, PageIO, "_retry_folio",
               "if not eio or self.closed:", "if True:")
    bad = FOLIO_PAGES + 4  # inside the second folio of the first window
    good = FOLIO_PAGES + 8
    c = PageCache(BadPageDevice(DATA, bad, delay=0.01), cache_bytes=len(DATA),
                  readahead_max=4 * FOLIO)
    f = contiguous_file(len(DATA))
    res: dict[str, bytes | str] = {}

    async def rd(name: str, off: int, n: int, ra: object | None) -> None:
        try:
            res[name] = bytes(await c.read_file(f, ra, off, n))
        except DeviceIOError:
            res[name] = "EIO"

    async with trio.open_nursery() as n:
        n.start_soon(rd, "stream", 0, 2 * FOLIO, c.new_readahead())
        await trio.testing.wait_all_tasks_blocked()
        folio = c.lookup(good)
        assert folio is not None and folio.nr == FOLIO_PAGES and folio.index <= bad
        n.start_soon(rd, "good", good * PAGE_SIZE, PAGE_SIZE, None)
        await trio.testing.wait_all_tasks_blocked()
        assert c.stats()["parked_now"] == 2
    assert res["stream"] == "EIO"
    assert (res["good"] == DATA[good * PAGE_SIZE : (good + 1) * PAGE_SIZE]) == (
        variant == "kernel")
    if variant == "kernel":
        with pytest.raises(DeviceIOError):
            await c.read_dev(bad * PAGE_SIZE, 10)
        first = folio.index * PAGE_SIZE
        for i in range(FOLIO_PAGES):
            off = first + i * PAGE_SIZE
            if off // PAGE_SIZE != bad:
                assert await c.read_dev(off, PAGE_SIZE) == DATA[off : off + PAGE_SIZE]
    assert c.stats()["parked_now"] == 0 and c.inflight_io == 0
