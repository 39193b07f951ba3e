"""FaultyDevice (latency, EIO ranges, stall/release) and the event loop staying free while the
device is slow."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from asyncfs.errors import DeviceIOError, UsageError
from asyncfs.io import open_image
from asyncfs.io import uring as uring_mod
from asyncfs.io.uring import UringDevice
from asyncfs.testing import FaultyDevice, parse_latency
from tests.mutants import breaks

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(11).randbytes(SIZE)
    path = tmp_path / "img"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("variant", ["kernel", "overlap_with_le"])
async def test_eio_ranges_fail_only_touching_reads(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: an overlap test with <= instead of < (a read ending exactly at the range
    start fails too)."""
    breaks(variant, monkeypatch, FaultyDevice, "_touches_eio",
           "offset < e and s < end", "offset <= e and s <= end")
    path, data = image
    dev = FaultyDevice(await open_image(path), eio_ranges=[(8192, 8193)])
    try:
        before = bytes(await dev.read(0, 8192)) == data[:8192]  # ends right before the bad byte
    except DeviceIOError:
        before = False
    assert before == (variant == "kernel")
    if variant != "kernel":
        await dev.aclose()
        return
    assert bytes(await dev.read(8193, 100)) == data[8193:8293]
    for off, length in [(8192, 1), (4096, 8192), (0, SIZE)]:
        with pytest.raises(DeviceIOError, match="EIO"):
            await dev.read(off, length)
    dev.add_eio_range(0, 10)
    with pytest.raises(DeviceIOError):
        await dev.read(5, 1)
    dev.clear_eio_ranges()
    assert bytes(await dev.read(8000, 400)) == data[8000:8400]
    await dev.aclose()


async def test_stall_holds_reads_until_release(image: tuple[Path, bytes]) -> None:
    path, data = image
    dev = FaultyDevice(await open_image(path))
    dev.stall()
    done: list[int] = []

    async def reader(i: int) -> None:
        assert bytes(await dev.read(i * 100, 100)) == data[i * 100 : i * 100 + 100]
        done.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(reader, i)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [] and dev.stalled_readers == 5
        assert dev.read_nowait(0, 100) is None
        dev.release()
    assert sorted(done) == [0, 1, 2, 3, 4]
    await dev.aclose()


async def test_latency_is_applied(image: tuple[Path, bytes]) -> None:
    path, _ = image
    dev = FaultyDevice(await open_image(path), latency_ms=30, latency_jitter_ms=10, seed=1)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(dev.read, i * 4096, 4096)
    elapsed = trio.current_time() - t0
    assert 0.030 <= elapsed < 0.5  # concurrent: the delays overlap
    await dev.aclose()


def test_parse_latency() -> None:
    assert parse_latency("5") == (5.0, 0.0)
    assert parse_latency("2-10") == (2.0, 8.0)
    for bad in ("x", "-1", "5-2"):
        with pytest.raises(UsageError):
            parse_latency(bad)


class StepTimer(trio.abc.Instrument):
    """Longest single task step (a blocking call on the trio thread shows up here)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._t: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._t is not None:  # the step that added the instrument had no "before"
            self.longest = max(self.longest, time.perf_counter() - self._t)
        self._t = None


@pytest.mark.parametrize(("variant", "backend"), [
    ("kernel", "uring"), ("kernel", "threads"), ("time_sleep", "threads")])
async def test_event_loop_not_blocked_while_device_slow(
    image: tuple[Path, bytes], variant: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 32 reads wait 300 ms each on a slow device, a ticker keeps ticking every few ms
    and no task step takes long. The bounds leave room for a busy shared machine (other
    processes preempting this one) yet sit well below one blocked read.
    Broken variant: latency by time.sleep (or a blocking pread on the trio thread): the ticker
    stops and the longest step is >= 300 ms (built with 4 reads, not 32: 1.2 s blocked)."""
    breaks(variant, monkeypatch, FaultyDevice, "read", "await trio.sleep(delay / 1000)",
           '__import__("time").sleep(delay / 1000)')
    reads = 32 if variant == "kernel" else 4
    path, data = image
    dev = FaultyDevice(await open_image(path, backend=backend),  # type: ignore[arg-type]
                       latency_ms=300)
    timer = StepTimer()
    trio.lowlevel.add_instrument(timer)
    gaps: list[float] = []
    try:
        async with trio.open_nursery() as nursery:

            async def ticker() -> None:
                last = time.perf_counter()
                while True:
                    await trio.sleep(0.002)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            nursery.start_soon(ticker)
            async with trio.open_nursery() as readers:
                for i in range(reads):
                    readers.start_soon(dev.read, i * 8192, 8192)
            assert bytes(await dev.read(4096, 10)) == data[4096:4106]
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(timer)
    free = max(gaps, default=1.0) < 0.2 and timer.longest < 0.15
    assert free == (variant == "kernel"), (max(gaps, default=1.0), timer.longest)
    if variant == "kernel":
        assert len(gaps) > 30  # ~600 ms of reads at a 2 ms tick
    await dev.aclose()


@pytest.mark.parametrize(("variant", "backend"), [
    ("kernel", "uring"), ("kernel", "threads"), ("no_latency", "uring")])
async def test_latency_of_callback_reads_is_waited_in_the_ring(
    image: tuple[Path, bytes], variant: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over io_uring, reads complete by callback after their latency, which a timeout linked
    ahead of each read holds in the kernel: each waits at least the latency, they overlap (32
    reads of 30 ms take far less than 32 x 30 ms), the bytes are right, and each callback
    comes once. Broken variant: ``submit_read_after(0.0, ...)`` (no latency). Over the
    threads backend the latency is waited out by the pool, not the ring."""
    breaks(variant, monkeypatch, FaultyDevice, "submit_read",
           "self._inner_submit_after(delay, offset, length, callback)",
           "self._inner_submit_after(0.0, offset, length, callback)")
    path, data = image
    dev = FaultyDevice(await open_image(path, backend=backend),  # type: ignore[arg-type]
                       latency_ms=30)
    done: dict[int, tuple[float, bytes | None, DeviceIOError | None]] = {}
    t0 = trio.current_time()
    for i in range(32):
        def cb(buf: memoryview | None, err: DeviceIOError | None, i: int = i) -> None:
            assert i not in done
            done[i] = (trio.current_time(), bytes(buf) if buf is not None else None, err)
        assert dev.submit_read(i * 4096, 4096, cb)
    with trio.fail_after(5):
        while len(done) < 32:
            await trio.sleep(0.005)
    for i, (_, got, err) in done.items():
        assert err is None and got == data[i * 4096 : (i + 1) * 4096]
    waited = all(t - t0 >= 0.030 - 1e-3 for t, _, _ in done.values())
    assert waited == (variant == "kernel")
    assert max(t for t, _, _ in done.values()) - t0 < 16 * 0.030
    assert dev.reads == 32
    await dev.aclose()


@pytest.mark.parametrize(("variant", "backend"), [
    ("kernel", "uring"), ("kernel", "threads"), ("delays_kept", "uring")])
async def test_delayed_reads_fail_at_once_on_close(
    image: tuple[Path, bytes], variant: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads still waiting out their latency when the device closes get an error, once, and
    the close does not wait for their latency. Broken variant: ``aclose`` not cancelling the
    ring's delays (the close waits out the drain limit, here 1 s, then fails them)."""
    breaks(variant, monkeypatch, UringDevice, "aclose", "self._cancel_delays()", "pass")
    monkeypatch.setattr(uring_mod, "_DRAIN_SECONDS", 1.0)
    path, _ = image
    dev = FaultyDevice(await open_image(path, backend=backend),  # type: ignore[arg-type]
                       latency_ms=10_000)
    errors: list[DeviceIOError | None] = []
    for i in range(4):
        assert dev.submit_read(i * 4096, 4096, lambda buf, err: errors.append(err))
    await trio.sleep(0.01)
    t0 = trio.current_time()
    with trio.fail_after(5):
        await dev.aclose()
    assert len(errors) == 4 and all(isinstance(e, DeviceIOError) for e in errors)
    assert (trio.current_time() - t0 < 0.5) == (variant == "kernel")


@pytest.mark.parametrize("backend", ["uring", "threads"])
async def test_stall_and_eio_keep_the_read_path(image: tuple[Path, bytes],
                                                backend: str) -> None:
    """While stalled, or with an EIO range set, ``submit_read`` declines (the page cache then
    uses ``read``, whose stall and EIO behaviour the tests above pin down)."""
    path, _ = image
    dev = FaultyDevice(await open_image(path, backend=backend),  # type: ignore[arg-type]
                       latency_ms=1)
    dev.stall()
    assert not dev.submit_read(0, 4096, lambda buf, err: None)
    dev.release()
    dev.add_eio_range(0, 1)
    assert not dev.submit_read(8192, 4096, lambda buf, err: None)
    await dev.aclose()
