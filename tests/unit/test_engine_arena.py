"""The page arena (``engine.arena.PageArena``) and the page cache's rules for its frames:
frames are distinct, writable, page-aligned 4 KiB slots; a freed frame is reused only after
``quiesce`` (never within the read step that may still hold a view of it); chunks are mapped
ahead on a worker thread; and frames a read may still be writing (``released=False``) are
never given back."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import random
import threading
from typing import Any

import pytest
import trio
import trio.testing

from asyncfs.engine import arena as arena_mod
from asyncfs.engine.arena import FRAME_SIZE, PageArena
from asyncfs.engine.cache import PageCache
from asyncfs.engine.pageio import PageIO
from asyncfs.errors import DeviceIOError
from asyncfs.io.device import IntoCallback
from asyncfs.pagecache import PAGE_SIZE, PG_ERROR, PG_LOCKED, PG_UPTODATE
from asyncfs.testing import MemoryDevice, pattern
from tests.mutants import breaks

DATA = pattern(1 << 20)
VARIANTS = ["kernel", "broken"]


def addr(view: memoryview) -> int:
    """Where a frame lives (its first byte's address)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def broken_free(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken arena: a freed frame is reusable at once (no pending list)."""
    breaks(variant, monkeypatch, PageArena, "free",
           "self._pending.append(pfn)", "self._pending.append(pfn); self.quiesce()")


def span(view: memoryview) -> range:
    """The addresses a frame or block covers."""
    return range(addr(view), addr(view) + len(view))


# -- the frames themselves ------------------------------------------------------------------
def test_frames_and_blocks_are_distinct_writable_aligned() -> None:
    """Ten page frames and two folio blocks over chunks of eight frames in blocks of four:
    each frame is FRAME_SIZE writable bytes at a page-aligned address, each block
    ``block_frames`` contiguous frames at an address aligned to the block within its chunk,
    and a pattern written into each survives writes into all the others (none overlap)."""
    arena = PageArena(8, block_frames=4, ahead=False)
    got = [arena.alloc() for _ in range(10)]  # three blocks split, two frames left free
    blocks = [arena.alloc_block(), arena.alloc_block()]
    assert FRAME_SIZE == PAGE_SIZE
    assert all(b is not None for b in blocks)
    got += [b for b in blocks if b is not None]
    assert arena.chunks == 3 and arena.frames == 20 and arena.maps_inline == 3
    assert arena.free_frames == 2
    assert len({pfn for pfn, _ in got}) == 12
    for i, (pfn, v) in enumerate(got):
        n = 1 if i < 10 else 4
        assert len(v) == n * FRAME_SIZE and v.nbytes == n * FRAME_SIZE and not v.readonly
        assert addr(v) % mmap.PAGESIZE == 0  # what O_DIRECT needs
        assert pfn % n == 0
        v[:] = pattern(len(v), seed=i + 1)
    for i, (_, v) in enumerate(got):
        assert bytes(v) == pattern(len(v), seed=i + 1), i


@pytest.mark.parametrize("variant", VARIANTS)
def test_freed_frame_is_reused_only_after_quiesce(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A freed frame waits on the pending list: the next ``alloc`` takes another one; after
    ``quiesce`` the freed frame is handed out again (and nothing more is carved).

    Broken variant: ``free`` giving the frame back at once (the next alloc of the same step
    gets the frame a reader may still be holding a view of)."""
    broken_free(variant, monkeypatch)
    arena = PageArena(8, block_frames=4, ahead=False)
    a, _ = arena.alloc()
    arena.free(a)
    b, _ = arena.alloc()
    assert (b == a) == (variant == "broken")
    if variant == "broken":
        return
    assert arena.pending_frames == 1 and arena.free_frames == 2 and arena.frames == 4
    arena.quiesce()
    assert arena.pending_frames == 0 and arena.free_frames == 3
    c, _ = arena.alloc()
    assert c == a and arena.frames == 4  # reused, not carved
    arena.quiesce()  # nothing pending: a no-op
    assert arena.free_frames == 2


@pytest.mark.parametrize("variant", ["kernel", "merge-early", "no-slack"])
def test_blocks_split_for_pages_and_merge_back_whole(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two-order buddy allocator, over 3,000 random steps (page frames and folio blocks
    taken and given back, quiesce between): no two live frames or blocks ever overlap, a
    split block comes back whole only once all its frames are free, and the arena never
    holds more than its peak of live and pending frames plus ``slack_frames`` and a block
    (a folio gets no fresh block while split blocks hold that many free frames).

    Broken variants: ``merge-early`` (a split block merges when all but one frame are free:
    a folio then overlaps a live page); ``no-slack`` (a folio always gets a block, carved
    from fresh memory while freed page frames lie stranded: the arena outgrows the bound)."""
    if variant == "merge-early":
        breaks(variant, monkeypatch, PageArena, "quiesce",
               "if k == n:  # every frame", "if k == n - 1:  # every frame")
    elif variant == "no-slack":
        breaks(variant, monkeypatch, PageArena, "alloc_block",
               "elif self._nfree >= self.slack_frames and not force:", "elif False:")
    arena = PageArena(32, block_frames=4, slack_frames=8, ahead=False)
    rng = random.Random(5)
    live: dict[int, tuple[int, memoryview]] = {}  # pfn -> (frames, view)
    pending = peak = 0
    overlap = outgrown = declined = False

    def took(pfn: int, n: int, view: memoryview) -> None:
        nonlocal overlap, peak
        overlap = overlap or pfn in live
        live[pfn] = (n, view)
        peak = max(peak, sum(k for k, _ in live.values()) + pending)

    def give_back(share: float, n: int) -> None:
        nonlocal pending
        mine = [pfn for pfn, (k, _) in live.items() if k == n]
        for pfn in rng.sample(mine, int(len(mine) * share)):
            live.pop(pfn)
            arena.free(pfn, n)
            pending += n

    for _ in range(60):  # a burst of pages, some freed (fragmenting blocks), then folios
        for _ in range(rng.randrange(10, 60)):
            pfn, view = arena.alloc()
            took(pfn, 1, view)
        give_back(rng.random(), 1)
        if rng.random() < 0.7:
            arena.quiesce()
            pending = 0
        for _ in range(rng.randrange(1, 10)):
            got = arena.alloc_block()
            if got is None:
                declined = True
            else:
                took(got[0], 4, got[1])
        give_back(rng.random(), 4)
        arena.quiesce()
        pending = 0
        outgrown = outgrown or arena.frames > peak + arena.slack_frames + 4
        spans = sorted((addr(v), addr(v) + len(v)) for _, v in live.values())
        overlap = overlap or any(a[1] > b[0] for a, b in itertools.pairwise(spans))
    assert declined or variant == "no-slack"  # the slack rule was exercised
    if variant == "merge-early":
        assert overlap  # (its free counts are wrong from then on: growth says nothing)
    else:
        assert (overlap, outgrown) == (False, variant == "no-slack")


def test_no_fresh_block_while_page_frames_are_stranded() -> None:
    """A folio gets no fresh block while ``slack_frames`` page frames lie free in split
    blocks (``force`` gets one anyway: a folio whose block was dropped), and it gets the
    block back whole once all of that block's pages are freed."""
    arena = PageArena(16, block_frames=4, slack_frames=4, ahead=False)
    pfns = [arena.alloc()[0] for _ in range(16)]  # four blocks, split and full
    for pfn in pfns[1::4]:  # one frame of each block
        arena.free(pfn)
    arena.quiesce()
    assert arena.free_frames == 4 and arena.alloc_block() is None
    forced = arena.alloc_block(force=True)
    assert forced is not None and arena.frames == 20
    for pfn in pfns[4:8]:
        if pfn != pfns[5]:
            arena.free(pfn)
    arena.quiesce()
    again = arena.alloc_block()
    assert again is not None and again[0] == pfns[4] and len(again[1]) == 4 * FRAME_SIZE


@pytest.mark.parametrize("variant", VARIANTS)
async def test_next_chunk_is_mapped_ahead_on_a_worker_thread(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past half of the first chunk the arena maps the next one on a worker thread; once it
    has been delivered, running out of the first chunk takes it over: only the first chunk
    was mapped on the trio thread.

    Broken variant: ``_map_ahead`` doing nothing (every chunk is mapped inline:
    ``maps_inline == 2``)."""
    breaks(variant, monkeypatch, PageArena, "_map_ahead",
           "    self._spare_wanted = True\n", "    return\n")
    mapped_on: list[int] = []
    real_map = arena_mod._map_chunk

    def recording_map(nbytes: int) -> Any:
        mapped_on.append(threading.get_ident())
        return real_map(nbytes)

    monkeypatch.setattr(arena_mod, "_map_chunk", recording_map)
    arena = PageArena(16, block_frames=2)
    frames = [arena.alloc()[1] for _ in range(9)]  # the 5th block (of 8) is past the half
    with trio.fail_after(5):
        while arena._spare_wanted and arena._spare is None:
            await trio.sleep(0.001)
    frames += [arena.alloc()[1] for _ in range(7 + 2)]  # the rest, and two of the next chunk
    assert arena.chunks == 2 and arena.frames == 18
    assert len({addr(f) for f in frames}) == 18
    assert arena.maps_inline == (1 if variant == "kernel" else 2)
    if variant == "kernel":
        assert len(mapped_on) == 2 and mapped_on[0] == threading.get_ident()
        assert mapped_on[1] != threading.get_ident()  # the chunk mapped ahead


# -- the engine's rules -------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_frame_freed_within_a_step_is_not_reused_in_it(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-page cache over a device whose probe answers at once: each read of two pages
    completes both in one step, the first page's frame is freed by reclaim while the step
    still holds a view of it, and the second page must not be read into that frame.

    Broken variant: ``PageArena.free`` making the frame reusable at once (immediate reuse
    within a step): the second page's bytes overwrite the first's view, wrong bytes come
    back."""
    broken_free(variant, monkeypatch)
    dev = MemoryDevice(DATA, host_cached=True)
    c = PageCache(dev, cache_bytes=PAGE_SIZE, readahead_max=0)
    ok = True
    carved: list[int] = []
    for k in range(4):
        off = 100 + k * (PAGE_SIZE + PAGE_SIZE // 4)
        got = await c.read_dev(off, 2 * PAGE_SIZE)
        ok = ok and got == DATA[off : off + 2 * PAGE_SIZE]
        carved.append(c.arena.frames)
    assert ok == (variant == "kernel")
    if variant == "kernel":
        assert carved[-1] == carved[0]  # frames freed in one step were reused in the next
        assert c.backend_nowait_reads >= 4  # the probe really served these


class IntoDevice:
    """A device that reads into the cache's frames (``IntoReads``) and completes only when
    the test says so: ``pending`` holds each started read's ``(offset, views, callback)``.
    Its ``read`` (the page-by-page retry path) answers at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pending: list[tuple[int, list[memoryview], IntoCallback]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.data[offset : offset + length]

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    def read_nowait_into(self, offset: int, views: list[memoryview]) -> bool:
        return False

    def submit_read_into(
        self, offset: int, views: list[memoryview], callback: IntoCallback, delay: float = 0.0
    ) -> bool:
        self.pending.append((offset, views, callback))
        return True

    def finish(self) -> None:
        """Complete every pending read with the right bytes."""
        pending, self.pending = self.pending, []
        for offset, views, callback in pending:
            pos = offset
            for v in views:
                v[:] = self.data[pos : pos + len(v)]
                pos += len(v)
            callback(None, True)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("npages", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
async def test_frames_of_a_read_failed_in_flight_are_never_reused(
    variant: str, npages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read fails with ``released=False`` (the backend failed with it still in the kernel):
    its pages lose their frames, so when the kernel writes into those buffers later, no cached
    page changes. One page: the reader gets EIO, the page keeps no frame, and a later read
    gets new frames and the right bytes. Two pages: the page-by-page retry fills new frames.

    Broken variant: ``PageIO._into_done`` without the ``drop_frames`` call (the pages keep the
    frames; the late write of the failed read lands in cached pages)."""
    breaks(variant, monkeypatch, PageIO, "_into_done",
           "self.drop_frames(pages)\n", "pass\n")
    dev = IntoDevice(DATA)
    c = PageCache(dev, cache_bytes=64 * PAGE_SIZE, readahead_max=0)
    off, length = 3 * PAGE_SIZE, npages * PAGE_SIZE
    want = DATA[off : off + length]
    got: list[bytes | Exception] = []

    async def reader() -> None:
        try:
            got.append(await c.read_dev(off, length))
        except DeviceIOError as err:
            got.append(err)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert len(dev.pending) == 1
            _, lost_views, callback = dev.pending.pop()
            assert sum(map(len, lost_views)) == length
            callback(DeviceIOError("x"), False)
        pages = [c.lookup(3 + i) for i in range(npages)]
        assert all(p is not None for p in pages)
        if npages == 1:
            p = pages[0]
            assert p is not None and p.flags & PG_ERROR and not p.flags & PG_UPTODATE
            assert isinstance(got[0], DeviceIOError)
            dropped = not isinstance(p.data, memoryview)
            async with trio.open_nursery() as n:  # read it again: the page is re-read
                n.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert len(dev.pending) == 1
                dev.finish()
        else:
            dropped = True  # the retry gave the pages frames again; the addresses tell
        assert got[-1] == want
    lost = {addr(v) for v in lost_views}
    frames_now = {addr(p.data) for p in pages if p is not None and isinstance(p.data, memoryview)}
    kept_lost_frames = bool(lost & frames_now)
    # The kernel's late write into the failed read's buffers.
    for v in lost_views:
        v[:] = b"\xee" * len(v)
    right_after = await c.read_dev(off, length) == want
    assert (dropped and not kept_lost_frames and right_after) == (variant == "kernel")
    assert c.inflight_io == 0
    await c.aclose()


class ExhaustedArena(PageArena):
    """An arena that cannot map memory while ``exhausted`` (mmap failing with ENOMEM)."""

    exhausted = True

    def alloc(self) -> tuple[int, memoryview]:
        if self.exhausted:
            raise MemoryError("mmap: cannot allocate memory")
        return super().alloc()

    def alloc_block(self, *, force: bool = False) -> tuple[int, memoryview] | None:
        if self.exhausted:
            raise MemoryError("mmap: cannot allocate memory")
        return super().alloc_block(force=force)


@pytest.mark.parametrize(("host_cached", "variant"), [
    (False, "kernel"), (False, "broken"), (True, "kernel"), (True, "broken"),
    (True, "broken-retry"),  # only a synchronous failure (the probe's) can be retried at once
])
def test_no_memory_for_frames_is_eio_not_a_hang(
    variant: str, host_cached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no frame can be had, a read fails with EIO (DeviceIOError), its pages end
    unlocked, nothing stays in flight, and once memory is back the same read returns the
    right bytes; also when the bytes came at once from the host cache (the probe), where the
    failure is synchronous. Broken variants: the arena's failure not caught (the MemoryError
    escapes the read, or kills the I/O task and with it the whole run: hence a trio.run of
    its own); ``_lock_and_retry`` not reporting a retry that failed at once
    (the reader retries forever without a checkpoint: a watchdog on
    ``PageIO.read_pages`` stops it)."""
    if variant == "broken":
        breaks(variant, monkeypatch, PageIO, "frames",
               "except (OSError, MemoryError) as exc:", "except ZeroDivisionError as exc:")
    elif variant == "broken-retry":
        breaks(variant, monkeypatch, PageCache, "_lock_and_retry",
               "raise DeviceIOError(", "str(")
    submits = 0
    real_submit = PageIO.read_pages

    def watchdog(self: PageIO, pages: list[Any]) -> None:
        nonlocal submits
        submits += 1
        if submits > 100:
            raise RuntimeError("the same read was retried 100 times")
        real_submit(self, pages)

    monkeypatch.setattr(PageIO, "read_pages", watchdog)
    arena = ExhaustedArena(chunk_frames=16, ahead=False)
    c = PageCache(MemoryDevice(DATA, host_cached=host_cached), readahead_max=0, arena=arena)
    outcome: list[str] = []

    async def scenario() -> None:
        try:
            with trio.fail_after(5):
                await c.read_dev(5 * PAGE_SIZE + 7, 2 * PAGE_SIZE)
            outcome.append("bytes")
        except DeviceIOError:
            outcome.append("eio")
        except (MemoryError, RuntimeError) as exc:
            outcome.append(type(exc).__name__)
        if outcome == ["eio"]:
            arena.exhausted = False
            got = await c.read_dev(5 * PAGE_SIZE + 7, 2 * PAGE_SIZE)
            outcome.append("right" if got == DATA[5 * PAGE_SIZE + 7 : 7 * PAGE_SIZE + 7]
                           else "wrong")

    try:
        trio.run(scenario)
    except trio.TrioInternalError:
        outcome.append("crashed")
    ok = (outcome == ["eio", "right"] and c.inflight_io == 0
          and not any(p.flags & PG_LOCKED for p in c.lru))
    assert ok == (variant == "kernel"), outcome
