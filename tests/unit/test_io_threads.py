"""The threads backend (``ThreadDevice``) on real files: its worker pool reads exactly what
``os.pread`` reads through every path (``read``, ``submit_read``, ``submit_read_into``), resumes
short reads, reports kernel errors to their reader only, waits out injected latency without a
worker or the trio thread, and closes safely with reads in flight: each callback once, the
``released`` flag true only when no worker can still write the buffers, the descriptors open
while a worker uses them. The page cache over it is checked as over the io_uring backend
(``test_engine_uring.py``).

Invariant tests run against the real code and against a deliberately broken variant named in
their docstring (``tests.mutants.breaks``: the source with one rule removed), which must fail
them.
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from asyncfs.engine.arena import FRAME_SIZE, PageArena
from asyncfs.engine.cache import PageCache
from asyncfs.errors import DeviceIOError, WouldBlockError
from asyncfs.io import DIRECT_MIN, ThreadDevice, open_image
from asyncfs.io import threads as threads_mod
from asyncfs.pagecache.page import PAGE_SIZE, PG_ERROR, PG_LOCKED, PG_UPTODATE
from asyncfs.testing import FaultyDevice
from bench.image import uncache_file
from tests.mutants import breaks
from tests.unit.counting import count_callback_reads

PAGE = FRAME_SIZE
SIZE = 3 * (1 << 20) + 777  # odd: the last O_DIRECT read is short
WINDOW = (511, SIZE - 511 - 4099)  # a partition starting and ending off any alignment
JUNK = 0xA5
VARIANTS = ["kernel", "broken"]
MODES = {"odirect": True, "buffered": False, "hybrid": None}

Calls = list[tuple[DeviceIOError | None, bool]]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("threads") / "data.img"
    data = random.Random(17).randbytes(SIZE)
    path.write_bytes(data)
    return path, data


async def open_threads(path: Path, direct: bool | None = False, threads: int = 16,
                       window: tuple[int, int] | None = None) -> ThreadDevice:
    dev = await open_image(path, backend="threads", direct=direct, threads=threads,
                           offset=window[0] if window else None,
                           sizelimit=window[1] if window else None)
    assert isinstance(dev, ThreadDevice)
    return dev


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
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.001)


class Gate:
    """Holds every worker's ``preadv`` (the module's ``_pread``) until ``open``: reads stay in
    flight, inside a worker, for as long as a test needs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.event = threading.Event()
        self.entered = 0
        self.finished = 0
        real = threads_mod._pread

        def gated(op: Any) -> str | None:
            self.entered += 1
            self.event.wait(30)
            try:
                return real(op)
            finally:
                self.finished += 1

        monkeypatch.setattr(threads_mod, "_pread", gated)

    def open(self) -> None:
        self.event.set()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- bytes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("window", [None, WINDOW], ids=["whole", "window"])
async def test_callback_and_task_reads_equal_pread(
    image: tuple[Path, bytes], mode: str, window: tuple[int, int] | None
) -> None:
    """Many reads of random ranges (unaligned offsets and lengths, up to the device's end),
    all in flight at once through ``submit_read`` and ``read``: each equals ``os.pread`` of
    the file there, and each callback comes once with a view of exactly the asked length.
    (``submit_read_into``: ``test_io_uring_into.test_reads_into_frames_equal_pread``.)"""
    path, data = image
    base, size = window if window else (0, SIZE)
    dev = await open_threads(path, MODES[mode], window=window)
    rng = random.Random(f"{mode}-{window}")
    ranges = [(rng.randrange(size), rng.choice([1, 100, 4096, 5000, 65536, 300_000]))
              for _ in range(40)]
    ranges = [(o, min(n, size - o)) for o, n in ranges] + [(size - 4097, 4097), (0, size)]
    seen: dict[int, list[bytes | DeviceIOError | None]] = {i: [] for i in range(len(ranges))}
    by_task: dict[int, bytes] = {}

    async def task_read(i: int, off: int, n: int) -> None:
        by_task[i] = bytes(await dev.read(off, n))

    try:
        async with trio.open_nursery() as nursery:
            for i, (off, n) in enumerate(ranges):
                def cb(view: memoryview | None, err: DeviceIOError | None, i: int = i) -> None:
                    seen[i].append(bytes(view) if view is not None else err)

                assert dev.submit_read(off, n, cb)
                nursery.start_soon(task_read, i, off, n)
        await wait_until(lambda: not dev.in_flight)
        await trio.sleep(0.01)  # (a second callback would come in these passes)
    finally:
        await dev.aclose()
    for i, (off, n) in enumerate(ranges):
        want = data[base + off : base + off + n]
        assert seen[i] == [want], (off, n)
        assert by_task[i] == want, (off, n)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_short_reads_resume_where_they_stopped(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that returns at most 1000 bytes a call (one page with O_DIRECT), and EAGAIN
    now and then: every read
    (into frames, bounce, task; O_DIRECT spans too) still gets exactly its bytes.
    Broken variant: ``skip_views`` returning the views unchanged (the rest of a short read lands
    at the start of the buffers again)."""
    breaks(variant, monkeypatch, threads_mod, "skip_views", "    out = []\n",
           "    return views\n    out = []\n")
    path, data = image
    calls = {"n": 0}

    class ShortOs:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def preadv(fd: int, views: list[memoryview], pos: int, *flags: int) -> int:
            calls["n"] += 1
            if calls["n"] % 7 == 0:
                raise BlockingIOError(11, "EAGAIN")
            if flags:  # the RWF_NOWAIT probe: not cached
                raise BlockingIOError(11, "EAGAIN")
            # One page at a time with O_DIRECT (its reads stay aligned), else 1000 bytes.
            step = PAGE if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT else 1000
            return os.preadv(fd, [views[0][: min(len(views[0]), step)]], pos)

    monkeypatch.setattr(threads_mod, "os", ShortOs())
    dev = await open_threads(path, None)
    arena = PageArena(64, ahead=False)
    into = frames(arena, 40)  # 160 KiB: O_DIRECT in the hybrid
    small = frames(arena, 3)
    bounce: list[bytes] = []
    into_calls: Calls = []
    try:
        assert dev.submit_read_into(8 * PAGE, into, recorder(into_calls))
        assert dev.submit_read_into(100 * PAGE, small, recorder(into_calls))
        assert dev.submit_read(12345, 6789, lambda v, e: bounce.append(bytes(v or b"")))
        got = bytes(await dev.read(70001, DIRECT_MIN + 3))
        await wait_until(lambda: not dev.in_flight)
    finally:
        await dev.aclose()
    right = (
        into_calls == [(None, True)] * 2
        and b"".join(map(bytes, into)) == data[8 * PAGE : 48 * PAGE]
        and b"".join(map(bytes, small)) == data[100 * PAGE : 103 * PAGE]
        and bounce == [data[12345 : 12345 + 6789]]
        and got == data[70001 : 70001 + DIRECT_MIN + 3]
    )
    assert calls["n"] > 80  # (the reads really came in pieces)
    assert right == (variant == "kernel")


async def test_past_the_end_closed_and_empty(image: tuple[Path, bytes]) -> None:
    """As ``read``: a range past the device's end, or a closed device, raises
    ``DeviceIOError`` from every submit; an empty one starts nothing."""
    path, _ = image
    dev = await open_threads(path)
    arena = PageArena(16, ahead=False)
    views = frames(arena, 2)
    calls: Calls = []
    with pytest.raises(DeviceIOError, match="past the end"):
        dev.submit_read_into(SIZE - PAGE, views, recorder(calls))
    with pytest.raises(DeviceIOError, match="past the end"):
        dev.submit_read(SIZE - 10, 11, lambda v, e: None)
    with pytest.raises(DeviceIOError, match="past the end"):
        dev.submit_read_after(0.1, -1, 11, lambda v, e: None)
    assert dev.submit_read_into(0, [], recorder(calls)) is False
    assert dev.submit_read(5, 0, lambda v, e: None) is False
    assert not dev._workers  # nothing started a worker yet: the pool is lazy
    await dev.aclose()
    with pytest.raises(DeviceIOError, match="closed"):
        dev.submit_read_into(0, views, recorder(calls))
    with pytest.raises(DeviceIOError, match="closed"):
        dev.submit_read(0, 10, lambda v, e: None)
    with pytest.raises(DeviceIOError, match="closed"):
        await dev.read(0, 1)
    assert calls == []


@pytest.mark.parametrize("variant", VARIANTS)
async def test_image_that_shrank_fails_only_the_lost_range(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is truncated under the device: into, bounce and task reads of the lost
    range fail with "ends early", reads of what is left succeed.
    Broken variant: a zero-byte ``preadv`` taken as the end of a complete read (the lost
    range "succeeds" with whatever the buffers held)."""
    breaks(variant, monkeypatch, threads_mod, "_pread", "            return _ENDS_EARLY\n",
           "            return None\n")
    path = tmp_path / "img"
    data = random.Random(3).randbytes(1 << 20)
    path.write_bytes(data)
    dev = await open_threads(path, False)
    os.truncate(path, 256 * 1024)
    arena = PageArena(64, ahead=False)
    results: dict[tuple[str, int], object] = {}

    def into_cb(off: int) -> Callable[[DeviceIOError | None, bool], None]:
        views = frames(arena, 2)

        def cb(err: DeviceIOError | None, released: bool) -> None:
            results[("into", off)] = err if err else b"".join(map(bytes, views))

        assert dev.submit_read_into(off, views, cb)
        return cb

    async def task(off: int) -> None:
        try:
            results[("task", off)] = bytes(await dev.read(off, 2 * PAGE))
        except DeviceIOError as err:
            results[("task", off)] = err

    def bounce_cb(off: int) -> Callable[[memoryview | None, DeviceIOError | None], None]:
        def cb(view: memoryview | None, err: DeviceIOError | None) -> None:
            results[("bounce", off)] = bytes(view) if view is not None else err

        return cb

    offsets = [0, 60 * PAGE, 63 * PAGE, 64 * PAGE, 200 * PAGE]  # 63: straddles the end
    try:
        async with trio.open_nursery() as nursery:
            for off in offsets:
                into_cb(off)
                assert dev.submit_read(off, 2 * PAGE, bounce_cb(off))
                nursery.start_soon(task, off)
        await wait_until(lambda: not dev.in_flight)
    finally:
        await dev.aclose()
    right = True
    for (_, off), res in results.items():
        if off + 2 * PAGE <= 256 * 1024:
            right = right and res == data[off : off + 2 * PAGE]
        else:
            right = right and isinstance(res, DeviceIOError) and "ends early" in str(res)
    assert len(results) == 3 * len(offsets)
    assert right == (variant == "kernel")


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_kernel_error_reaches_only_its_reader(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hybrid device whose O_DIRECT twin is a directory: the kernel fails every large read
    with EISDIR, which reaches that reader only (into, bounce or task), named in its error;
    the small reads beside them, on the image's descriptor, succeed.
    Broken variant: ``_pread`` treating a kernel error as the end of the read (the large
    reads "succeed" with junk)."""
    breaks(variant, monkeypatch, threads_mod, "_pread",
           "            return describe_oserror(err)\n", "            return None\n")
    path, data = image
    fd = os.open(path, os.O_RDONLY)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    dev = ThreadDevice(fd, base=0, size=SIZE, direct=False, path="x", direct_fd=dfd,
                       direct_min=DIRECT_MIN)
    arena = PageArena(512, ahead=False)
    results: dict[tuple[str, int], object] = {}

    async def task(off: int, n: int) -> None:
        try:
            results[("task", off)] = bytes(await dev.read(off, n))
        except DeviceIOError as err:
            results[("task", off)] = err

    try:
        async with trio.open_nursery() as nursery:
            for i in range(6):
                off = i * 64 * PAGE
                n = DIRECT_MIN if i % 2 else PAGE  # large: the directory; small: the file
                views = frames(arena, n // PAGE)

                def cb(err: DeviceIOError | None, released: bool, off: int = off,
                       views: list[memoryview] = views) -> None:
                    results[("into", off)] = err if err else b"".join(map(bytes, views))

                def bcb(view: memoryview | None, err: DeviceIOError | None,
                        off: int = off) -> None:
                    results[("bounce", off)] = bytes(view) if view is not None else err

                assert dev.submit_read_into(off, views, cb)
                assert dev.submit_read(off, n, bcb)
                nursery.start_soon(task, off, n)
        await wait_until(lambda: not dev.in_flight)
        assert bytes(await dev.read(PAGE, PAGE)) == data[PAGE : 2 * PAGE]  # still works
    finally:
        await dev.aclose()
    right = len(results) == 18
    for (_, off), res in results.items():
        if off // (64 * PAGE) % 2:
            right = right and isinstance(res, DeviceIOError) and "EISDIR" in str(res) \
                and f"at {off} of x failed" in str(res)
        else:
            right = right and res == data[off : off + PAGE]
    assert right == (variant == "kernel")
    assert not fd_open(fd) and not fd_open(dfd)


# -- waking trio ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_completion_wakes_a_sleeping_trio(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read at a time and nothing else to run: trio sleeps in its poll while the worker
    reads, and only the worker's eventfd write can wake it; each read returns at once, not at
    the next timer. Broken variant: the worker going to sleep without that write."""
    breaks(variant, monkeypatch, ThreadDevice, "_sleep",
           "os.eventfd_write(self._efd, 1)", "pass")
    path, data = image
    dev = await open_threads(path, True)  # O_DIRECT: no probe can answer from the host cache
    took: list[float] = []
    try:
        for i in range(3):
            t0 = time.monotonic()
            with trio.move_on_after(1.0):
                assert bytes(await dev.read(i * 8 * PAGE, PAGE)) == data[i * 8 * PAGE :
                                                                        (i * 8 + 1) * PAGE]
            took.append(time.monotonic() - t0)
    finally:
        await dev.aclose()
    assert (max(took) < 0.5) == (variant == "kernel"), took


# -- latency ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
async def test_delays_are_honoured_without_holding_a_worker(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 reads delayed 100 ms each (into, and bounce through ``submit_read_after``) on a
    pool of 2 workers: none completes before its delay, all are right, and they overlap (no
    worker sleeps a delay out: far less than 16 x 100 ms in all).
    Broken variant: ``_start`` ignoring the delay (reads complete at once)."""
    breaks(variant, monkeypatch, ThreadDevice, "_start", "if delay > 0:", "if False:")
    path, data = image
    dev = await open_threads(path, threads=2)
    arena = PageArena(64, ahead=False)
    done: dict[int, tuple[float, bytes | DeviceIOError | None]] = {}
    t0 = time.monotonic()
    try:
        for i in range(32):
            if i % 2:
                views = frames(arena, 1)

                def cb(err: DeviceIOError | None, released: bool, i: int = i,
                       views: list[memoryview] = views) -> None:
                    assert i not in done
                    done[i] = (time.monotonic(), err or bytes(views[0]))

                assert dev.submit_read_into(i * PAGE, views, cb, delay=0.1)
            else:
                def bcb(v: memoryview | None, err: DeviceIOError | None, i: int = i) -> None:
                    assert i not in done
                    done[i] = (time.monotonic(), bytes(v) if v is not None else err)

                assert dev.submit_read_after(0.1, i * PAGE, PAGE, bcb)
        await wait_until(lambda: len(done) == 32)
    finally:
        await dev.aclose()
    assert all(got == data[i * PAGE : (i + 1) * PAGE] for i, (_, got) in done.items())
    assert max(t for t, _ in done.values()) - t0 < 0.8
    assert len(dev._workers) <= 2
    waited = min(t for t, _ in done.values()) - t0 >= 0.1
    assert waited == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_an_earlier_deadline_wakes_the_worker_keeping_a_later_one(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read delayed 2 s, then one delayed 50 ms: the second completes after ~50 ms, not
    after the first. Broken variant: ``_add_timer`` not waking the worker that sleeps until
    the later deadline."""
    breaks(variant, monkeypatch, ThreadDevice, "_add_timer", "and self._timers[0][2] is op:",
           "and False:")
    path, _ = image
    dev = await open_threads(path)
    at: list[float] = []
    errors: list[DeviceIOError | None] = []
    try:
        assert dev.submit_read_after(2.0, 0, PAGE, lambda v, e: errors.append(e))
        await trio.sleep(0.05)  # a worker now sleeps until the first deadline
        t0 = time.monotonic()
        assert dev.submit_read_after(0.05, PAGE, PAGE, lambda v, e: at.append(time.monotonic()))
        await wait_until(lambda: bool(at), timeout=5)
        t = at[0] - t0
    finally:
        with trio.fail_after(1):
            await dev.aclose()  # the 2 s read fails at once
    assert t >= 0.05
    assert (t < 1.0) == (variant == "kernel"), t
    if variant == "kernel":
        assert len(errors) == 1 and isinstance(errors[0], DeviceIOError)


# -- close ------------------------------------------------------------------------------------
CLOSE_VARIANTS = ["kernel", "released-true", "queue-left", "fds-closed-under-worker"]


@pytest.mark.parametrize("variant", CLOSE_VARIANTS)
async def test_close_with_reads_in_flight(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers held inside ``preadv``, four reads queued behind them, two delayed 10 s:
    ``aclose`` fails the queued and delayed reads at once (``released`` True: no worker ever
    saw their frames, which stay untouched), waits its bound for the two in workers, then
    fails them with ``released`` False, leaves the descriptors open while those workers are
    inside a read, and returns. When the workers finish, they write only their own frames, no
    callback comes again, the last one closes the descriptors and the workers exit.
    Broken variants: ``aclose`` passing ``released=True`` for reads still in a worker; the
    queued reads failed but left in the queue (a worker then writes frames whose callback
    said released); the descriptors closed while a worker is inside a read."""
    if variant == "released-true":
        breaks(variant, monkeypatch, ThreadDevice, "aclose", "released=False)",
               "released=True)")
    elif variant == "queue-left":
        breaks(variant, monkeypatch, ThreadDevice, "aclose",
               "waiting.append(self._queue.popleft())",
               "waiting.extend(self._queue)\n            break")
    elif variant == "fds-closed-under-worker":
        breaks(variant, monkeypatch, ThreadDevice, "_close_fds_if_unused",
               "or any(w.busy for w in self._workers)", "or False")
    monkeypatch.setattr(threads_mod, "_CLOSE_WAIT_SECONDS", 0.2)
    gate = Gate(monkeypatch)
    path, data = image
    before = set(threading.enumerate())
    dev = await open_threads(path, False, threads=2)
    fd = dev._fd
    arena = PageArena(64, ahead=False)
    reads = [(i * 4 * PAGE, frames(arena, 2), []) for i in range(8)]  # type: list[tuple[int, list[memoryview], Calls]]
    for i, (off, views, calls) in enumerate(reads):
        assert dev.submit_read_into(off, views, recorder(calls), delay=10.0 if i >= 6 else 0.0)
    await wait_until(lambda: gate.entered == 2)
    with trio.fail_after(5):
        await dev.aclose()
    fds_open_after_close = fd_open(fd)
    first = [list(c) for _, _, c in reads]
    gate.open()
    await wait_until(lambda: gate.finished == gate.entered, timeout=5)
    await trio.sleep(0.05)  # a late worker's writes and callbacks would come by now
    workers = [t for t in set(threading.enumerate()) - before
               if t.name.startswith("asyncfs-read")]
    for t in workers:
        t.join(2)
    workers_left = [t for t in workers if t.is_alive()]
    in_worker = [(None if not c else c[0][1]) for c in first[:2]]
    once = all(len(c) == 1 and isinstance(c[0][0], DeviceIOError) for c in first) and \
        [list(c) for _, _, c in reads] == first
    untouched = all(all(v[0] == JUNK and v[-1] == JUNK for v in views)
                    for _, views, _ in reads[2:])
    written = all(b"".join(map(bytes, views)) == data[off : off + 2 * PAGE]
                  for off, views, _ in reads[:2])
    right = (once and untouched and written and in_worker == [False, False]
             and all(c[0][1] for c in first[2:]) and fds_open_after_close
             and not fd_open(fd) and not workers_left)
    assert right == (variant == "kernel"), (once, untouched, written, in_worker,
                                             fds_open_after_close)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_read_failed_by_close_calls_back_once(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aclose`` gives up on a read held in a worker and fails it; the worker then completes
    it after all, and that completion reaches the reaping (the reaper's last pass can race
    with the close, run here by hand): the callback is not called a second time.
    Broken variant: ``_finish`` without its check that the read is still registered."""
    breaks(variant, monkeypatch, ThreadDevice, "_finish",
           "except KeyError:\n        return", "except KeyError:\n        pass")
    monkeypatch.setattr(threads_mod, "_CLOSE_WAIT_SECONDS", 0.05)
    gate = Gate(monkeypatch)
    path, _ = image
    dev = await open_threads(path)
    arena = PageArena(16, ahead=False)
    calls: Calls = []
    assert dev.submit_read_into(0, frames(arena, 1), recorder(calls))
    await wait_until(lambda: gate.entered == 1)
    await dev.aclose()
    assert len(calls) == 1 and calls[0][1] is False
    gate.open()
    await wait_until(lambda: gate.finished == 1 and bool(dev._done))
    dev._reap()
    assert (len(calls) == 1) == (variant == "kernel"), calls


async def test_a_cancelled_reader_leaves_at_once_and_its_buffer_waits_for_the_worker(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader cancelled while its worker is inside ``preadv`` leaves at once; the read (and
    the bounce buffer the worker writes into) stays registered until the worker is done, and
    only then does the buffer go back to the pool, where the next read finds it."""
    gate = Gate(monkeypatch)
    path, data = image
    dev = await open_threads(path, True)  # O_DIRECT: no probe answers
    with trio.move_on_after(0.1) as scope:
        await dev.read(0, PAGE)
    assert scope.cancelled_caught and gate.entered == 1 and dev.in_flight == 1
    (op,) = dev._ops
    buf = op.buf
    assert buf is not None and buf not in dev._pool._free.get(PAGE, [])
    gate.open()
    await wait_until(lambda: not dev.in_flight)
    assert buf in dev._pool._free[PAGE]
    assert bytes(await dev.read(PAGE, PAGE)) == data[PAGE : 2 * PAGE]
    await dev.aclose()


async def test_pool_is_bounded_and_its_threads_end_with_the_device(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker before the first read; never more than ``threads`` however many reads wait;
    every worker ends with ``aclose``."""
    gate = Gate(monkeypatch)
    path, data = image
    dev = await open_threads(path, False, threads=3)
    assert not dev._workers
    got: list[bytes] = []
    before = set(threading.enumerate())
    for i in range(20):
        assert dev.submit_read(i * PAGE, 100, lambda v, e: got.append(bytes(v or b"")))
    await wait_until(lambda: gate.entered == 3)
    await trio.sleep(0.02)
    assert len(dev._workers) == 3 and gate.entered == 3
    gate.open()
    await wait_until(lambda: len(got) == 20)
    threads = [t for t in set(threading.enumerate()) - before
               if t.name.startswith("asyncfs-read")]
    assert len(threads) == 3
    await dev.aclose()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == sorted(data[i * PAGE : i * PAGE + 100] for i in range(20))


async def test_no_thread_to_be_had_fails_the_reads(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no worker thread can be started (RLIMIT_NPROC, no memory), the reads waiting for
    one fail at once with a DeviceIOError that says so, instead of waiting for ever."""
    path, _ = image
    dev = await open_threads(path, True)  # O_DIRECT: the probe answers nothing

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    calls: list[DeviceIOError | None] = []
    try:
        assert dev.submit_read(0, 100, lambda v, e: calls.append(e))
        assert dev.submit_read_after(0.01, 0, 100, lambda v, e: calls.append(e))
        with trio.fail_after(5), pytest.raises(DeviceIOError, match="no worker thread"):
            await dev.read(PAGE, 100)
        await wait_until(lambda: len(calls) == 2)
    finally:
        await dev.aclose()
    assert all(isinstance(e, DeviceIOError) and "no worker thread" in str(e) for e in calls)
    assert not dev._workers


# -- the page cache over the threads backend --------------------------------------------------
KINDS = ["into", "bounce"]


@pytest.fixture
def small_image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "small.img"
    data = random.Random(11).randbytes(64 * PAGE_SIZE)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path, data


async def _open_counted(path: Path, *, direct: bool, kind: str) -> tuple[ThreadDevice,
                                                                          list[int]]:
    """The real device, with the lengths of the reads started by callback: into the frames
    (``into``), or, with ``submit_read_into`` hidden from the cache, through the bounce
    buffer (``bounce``)."""
    dev = await open_threads(path, direct)
    return dev, count_callback_reads(dev, kind)


@pytest.fixture
def cold(small_image: tuple[Path, bytes]) -> Iterator[None]:
    uncache_file(small_image[0])
    yield


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
async def test_cache_reads_return_the_file(
    small_image: tuple[Path, bytes], cold: None, direct: bool, kind: str
) -> None:
    """Concurrent reads of random ranges through the page cache equal the file, and the
    misses went through the pool by callback (no task per miss)."""
    path, data = small_image
    dev, started = await _open_counted(path, direct=direct, kind=kind)
    cache = PageCache(dev, cache_bytes=64 * PAGE_SIZE)
    rng = random.Random(3)
    ranges = [(o, rng.randrange(1, 5 * PAGE_SIZE)) for o in
              (rng.randrange(0, 59 * PAGE_SIZE) for _ in range(40))]
    got: dict[tuple[int, int], bytes] = {}

    async def reader(off: int, n: int) -> None:
        got[(off, n)] = await cache.read_dev(off, n)

    try:
        async with trio.open_nursery() as nursery:
            for off, n in ranges:
                nursery.start_soon(reader, off, n)
        for (off, n), b in got.items():
            assert b == data[off : off + n], (off, n)
        assert started or cache.backend_nowait_reads == cache.backend_reads
        assert cache.inflight_io == 0
    finally:
        await cache.aclose()
        await dev.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_cache_failed_coalesced_read_fails_only_bad_pages(
    small_image: tuple[Path, bytes], kind: str
) -> None:
    """The image shrinks under the device: a coalesced read across the new end fails, is
    retried page by page, and only the pages past the end get ERROR."""
    path, data = small_image
    dev, started = await _open_counted(path, direct=True, kind=kind)
    cache = PageCache(dev, cache_bytes=64 * PAGE_SIZE)
    try:
        os.truncate(path, 40 * PAGE_SIZE)
        with pytest.raises(DeviceIOError):
            await cache.read_dev(32 * PAGE_SIZE, 16 * PAGE_SIZE)
        assert 16 * PAGE_SIZE in started
        await wait_until(lambda: not cache.inflight_io)
        for idx in range(32, 48):
            p = cache.lookup(idx)
            assert p is not None and not p.flags & PG_LOCKED
            assert bool(p.flags & PG_UPTODATE) == (idx < 40), idx
            assert bool(p.flags & PG_ERROR) == (idx >= 40), idx
        assert await cache.read_dev(36 * PAGE_SIZE, PAGE_SIZE) == data[
            36 * PAGE_SIZE : 37 * PAGE_SIZE]
    finally:
        await cache.aclose()
        await dev.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_cache_close_fails_reads_in_flight_once(
    small_image: tuple[Path, bytes], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PageCache.aclose`` with a read held inside a worker fails its pages at once (ERROR,
    unlocked, no frame left to reclaim); the completion that arrives later changes nothing."""
    gate = Gate(monkeypatch)
    path, _ = small_image
    dev, started = await _open_counted(path, direct=True, kind=kind)
    cache = PageCache(dev, cache_bytes=64 * PAGE_SIZE)
    try:
        with pytest.raises(WouldBlockError):
            await cache.read_dev(8 * PAGE_SIZE, 2 * PAGE_SIZE, nowait=True)
        assert started == [2 * PAGE_SIZE]
        await wait_until(lambda: gate.entered == 1)
        await cache.aclose()
        for idx in (8, 9):
            p = cache.lookup(idx)
            assert p is not None and p.flags & PG_ERROR and not p.flags & PG_LOCKED
            assert not isinstance(p.data, memoryview)
        gate.open()
        await wait_until(lambda: not dev.in_flight)
        p = cache.lookup(8)
        assert p is not None and not p.flags & PG_UPTODATE
        assert cache.inflight_io == 0
    finally:
        gate.open()
        await dev.aclose()


async def test_faulty_latency_through_the_pool(image: tuple[Path, bytes]) -> None:
    """``-o latency`` over the threads backend: FaultyDevice hands its latency to the pool as
    the read's delay (into and bounce), and the reads complete after it, right."""
    path, data = image
    dev = FaultyDevice(await open_threads(path), latency_ms=60)
    arena = PageArena(16, ahead=False)
    views = frames(arena, 2)
    at: list[float] = []
    got: list[bytes] = []
    t0 = trio.current_time()
    try:
        assert dev.submit_read_into(3 * PAGE, views, lambda e, r: at.append(trio.current_time()))
        assert dev.submit_read(5, 50, lambda v, e: got.append(bytes(v or b"")))
        await wait_until(lambda: bool(at) and bool(got))
    finally:
        await dev.aclose()
    assert at[0] - t0 >= 0.06 - 1e-3
    assert b"".join(map(bytes, views)) == data[3 * PAGE : 5 * PAGE] and got == [data[5:55]]
