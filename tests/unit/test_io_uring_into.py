"""Reads straight into the caller's buffers (``IntoReads``) on the real io_uring backend and
real files: ``submit_read_into`` fills page frames with exactly what ``os.pread`` reads, or
declines where O_DIRECT cannot read into them; ``skip_views`` resumes a short read; ``_fail_all``
tells the caller its buffers may still be written; ``read_nowait_into`` fills them only from
the host cache; ``FaultyDevice`` forwards all this with its latency, stall and EIO ranges."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from asyncfs.engine.arena import FRAME_SIZE, PageArena
from asyncfs.errors import DeviceIOError
from asyncfs.io import DIRECT_MIN, ThreadDevice, UringDevice, open_image
from asyncfs.io import uring as uring_mod
from asyncfs.io.filedev import FileDeviceBase
from asyncfs.testing import FaultyDevice
from bench.image import uncache_file
from tests.mutants import breaks, holds
from tests.unit import test_io_backend
from tests.unit.test_io_backend import IMAGE_SIZE, WINDOW

PAGE = FRAME_SIZE
image = test_io_backend.image  # the same module-scoped image file fixture
JUNK = 0xA5

# the (error, released) of each call of an into-read's callback
Calls = list[tuple[DeviceIOError | None, bool]]



def frames(arena: PageArena, n: int) -> list[memoryview]:
    """``n`` arena frames holding junk (a read that does not fill them shows)."""
    views = [arena.alloc()[1] for _ in range(n)]
    for v in views:
        v[:] = bytes([JUNK]) * PAGE
    return views


def recorder(calls: Calls) -> Callable[[DeviceIOError | None, bool], None]:
    def callback(err: DeviceIOError | None, released: bool) -> None:
        calls.append((err, released))

    return callback


async def wait_until(cond: Callable[[], bool], timeout: float = 10) -> None:
    """Let scheduler passes run (the device's instrument submits and reaps in them)."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.001)


async def open_uring(path: Path, direct: bool | None,
                     window: tuple[int, int] | None = None) -> UringDevice:
    dev = await open_image(path, backend="uring", direct=direct,
                           offset=window[0] if window else None,
                           sizelimit=window[1] if window else None)
    assert isinstance(dev, UringDevice)
    return dev


# -- submit_read_into -------------------------------------------------------------------------
_INTO_SPAN_BROKEN = {
    "no_alignment_check": (
        "if direct and (pos % ALIGN or any(len(v) % ALIGN for v in views)):", "if False:"),
    "device_offset": ("pos = self._base + offset", "pos = offset"),
}


@pytest.mark.parametrize(("variant", "backend", "direct", "window"), [
    *[("kernel", b, d, w) for b in ["uring", "threads"] for d in [True, False, None]
      for w in [None, WINDOW]],
    ("no_alignment_check", "uring", True, WINDOW), ("device_offset", "uring", False, WINDOW),
], ids=str)
async def test_reads_into_frames_equal_pread(
    image: tuple[Path, bytes], direct: bool | None, window: tuple[int, int] | None,
    backend: str, variant: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many reads of random page-multiple ranges into arena frames, all in flight at once:
    each one started fills its frames with the bytes ``os.pread`` reads there and calls back
    exactly once with ``(None, True)``; a read is declined (``False``, nothing called back)
    exactly when it goes O_DIRECT (``direct``, or a hybrid read of ``DIRECT_MIN`` bytes or
    more) at a file position off the 4 KiB alignment (a partition at byte 511).
    Broken variants (seen to fail): ``_into_span`` without the alignment check (the kernel
    fails the read with EINVAL); ``_into_span`` answering the device offset instead of the
    file position (a window reads the wrong bytes)."""
    if variant != "kernel":
        breaks(variant, monkeypatch, FileDeviceBase, "_into_span", *_INTO_SPAN_BROKEN[variant])
    path, data = image
    base, size = window if window else (0, IMAGE_SIZE)
    dev = await open_image(path, backend=backend, direct=direct,  # type: ignore[arg-type]
                           offset=window[0] if window else None,
                           sizelimit=window[1] if window else None)
    assert isinstance(dev, UringDevice | ThreadDevice)
    assert dev.size == size and dev.hybrid is (direct is None)
    rng = random.Random(f"{direct}-{window}")
    arena = PageArena(256, ahead=False)
    npages = [1, 64, *(rng.choice([1, 2, 3, 8, 16, 31, 32, 33, 64]) for _ in range(22))]
    reads: list[tuple[int, list[memoryview]]] = []
    for i, n in enumerate(npages):
        off = rng.randrange(size // PAGE - n) * PAGE
        if i % 5 == 4:
            off += 512  # a device offset off the alignment too
        reads.append((off, frames(arena, n)))
    calls: list[Calls] = [[] for _ in reads]
    started: list[bool] = []
    try:
        for (off, views), c in zip(reads, calls, strict=True):
            started.append(dev.submit_read_into(off, views, recorder(c)))
        assert dev.in_flight == sum(started)  # all submitted before any completes
        await wait_until(lambda: not dev.in_flight)
        await trio.sleep(0.01)  # (a second callback would come in these passes)
    finally:
        await dev.aclose()

    def check() -> None:
        for (off, views), ok, c in zip(reads, started, calls, strict=True):
            length = len(views) * PAGE
            odirect = direct is True or (direct is None and length >= DIRECT_MIN)
            if not ok:
                assert c == [] and all(v[0] == JUNK for v in views)
                assert odirect and (base + off) % PAGE != 0, (off, length)
                continue
            assert c == [(None, True)], (off, length, c)
            got = b"".join(bytes(v) for v in views)
            assert got == data[base + off : base + off + length], (off, length)
            assert not (odirect and (base + off) % PAGE != 0), (off, length)
        if window and direct is not False:
            assert not all(started)  # the window's O_DIRECT reads were declined
        assert any(started) or (window and direct is True)

    assert holds(check) == (variant == "kernel")


@pytest.mark.parametrize("backend", ["uring", "threads"])
async def test_into_read_past_the_end_or_closed_raises(image: tuple[Path, bytes],
                                                       backend: str) -> None:
    """As ``read``: a range past the device's end, or a closed device, raises
    ``DeviceIOError``; an empty read starts nothing."""
    path, _ = image
    dev = await open_image(path, backend=backend, direct=False)  # type: ignore[arg-type]
    assert isinstance(dev, UringDevice | ThreadDevice)
    arena = PageArena(16, ahead=False)
    views = frames(arena, 2)
    calls: Calls = []
    with pytest.raises(DeviceIOError, match="past the end"):
        dev.submit_read_into(IMAGE_SIZE - PAGE, views, recorder(calls))
    assert dev.submit_read_into(0, [], recorder(calls)) is False
    await dev.aclose()
    with pytest.raises(DeviceIOError, match="closed"):
        dev.submit_read_into(0, views, recorder(calls))
    assert calls == []


# -- skip_views -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["kernel", "broken"])
def test_skip_drops_exactly_the_bytes_read(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``_skip(views, n)`` (what a short read's rest is resubmitted into) is the views without
    their first ``n`` bytes: no empty views, the same memory (not copies), for splits at,
    inside and across view boundaries.
    Broken variant: ``skip_views`` returning the views unchanged (the rest of a short read lands at
    the start of the buffers again)."""
    breaks(variant, monkeypatch, uring_mod, "skip_views", "    out = []\n",
           "    return views\n    out = []\n")
    bufs = [bytearray(random.Random(i).randbytes(n)) for i, n in enumerate([4096, 4096, 100])]
    whole = b"".join(bufs)
    views = [memoryview(b) for b in bufs]
    right = True
    for n in [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 8291, 8292]:
        rest = uring_mod.skip_views(views, n)
        right = right and b"".join(bytes(v) for v in rest) == whole[n:]
        right = right and all(len(v) for v in rest)
        if rest:  # a view of the caller's buffer, where the kernel must write
            rest[0][0] ^= 0xFF
            right = right and whole[n] ^ 0xFF == b"".join(bufs)[n]
            rest[0][0] ^= 0xFF
    assert right == (variant == "kernel")


# -- _fail_all ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_fail_all_reports_into_reads_unreleased_once(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend fails with an into-read still in the kernel (held there by a 0.5 s delay):
    its callback gets ``(DeviceIOError, False)`` at once: the buffers are not released, and
    indeed the kernel writes them afterwards; the CQE that arrives later calls nothing.
    Broken variant: ``_fail_all`` passing ``released=True`` (the caller would reuse buffers
    the kernel is about to write)."""
    breaks(variant, monkeypatch, UringDevice, "_fail_all",
           "call_completion(into, DeviceIOError(why), False)",
           "call_completion(into, DeviceIOError(why), True)")
    path, data = image
    dev = await open_uring(path, True)
    arena = PageArena(16, ahead=False)
    views = frames(arena, 2)
    calls: Calls = []
    try:
        assert dev.submit_read_into(8 * PAGE, views, recorder(calls), delay=0.5)
        await trio.sleep(0.01)  # submitted: the read now waits in the kernel
        assert dev.in_flight == 1 and calls == []
        dev._fail_all("backend broke")
        assert len(calls) == 1 and isinstance(calls[0][0], DeviceIOError)
        released = calls[0][1]
        await wait_until(lambda: not dev.in_flight)  # the CQE came, much later
        await trio.sleep(0.01)
        assert len(calls) == 1
        # What ``released=False`` warned about: the kernel wrote the buffers after the call.
        assert b"".join(bytes(v) for v in views) == data[8 * PAGE : 10 * PAGE]
    finally:
        await dev.aclose()
    assert (released is False) == (variant == "kernel")


COLD_OFFSETS = (1 << 20, (1 << 20) + (256 << 10), (1 << 20) + (512 << 10))


# -- read_nowait_into --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["uring", "threads"])
@pytest.mark.parametrize("variant", ["kernel", "blocking-probe", "probes-direct"])
async def test_read_nowait_into_fills_only_from_the_host_cache(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A buffered device's probe fills the views when the host caches the range, and answers
    False for a cold one; an O_DIRECT device, and a hybrid device's ``DIRECT_MIN``-sized
    range, answer False even when the host caches it (those reads bypass the host cache).
    Broken variants: a probe without ``RWF_NOWAIT`` (the cold range is read, blocking the trio
    thread); ``_may_probe`` without the O_DIRECT route check (direct ranges are probed)."""
    if variant == "blocking-probe":
        breaks(variant, monkeypatch, FileDeviceBase, "_probe",
               "self._base + offset, os.RWF_NOWAIT)", "self._base + offset, 0)")
    elif variant == "probes-direct":
        breaks(variant, monkeypatch, FileDeviceBase, "_may_probe",
               "if self._route(length)[1] or self._closed", "if self._closed")
    path = tmp_path / "img"
    data = random.Random(8).randbytes(2 << 20)
    path.write_bytes(data)
    uncache_file(path)
    arena = PageArena(256, ahead=False)
    small = (1 << 20, 2 * PAGE)
    big = (0, DIRECT_MIN)
    seen: dict[str, bool] = {}

    def probe(dev: FileDeviceBase, off: int, length: int) -> bool:
        views = frames(arena, length // PAGE)
        ok = dev.read_nowait_into(off, views)
        if ok:
            assert b"".join(bytes(v) for v in views) == data[off : off + length]
        return ok

    async def opened(direct: bool | None) -> UringDevice | ThreadDevice:
        dev = await open_image(path, backend=backend, direct=direct)  # type: ignore[arg-type]
        assert isinstance(dev, UringDevice | ThreadDevice)
        return dev

    buffered = await opened(False)
    hybrid = await opened(None)
    direct = await opened(True)
    try:
        # A probe that misses starts the kernel's read of the page, and on a fast disk that
        # read can finish before the probe looks again (about 1 probe in 1,500 here), so a
        # cold range counts as served only if three separate ones all are.
        seen["cold"] = all([probe(buffered, off, 2 * PAGE) for off in COLD_OFFSETS])
        path.read_bytes()  # now the host caches every page
        seen["cached"] = probe(buffered, *small)
        seen["cached, hybrid small"] = probe(hybrid, *small)
        seen["cached, hybrid big"] = probe(hybrid, *big)
        seen["cached, direct"] = probe(direct, *small)
    finally:
        for dev in (buffered, hybrid, direct):
            await dev.aclose()
    kernel = {"cold": False, "cached": True, "cached, hybrid small": True,
              "cached, hybrid big": False, "cached, direct": False}
    assert (seen == kernel) == (variant == "kernel"), seen


# -- FaultyDevice ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["uring", "threads"])
@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_faulty_into_read_waits_out_the_latency(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """``FaultyDevice.submit_read_into`` passes its latency on as the read's delay: the read
    completes (right) no sooner than the latency after it was submitted.
    Broken variant: forwarding only the caller's ``delay`` (the read completes at once)."""
    breaks(variant, monkeypatch, FaultyDevice, "submit_read_into",
           "callback, delay + self._delay())", "callback, delay)")
    path, data = image
    dev = FaultyDevice(await open_image(path, backend=backend, direct=False),  # type: ignore[arg-type]
                       latency_ms=200)
    arena = PageArena(16, ahead=False)
    views = frames(arena, 3)
    calls: Calls = []
    at: list[float] = []

    def callback(err: DeviceIOError | None, released: bool) -> None:
        at.append(trio.current_time())
        calls.append((err, released))

    try:
        t0 = trio.current_time()
        assert dev.submit_read_into(5 * PAGE, views, callback)
        assert dev.reads == 1
        await wait_until(lambda: bool(calls))
    finally:
        await dev.aclose()
    assert calls == [(None, True)]
    assert b"".join(bytes(v) for v in views) == data[5 * PAGE : 8 * PAGE]
    assert (at[0] - t0 >= 0.195) == (variant == "kernel"), at[0] - t0


@pytest.mark.parametrize("backend", ["uring", "threads"])
@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_faulty_into_read_declines_while_stalled_or_failing(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """While stalled, or while any EIO range is set, ``FaultyDevice`` starts no into-read and
    probes nothing (the caller then takes the plain ``read`` path, which honours both); after
    ``release`` / ``clear_eio_ranges`` it forwards again.
    Broken variant: ``_may_submit`` checking only that the device is open (a stalled device
    still completes reads; an injected EIO is skipped)."""
    breaks(variant, monkeypatch, FaultyDevice, "_may_submit",
           "return not (self._closed or self.is_stalled or self._eio)",
           "return not self._closed")
    path, data = image
    dev = FaultyDevice(await open_image(path, backend=backend, direct=False))  # type: ignore[arg-type]
    inner = dev.inner
    assert isinstance(inner, UringDevice | ThreadDevice)
    arena = PageArena(16, ahead=False)
    calls: Calls = []
    answers: list[bool] = []
    try:
        assert dev.submit_read_into(0, frames(arena, 1), recorder(calls))
        await wait_until(lambda: len(calls) == 1)  # (the page is in the host cache now)
        dev.stall()
        answers.append(dev.submit_read_into(PAGE, frames(arena, 1), recorder(calls)))
        answers.append(dev.read_nowait_into(0, frames(arena, 1)))
        dev.release()
        dev.add_eio_range(IMAGE_SIZE - 1, IMAGE_SIZE)  # any range, even one far away
        answers.append(dev.submit_read_into(PAGE, frames(arena, 1), recorder(calls)))
        dev.clear_eio_ranges()
        await wait_until(lambda: not inner.in_flight)
        reads_while_faulty = dev.reads - 1
        views = frames(arena, 2)
        assert dev.submit_read_into(2 * PAGE, views, recorder(calls))
        await wait_until(lambda: not inner.in_flight)
        assert b"".join(bytes(v) for v in views) == data[2 * PAGE : 4 * PAGE]
        assert dev.read_nowait_into(0, views)  # released, no EIO range: the probe works
    finally:
        await dev.aclose()
    declined = answers == [False, False, False] and reads_while_faulty == 0
    assert declined == (variant == "kernel"), answers
