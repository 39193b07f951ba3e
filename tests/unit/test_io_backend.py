"""The local-file backends (io_uring and threads, O_DIRECT and buffered) read exactly what
``os.pread`` reads, at any offset and length, with many reads in flight; errors reach only the
reader that asked."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io import DIRECT_MIN, ThreadDevice, UringDevice, filedev, open_image
from asyncfs.io import uring as uring_mod
from asyncfs.io.filedev import PROBE_BACKOFF, PROBE_SAMPLE, FileDeviceBase
from bench.image import uncache_file
from tests.mutants import aholds, breaks

IMAGE_SIZE = 3 * (1 << 20) + 777  # odd: the last O_DIRECT read is short
WINDOW = (511, IMAGE_SIZE - 511 - 4099)  # a partition starting and ending off any alignment
MODES = [("uring", True), ("uring", False), ("uring", None),
         ("threads", True), ("threads", False), ("threads", None)]  # None: the hybrid default


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("io") / "data.img"
    data = random.Random(7).randbytes(IMAGE_SIZE)
    path.write_bytes(data)
    return path, data


def _ranges(size: int) -> Any:
    return st.lists(
        st.integers(0, size).flatmap(
            lambda off: st.tuples(st.just(off), st.integers(0, min(size - off, 300_000)))),
        min_size=1, max_size=24,
    )


@pytest.mark.parametrize(("backend", "direct"), MODES)
@pytest.mark.parametrize("window", [None, WINDOW], ids=["whole", "window"])
def test_reads_equal_pread(
    image: tuple[Path, bytes], backend: str, direct: bool, window: tuple[int, int] | None
) -> None:
    """Hypothesis: concurrent reads of random ranges equal os.pread of the same file range.
    The O_DIRECT alignment offset dropped is built broken in
    ``test_unaligned_direct_read_keeps_its_offset``, a short read resubmitted at its start
    in ``test_vanished_image_fails_only_its_readers``."""
    path, data = image
    base, size = window if window else (0, IMAGE_SIZE)
    fd = os.open(path, os.O_RDONLY)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_ranges(size))
    def check(ranges: list[tuple[int, int]]) -> None:
        async def main() -> None:
            dev = await open_image(path, backend=backend, direct=direct,  # type: ignore[arg-type]
                                   offset=base if window else None,
                                   sizelimit=size if window else None)
            assert dev.size == size
            assert isinstance(dev, UringDevice | ThreadDevice) and dev.direct is bool(direct)
            assert dev.hybrid is (direct is None)
            got: dict[int, bytes] = {}

            async def one(i: int, off: int, length: int) -> None:
                got[i] = bytes(await dev.read(off, length))

            async with trio.open_nursery() as nursery:
                for i, (off, length) in enumerate(ranges):
                    nursery.start_soon(one, i, off, length)
            await dev.aclose()
            for i, (off, length) in enumerate(ranges):
                assert got[i] == os.pread(fd, length, base + off), (off, length)

        trio.run(main)

    try:
        check()
    finally:
        os.close(fd)
    assert data[:16] == path.read_bytes()[:16]


@pytest.mark.parametrize("variant", ["kernel", "from_buffer_start"])
async def test_unaligned_direct_read_keeps_its_offset(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An O_DIRECT read at an unaligned offset reads the aligned span around it and returns
    the caller's part of it. Broken variant: copying from the buffer's start (the alignment
    offset dropped: the bytes of the aligned position instead)."""
    breaks(variant, monkeypatch, UringDevice, "_complete",
           "data = bytes(buf.view[op.lo : op.need])", "data = bytes(buf.view[0 : op.length])")
    path, data = image
    dev = await open_image(path, backend="uring", direct=True)
    try:
        got = [bytes(await dev.read(off, n)) for off, n in [(511, 1000), (8192 + 7, 4096)]]
    finally:
        await dev.aclose()
    assert (got == [data[511:1511], data[8199:8199 + 4096]]) == (variant == "kernel")


@pytest.mark.parametrize(("backend", "direct"), MODES)
async def test_bounds_and_zero_length(image: tuple[Path, bytes], backend: str,
                                      direct: bool) -> None:
    path, data = image
    dev = await open_image(path, backend=backend, direct=direct)  # type: ignore[arg-type]
    try:
        assert await dev.read(IMAGE_SIZE, 0) == b""
        assert bytes(await dev.read(IMAGE_SIZE - 5, 5)) == data[-5:]
        for off, length in [(IMAGE_SIZE - 4, 5), (IMAGE_SIZE + 1, 0), (-1, 2), (0, -1)]:
            with pytest.raises(DeviceIOError, match="past the end"):
                await dev.read(off, length)
        assert bytes(await dev.read(0, 4096)) == data[:4096]  # the device still works
    finally:
        await dev.aclose()
    with pytest.raises(DeviceIOError, match="closed"):
        await dev.read(0, 1)


@pytest.mark.parametrize("backend", ["uring", "threads"])
async def test_read_nowait(image: tuple[Path, bytes], backend: str) -> None:
    path, data = image
    dev = await open_image(path, backend=backend, direct=False)  # type: ignore[arg-type]
    await dev.read(8192, 4096)  # now cached by the host
    assert dev.read_nowait(8192, 4096) == data[8192:12288]
    assert dev.read_nowait(IMAGE_SIZE - 1, 2) is None
    await dev.aclose()
    ddev = await open_image(path, backend=backend, direct=True)  # type: ignore[arg-type]
    assert ddev.read_nowait(8192, 4096) is None
    await ddev.aclose()


class _ScriptedHostCache:
    """Stands in for ``os`` in ``asyncfs.io.filedev``: ``preadv`` with ``RWF_NOWAIT`` raises
    EAGAIN while ``cold`` and reads the real file (blocking) once warm, and every such call is
    counted. A real cold probe is not always a miss: it starts the kernel's read of the page,
    and on a fast disk that read can finish before the probe looks again (about 1 probe in
    1,500 here, which made CI fail once), so a test of the back-off bookkeeping scripts it."""

    def __init__(self) -> None:
        self.cold = True
        self.syscalls = 0

    def preadv(self, fd: int, views: list[memoryview], pos: int, flags: int = 0) -> int:
        assert flags == os.RWF_NOWAIT
        self.syscalls += 1
        if self.cold:
            raise BlockingIOError(errno.EAGAIN, "not cached")
        return os.preadv(fd, views, pos)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


_PROBE_BROKEN = {
    "no_backoff": ("_may_probe", "if self._probe_misses >= PROBE_BACKOFF:", "if False:"),
    "hit_keeps_misses": ("_probe", "self._probe_misses = 0", "pass"),
}


@pytest.mark.parametrize("variant", ["kernel", *_PROBE_BROKEN])
@pytest.mark.parametrize("backend", ["uring", "threads"])
async def test_probe_backs_off_while_cold_and_resumes_once_cached(
        tmp_path: Path, backend: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After PROBE_BACKOFF probe misses in a row only one call in PROBE_SAMPLE issues the
    syscall; the first sampled probe that finds the bytes cached ends the back-off.
    Broken variants: no back-off (nothing is ever skipped); a hit that does not reset the
    count of misses (after the sampled hit, cached pages are skipped again)."""
    if variant != "kernel":
        breaks(variant, monkeypatch, FileDeviceBase, *_PROBE_BROKEN[variant])
    path = tmp_path / "img"
    calls = PROBE_BACKOFF + 2 * PROBE_SAMPLE
    step = 64 * 4096
    data = random.Random(6).randbytes((calls + 1) * step)
    path.write_bytes(data)
    dev = await open_image(path, backend=backend, direct=False)  # type: ignore[arg-type]
    host = _ScriptedHostCache()
    monkeypatch.setattr(filedev, "os", host)

    def probe(i: int) -> bytes | None:
        return dev.read_nowait((i + 1) * step, 4096)

    async def check() -> None:
        for i in range(PROBE_BACKOFF):  # cold: every probe misses, none skipped yet
            assert probe(i) is None
        assert (host.syscalls, dev.probes_skipped) == (PROBE_BACKOFF, 0)  # type: ignore[attr-defined]
        for i in range(PROBE_BACKOFF, PROBE_BACKOFF + PROBE_SAMPLE - 1):
            assert probe(i) is None
        assert (host.syscalls, dev.probes_skipped) == (  # type: ignore[attr-defined]
            PROBE_BACKOFF, PROBE_SAMPLE - 1)
        host.cold = False  # now the host caches it all
        first = PROBE_BACKOFF + PROBE_SAMPLE - 1  # the sampled call: it probes, and hits
        got = [probe(i) for i in range(first, calls)]
        assert got == [data[(i + 1) * step : (i + 1) * step + 4096] for i in range(first, calls)]
        assert dev.probes_skipped == PROBE_SAMPLE - 1  # type: ignore[attr-defined]
        assert host.syscalls == PROBE_BACKOFF + calls - first

    try:
        assert await aholds(check) == (variant == "kernel")
    finally:
        await dev.aclose()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _host_caches(path: Path, off: int, length: int) -> bool:
    """Whether the host page cache holds all of ``[off, off + length)`` of ``path`` (page
    aligned), by ``mincore``: looking must not read, as a probe would (its miss starts the
    kernel's read of the range)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
            assert _libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
            return all(v & 1 for v in vec)
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)


@pytest.mark.parametrize("variant", ["kernel", "all_buffered"])
@pytest.mark.parametrize("backend", ["uring", "threads"])
async def test_hybrid_routes_large_reads_past_the_host_cache(
        tmp_path: Path, backend: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default device reads ``DIRECT_MIN`` bytes or more with O_DIRECT (the host cache
    stays empty there, and the probe declines such ranges) and smaller reads through the host
    cache (which then holds them, and the probe serves them). Broken variant: ``_route``
    sending every read to the buffered descriptor (the large range lands in the host cache)."""
    breaks(variant, monkeypatch, FileDeviceBase, "_route",
           "if self._dfd >= 0 and length >= self._direct_min:", "if False:")
    path = tmp_path / "img"
    data = random.Random(5).randbytes(4 << 20)
    path.write_bytes(data)
    uncache_file(path)
    dev = await open_image(path, backend=backend)  # type: ignore[arg-type]
    try:
        assert dev.hybrid  # type: ignore[attr-defined]
        big = (1 << 20, DIRECT_MIN * 2)
        assert bytes(await dev.read(*big)) == data[big[0] : big[0] + big[1]]
        assert (not _host_caches(path, *big)) == (variant == "kernel")
        if variant != "kernel":
            return
        assert dev.read_nowait(*big) is None
        small = (3 << 20, 8192)
        assert bytes(await dev.read(*small)) == data[small[0] : small[0] + small[1]]
        assert _host_caches(path, *small)
        assert dev.read_nowait(*small) == data[small[0] : small[0] + small[1]]
    finally:
        await dev.aclose()


_SHRINK_BROKEN = {
    "zero_read_ok": ('error = "image ends early (truncated or removed?)"', "pass"),
    "short_read_at_start": ("ring, at = self._ring, op.pos + op.done",
                            "ring, at = self._ring, op.pos"),
}


@pytest.mark.parametrize(("variant", "backend", "direct"), [
    *[("kernel", b, d) for b, d in MODES],
    ("zero_read_ok", "uring", True), ("zero_read_ok", "uring", False),
    ("short_read_at_start", "uring", True), ("short_read_at_start", "uring", False),
])
async def test_vanished_image_fails_only_its_readers(
    tmp_path: Path, variant: str, backend: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image shrinks under the device (truncated, or removed and rewritten): reads of the
    lost range fail with DeviceIOError, concurrent reads of the rest still succeed.
    Broken variants: treating a zero-byte read as success (returns stale or zero bytes);
    resubmitting the rest of a short read at the read's start offset (built for io_uring)."""
    if variant != "kernel":
        where = "_complete" if variant == "zero_read_ok" else "_prep"
        breaks(variant, monkeypatch, UringDevice, where, *_SHRINK_BROKEN[variant])
    path = tmp_path / "img"
    data = random.Random(3).randbytes(1 << 20)
    path.write_bytes(data)
    dev = await open_image(path, backend=backend, direct=direct)  # type: ignore[arg-type]
    os.truncate(path, 256 * 1024)
    results: dict[int, object] = {}

    async def one(off: int) -> None:
        try:
            results[off] = bytes(await dev.read(off, 8192))
        except DeviceIOError as err:
            results[off] = err

    async with trio.open_nursery() as nursery:
        for off in [*range(0, 1 << 20, 64 * 1024), 256 * 1024 - 4096]:  # one straddles the end
            nursery.start_soon(one, off)
    await dev.aclose()
    right = all(
        res == data[off : off + 8192] if off + 8192 <= 256 * 1024
        else isinstance(res, DeviceIOError) and "ends early" in str(res)
        for off, res in results.items())
    assert right == (variant == "kernel"), results.get(256 * 1024 - 4096)


@pytest.mark.parametrize("variant", ["kernel", "pooled_at_cancel"])
async def test_cancelled_reader_keeps_buffer_until_cqe(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers cancelled while their read is in flight leave at once; the op and its buffer stay
    registered until the CQE arrives, never back in the free pool meanwhile; later reads are
    right. Broken variant: an abort that drops the op and pools its buffer at once (the kernel
    then writes into a buffer another read is using; built as a cancelled read that pools
    its buffer while its op stays in the kernel)."""
    breaks(variant, monkeypatch, UringDevice, "read",
           "result: bytes = await trio.lowlevel.wait_task_rescheduled(op.abort)",
           "try:\n        result: bytes = await trio.lowlevel.wait_task_rescheduled(op.abort)\n"
           "    except trio.Cancelled:\n        self._pool.put(op.buf)\n        raise")
    path, data = image
    dev = await open_image(path, backend="uring", direct=True)
    assert isinstance(dev, UringDevice)
    rng = random.Random(5)
    held = True
    orphans = 0

    def pooled() -> set[int]:
        return {id(b) for free in dev._pool._free.values() for b in free}

    for _round in range(20):
        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(dev.read, rng.randrange(IMAGE_SIZE - 65536), 65536)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        orphans += sum(op.task is None for op in dev._ops.values())
        held = held and not any(id(op.buf) in pooled() for op in dev._ops.values())
    assert held == (variant == "kernel")
    assert orphans > 0  # some reads really were cancelled in flight
    with trio.fail_after(10):
        while dev.in_flight:
            await trio.sleep(0.001)
    if variant == "kernel":  # the broken pool may hand one buffer to two reads
        for off in (0, 12345, IMAGE_SIZE - 70000):
            assert bytes(await dev.read(off, 65536)) == data[off : off + 65536]
    await dev.aclose()


@pytest.mark.parametrize("variant", ["kernel", "one_at_a_time"])
async def test_queue_depth_is_the_number_of_callers(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All concurrent readers are submitted together (queue depth = number of callers).
    Broken variant: serialising reads (each waits for the one in flight: the peak stays 1)."""
    breaks(variant, monkeypatch, UringDevice, "read",
           "while len(self._ops) >= self._depth:", "while len(self._ops) >= 1:")
    path, _ = image
    dev = await open_image(path, backend="uring", direct=True)
    assert isinstance(dev, UringDevice)
    async with trio.open_nursery() as nursery:
        for i in range(48):
            nursery.start_soon(dev.read, i * 16384, 4096)
    assert (dev.peak_in_flight == 48) == (variant == "kernel"), dev.peak_in_flight
    await dev.aclose()


@pytest.mark.parametrize("variant", ["kernel", "no_slot_wait"])
async def test_depth_bound_holds(
    image: tuple[Path, bytes], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 readers on a depth-4 ring: at most 4 in flight, the rest wait for a slot and all
    finish. Broken variant: no slot wait (the SQ overflows; reads fail or hang)."""
    breaks(variant, monkeypatch, UringDevice, "read",
           "while len(self._ops) >= self._depth:", "while False:")
    path, data = image
    fd = os.open(path, os.O_RDONLY)
    dev = await UringDevice.create(fd, base=0, size=IMAGE_SIZE, direct=False, path=str(path),
                                   depth=4)
    peak, right = 0, 0

    async def reader(i: int) -> None:
        nonlocal peak, right
        peak = max(peak, dev.in_flight)
        with contextlib.suppress(DeviceIOError):
            got = bytes(await dev.read(i * 4096, 4096))
            right += got == data[i * 4096 : (i + 1) * 4096]
        peak = max(peak, dev.in_flight)

    if variant != "kernel":
        monkeypatch.setattr(uring_mod, "_DRAIN_SECONDS", 0.5)
    with trio.move_on_after(2):  # the broken variant's readers hang
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(reader, i)
    assert (peak <= 4 and right == 64) == (variant == "kernel"), (peak, right)
    await dev.aclose()


@pytest.mark.parametrize(("code", "why"), [
    (errno.EPERM, "forbidden here"), (errno.ENOSYS, "no io_uring"), (errno.ENOMEM, "refused"),
])
async def test_uring_unavailable_falls_back_to_threads(
    image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, code: int, why: str
) -> None:
    """Whatever errno ring set-up fails with (EPERM from a seccomp filter, ENOSYS from a
    kernel or emulator without io_uring, anything else), ``auto`` serves through threads and
    keeps a one-line reason naming the errno; ``uring`` is that line as an error."""
    path, data = image

    class Refusing:
        def Ring(self, depth: int) -> None:
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(uring_mod, "_uring", Refusing())
    dev = await open_image(path)
    assert isinstance(dev, ThreadDevice)
    assert dev.backend_note is not None and why in dev.backend_note
    assert errno.errorcode[code] in dev.backend_note
    assert bytes(await dev.read(100, 1000)) == data[100:1100]
    await dev.aclose()
    with pytest.raises(ImageError, match=f"io_uring is unavailable: .*{why}"):
        await open_image(path, backend="uring")


@pytest.mark.parametrize(("variant", "backend"), [
    ("kernel", "uring"), ("kernel", "threads"), ("fails_all", "uring")])
async def test_kernel_error_reaches_only_its_reader(
    image: tuple[Path, bytes], variant: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read the kernel fails (here EINVAL: an unaligned read on an O_DIRECT fd whose device
    was told it is buffered) raises DeviceIOError naming the errno in that reader only; aligned
    reads running beside it succeed and the device keeps working.
    Broken variant: failing every op in flight when one CQE carries an error (built for
    io_uring)."""
    breaks(variant, monkeypatch, UringDevice, "_complete",
           'error = f"{errno.errorcode.get(-res, str(-res))} ({os.strerror(-res)})"',
           'error = f"{errno.errorcode.get(-res, str(-res))} ({os.strerror(-res)})"\n'
           "        self._fail_all(error)")
    path, data = image
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    dev: UringDevice | ThreadDevice
    if backend == "uring":
        dev = await UringDevice.create(fd, base=0, size=IMAGE_SIZE, direct=False, path="x")
    else:
        dev = ThreadDevice(fd, base=0, size=IMAGE_SIZE, direct=False, path="x")
    results: dict[int, object] = {}

    async def one(off: int, length: int) -> None:
        try:
            results[off] = bytes(await dev.read(off, length))
        except DeviceIOError as err:
            results[off] = err

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(one, i * 65536, 4096)  # aligned: fine even with O_DIRECT
            nursery.start_soon(one, i * 65536 + 100, 333)  # unaligned: EINVAL
    right = all(
        res == data[off : off + 4096] if off % 4096 == 0
        else isinstance(res, DeviceIOError) and "EINVAL" in str(res)
        and f"at {off} of x failed" in str(res)
        for off, res in results.items())
    assert right == (variant == "kernel"), results
    if variant == "kernel":
        assert bytes(await dev.read(4096, 4096)) == data[4096:8192]
    await dev.aclose()
