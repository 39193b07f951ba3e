"""Device faults: injected EIO in a byte range, and a stalled device.

In-process (the real stack over a FaultyDevice, no FUSE) for the exact wake/retry rules, and
one mount-level test through the kernel's FUSE readahead.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from asyncfs.cli.control import request
from asyncfs.cli.options import MountOptions
from asyncfs.cli.wiring import Stack, open_stack
from asyncfs.engine.pageio import PageIO
from asyncfs.engine.volume import OpenFile
from asyncfs.errors import DeviceIOError
from asyncfs.pagecache import PAGE_SIZE
from tests.mount.helpers import mounted, stats
from tests.mutants import breaks

KIB = 1024


@asynccontextmanager
async def faulty_stack(img: Path, **kw: object) -> AsyncIterator[Stack]:
    opts = MountOptions(faults=True, cache_size=4 << 20, **kw)  # type: ignore[arg-type]
    async with open_stack(img, opts) as stack:
        assert stack.faults is not None
        yield stack


async def _open(stack: Stack, path: str) -> tuple[OpenFile, int, int]:
    """(handle, size, device offset of byte 0) of a contiguous file."""
    vol = stack.volume
    ino = vol.root_ino
    for part in path.strip("/").split("/"):
        ino = (await vol.lookup(ino, part.encode())).ino
    fh = await vol.open(ino)
    size = (await vol.getattr(ino)).size
    runs = await fh.fmap.map(0, size)
    assert len(runs) == 1 and runs[0].dev_off is not None, runs
    return fh, size, runs[0].dev_off


async def _read(stack: Stack, fh: OpenFile, off: int, n: int) -> bytes | str:
    try:
        with trio.fail_after(10):
            return bytes(await stack.volume.read(fh, off, n))
    except DeviceIOError:
        return "EIO"


@pytest.mark.parametrize("variant", ["kernel", "no_page_retry"])
async def test_eio_fails_only_reads_touching_the_range(
    fuzz_ext4: Path, fuzz_tree: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads touching the failed range get EIO, every other read gets exact bytes, also a
    reader parked on a good page that was read in the same coalesced I/O as the bad one.

    Broken variant: ``PageIO._io_task`` without the per-page retry of a failed coalesced
    read (``if eio and _splittable(pages)`` -> ``if False``): the parked reader at 100 KiB gets
    EIO."""
    breaks(variant, monkeypatch, PageIO, "_io_task",
           "if eio and _splittable(pages) and not self.closed:", "if False:")
    want = (fuzz_tree / "files" / "big").read_bytes()
    async with faulty_stack(fuzz_ext4, readahead=0) as stack:
        assert stack.faults is not None
        fh, _size, dev0 = await _open(stack, "/files/big")
        bad = dev0 + 200 * KIB + 100  # one byte in the page at file offset 200 KiB
        stack.faults.add_eio_range(bad, bad + 1)
        stack.faults.stall()
        res: dict[str, bytes | str] = {}

        async def rd(name: str, off: int, n: int) -> None:
            res[name] = await _read(stack, fh, off, n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rd, "whole", 0, 256 * KIB)  # one coalesced I/O over the bad page
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(rd, "good_parked", 100 * KIB, 4 * KIB)
            await trio.testing.wait_all_tasks_blocked()
            assert stack.cache.stats()["parked_now"] == 2
            stack.faults.release()
        assert res["whole"] == "EIO"
        assert (res["good_parked"] == want[100 * KIB : 104 * KIB]) == (variant == "kernel")
        if variant != "kernel":
            return
        # fresh reads: touching the bad page fails, its neighbours and other files do not
        # (an I/O error covers the whole page: the bad page's bytes in the file, by PAGE_SIZE)
        page = (bad // PAGE_SIZE * PAGE_SIZE - dev0, (bad // PAGE_SIZE + 1) * PAGE_SIZE - dev0)
        assert await _read(stack, fh, page[1] - 200, 200) == "EIO"
        assert await _read(stack, fh, page[0] - 4 * KIB, 4 * KIB) == want[page[0] - 4 * KIB
                                                                          : page[0]]
        assert await _read(stack, fh, page[1], 8 * KIB) == want[page[1] : page[1] + 8 * KIB]
        other, osize, _ = await _open(stack, "/files/f70000")
        assert await _read(stack, other, 0, osize) == (fuzz_tree / "files/f70000").read_bytes()
        assert stack.cache.stats()["parked_now"] == 0
        assert stack.cache.stats()["inflight_io"] == 0


async def test_every_waiter_woken_then_retry_succeeds(fuzz_ext4: Path, fuzz_tree: Path) -> None:
    """16 readers parked on one page whose I/O fails are all woken with EIO (none left
    parked); after the fault is cleared the next read retries the I/O and gets the bytes.
    (A ``PageIO.end_read`` that set ERROR without unlocking the pages would leave the readers
    parked past the 5 s deadline.)"""
    want = (fuzz_tree / "files" / "big").read_bytes()
    async with faulty_stack(fuzz_ext4, readahead=0) as stack:
        assert stack.faults is not None
        fh, _size, dev0 = await _open(stack, "/files/big")
        page = 64 * KIB
        stack.faults.add_eio_range(dev0 + page, dev0 + page + 4096)
        stack.faults.stall()
        results: list[bytes | str] = []

        async def rd() -> None:
            results.append(await _read(stack, fh, page + 10, 100))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(rd)
                await trio.testing.wait_all_tasks_blocked()
                assert stack.cache.stats()["parked_now"] == 16
                stack.faults.release()
        assert results == ["EIO"] * 16
        st = stack.cache.stats()
        assert st["parked_now"] == 0 and st["inflight_io"] == 0
        before = int(st["backend_reads"])
        assert await _read(stack, fh, page + 10, 100) == "EIO"  # still failing: retried
        assert stack.cache.stats()["backend_reads"] == before + 1
        stack.faults.clear_eio_ranges()
        assert await _read(stack, fh, page + 10, 100) == want[page + 10 : page + 110]
        assert stack.cache.stats()["backend_reads"] == before + 2


async def test_stalled_device_does_not_stall_cached_reads(fuzz_ext4: Path,
                                                         fuzz_tree: Path) -> None:
    """With the device stalled and a reader parked on it, reads of cached pages still answer
    at once: a read path that took a global lock around every read (as fuse2fs does) would
    make the cached read wait for the stalled one, and the 1 s deadline would fire."""
    want = (fuzz_tree / "files" / "f70000").read_bytes()
    async with faulty_stack(fuzz_ext4) as stack:
        assert stack.faults is not None
        cached, size, _ = await _open(stack, "/files/f70000")
        assert await _read(stack, cached, 0, size) == want
        cold, _, _ = await _open(stack, "/files/big")
        stack.faults.stall()
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def cold_reader() -> None:
                await _read(stack, cold, 0, 4096)
                done.set()

            nursery.start_soon(cold_reader)
            await trio.testing.wait_all_tasks_blocked()
            assert stack.cache.stats()["parked_now"] == 1
            with trio.fail_after(1):
                for _ in range(50):
                    assert await _read(stack, cached, 0, size) == want
            assert not done.is_set()
            stack.faults.release()
        assert done.is_set()


def test_mount_eio_range_and_clear(fuzz_ext4: Path, fuzz_tree: Path, tmp_path: Path) -> None:
    """Through FUSE and the kernel's readahead: a file read touching the failed range gets EIO,
    a read of the same file's first bytes and of other files succeed, the daemon stays up,
    and after ``fault clear`` the whole file reads back exactly."""

    async def locate() -> tuple[int, int]:
        async with open_stack(fuzz_ext4, MountOptions()) as stack:
            _fh, size, dev0 = await _open(stack, "/files/big")
            return size, dev0

    size, dev0 = trio.run(locate)
    want = (fuzz_tree / "files" / "big").read_bytes()
    assert size == len(want)
    with mounted(fuzz_ext4, tmp_path / "mnt", "faults") as mnt:
        # inside the kernel's first readahead window: its 128 KiB READ fails, then the
        # kernel reads the page the caller wants alone
        bad = dev0 + 64 * KIB
        reply = request(str(mnt), {"op": "fault", "action": "eio", "start": bad, "end": bad + 1})
        assert reply["ok"]
        fd = os.open(mnt / "files" / "big", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == want[:4096]
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 64 * KIB)
            assert ei.value.errno == errno.EIO
            # a read running into the bad page stops short of it (POSIX), then fails
            assert os.pread(fd, 8192, 62 * KIB) == want[62 * KIB : 64 * KIB]
            assert os.pread(fd, 4096, 100 * KIB) == want[100 * KIB : 104 * KIB]
        finally:
            os.close(fd)
        assert (mnt / "files" / "f70000").read_bytes() == (fuzz_tree / "files/f70000").read_bytes()
        assert stats(mnt)["parked_now"] == 0
        request(str(mnt), {"op": "fault", "action": "clear"})
        assert (mnt / "files" / "big").read_bytes() == want
