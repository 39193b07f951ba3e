"""The FUSE adapter: one reply per request on every path (invariant 15), errno mapping, reads
looped to the full length or EOF (invariant 8's FUSE half)."""

from __future__ import annotations

import errno
import os
from typing import Any

import pyfuse3
import pytest
import trio

from asyncfs import errors
from asyncfs.fuse.errnos import errno_for
from asyncfs.fuse.ops import PUSH_MAX, AsyncfsOperations
from asyncfs.types import Attr, DirEntry, StatFs
from tests.mutants import breaks

ROOT = 2


def _attr(ino: int, mode: int = 0o100644, size: int = 0) -> Attr:
    return Attr(ino=ino, mode=mode, nlink=1, uid=0, gid=0, rdev=0, size=size, blocks=0,
                atime_ns=0, mtime_ns=0, ctime_ns=0, crtime_ns=0, blksize=4096)


class FakeVolume:
    """Answers from a dict; ``fail`` makes every call raise the given exception."""

    root_ino = ROOT

    def __init__(self, data: bytes = b"", chunk: int = 1 << 30) -> None:
        self.data = data
        self.chunk = chunk  # largest piece one read() returns (models partial progress)
        self.fail: BaseException | None = None

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def getattr(self, ino: int) -> Attr:
        self._check()
        return _attr(ino, 0o040755 if ino == ROOT else 0o100644, len(self.data))

    async def lookup(self, parent_ino: int, name: bytes) -> Attr:
        self._check()
        return _attr(ROOT if name == b".." else 12)

    async def readdir(self, ino: int, off: int) -> list[DirEntry]:
        self._check()
        ents = [DirEntry(b".", ROOT, 2, 1), DirEntry(b"..", ROOT, 2, 2), DirEntry(b"f", 12, 1, 3)]
        return [e for e in ents if e.next_off > off]

    async def readlink(self, ino: int) -> bytes:
        self._check()
        return b"target"

    async def open(self, ino: int) -> Any:
        self._check()
        return object()

    async def read(self, handle: Any, off: int, size: int) -> bytes:
        self._check()
        return self.data[off : off + min(size, self.chunk)]

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        self._check()
        raise errors.NoAttrError("no such attribute")

    async def listxattr(self, ino: int) -> list[bytes]:
        self._check()
        return [b"user.a"]

    def statfs(self) -> StatFs:
        self._check()
        return StatFs(4096, 4096, 10, 5, 4, 100, 50, 255)


CASES: list[tuple[BaseException, int]] = [
    (errors.NoEntryError("x"), errno.ENOENT),
    (errors.NotADirError("x"), errno.ENOTDIR),
    (errors.NoAttrError("x"), errno.ENODATA),
    (errors.ChecksumError("x"), errno.EIO),
    (errors.CorruptionError("x"), errno.EIO),
    (errors.DeviceIOError("x"), errno.EIO),
    (errors.NotSupportedError("x"), errno.EOPNOTSUPP),
    (RuntimeError("a bug"), errno.EIO),
    (KeyError("a bug"), errno.EIO),
    (RecursionError(), errno.EIO),
]


@pytest.mark.parametrize("variant", ["kernel", "no_catch_all"])
@pytest.mark.parametrize(("exc", "code"), CASES, ids=lambda c: type(c).__name__)
async def test_every_failure_is_exactly_one_errno_reply(
    exc: BaseException, code: int, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 15. Broken variant: `_call` without its catch-all `except BaseException`
    (only AsyncfsError mapped) -> RuntimeError/KeyError escape into pyfuse3's worker loop,
    which would end the whole mount with no reply to the kernel; this test then fails for
    them (an AsyncfsError is still mapped)."""
    breaks(variant, monkeypatch, AsyncfsOperations, "_call",
           "except BaseException as exc:", "except AsyncfsError as exc:")
    vol = FakeVolume(b"x" * 100)
    ops = AsyncfsOperations(vol)
    fh = (await ops.open(12, 0, None)).fh
    vol.fail = exc
    handlers = {
        "lookup": lambda: ops.lookup(1, b"f"),
        "getattr": lambda: ops.getattr(12),
        "readlink": lambda: ops.readlink(12, None),
        "opendir": lambda: ops.opendir(1, None),
        "open": lambda: ops.open(12, 0, None),
        "read": lambda: ops.read(fh, 0, 10),
        "getxattr": lambda: ops.getxattr(12, b"user.a", None),
        "listxattr": lambda: ops.listxattr(12, None),
        "statfs": lambda: ops.statfs(None),
    }
    replies: dict[str, int | str] = {}
    for name, call in handlers.items():
        try:
            await call()
        except pyfuse3.FUSEError as e:
            replies[name] = e.errno
        except BaseException as e:  # escaped: no reply at all
            replies[name] = repr(e)
    mapped = variant == "kernel" or isinstance(exc, errors.AsyncfsError)
    assert (replies == dict.fromkeys(handlers, code)) == mapped, replies


async def test_unexpected_errors_are_counted_and_answers_are_not() -> None:
    vol = FakeVolume()
    ops = AsyncfsOperations(vol)
    vol.fail = errors.NoEntryError("x")
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(12)
    assert ops.requests_failed == 0
    vol.fail = RuntimeError("bug")
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(12)
    assert ops.requests_failed == 1


@pytest.mark.parametrize("variant", ["kernel", "first_piece"])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
async def test_read_returns_full_length_or_eof(
    chunk: int, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyfuse3 pads a short reply with zeros, so a short read mid-file would hand the reader
    zeros. Broken variant: return the first piece (`return first`) -> with chunk < size the
    result is short and this fails."""
    breaks(variant, monkeypatch, AsyncfsOperations, "_read_full",
           "if len(first) >= size or len(first) == 0:", "if True:")
    data = bytes(range(256)) * 400
    ops = AsyncfsOperations(FakeVolume(data, chunk=chunk))
    fh = (await ops.open(12, 0, None)).fh
    full = bytes(await ops.read(fh, 0, 65536)) == data[:65536]
    assert full == (variant == "kernel" or chunk >= 65536)
    if variant == "kernel":
        assert bytes(await ops.read(fh, 100000, 65536)) == data[100000:]  # EOF: short is right
        assert bytes(await ops.read(fh, len(data), 10)) == b""


class FrameVolume(FakeVolume):
    """Returns each piece as a view of one reused buffer, as the page cache returns a view of
    a page's frame, which is reused once the page is evicted: a view is valid only until the
    caller's next await."""

    def __init__(self, data: bytes, chunk: int) -> None:
        super().__init__(data, chunk)
        self.frame = bytearray(chunk)

    async def read(self, handle: Any, off: int, size: int) -> Any:
        await trio.lowlevel.checkpoint()
        piece = self.data[off : off + min(size, self.chunk)]
        self.frame[: len(piece)] = piece  # the previous piece's frame, reused
        return memoryview(self.frame)[: len(piece)]


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_read_copies_views_before_asking_again(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that needs several pieces copies each piece before it awaits the next, so a
    view of cache memory reused in between does not change bytes already gathered. Broken
    variant: keeping the pieces as returned (``parts = [first]``)."""
    breaks(variant, monkeypatch, AsyncfsOperations, "_read_full",
           "parts = [bytes(first)]", "parts = [first]")
    data = bytes(i % 251 for i in range(4 * 4096))  # every piece differs
    ops = AsyncfsOperations(FrameVolume(data, chunk=4096))
    fh = (await ops.open(12, 0, None)).fh
    got = bytes(await ops.read(fh, 0, 3 * 4096))
    assert (got == data[: 3 * 4096]) == (variant == "kernel")


async def test_write_paths_answer_erofs() -> None:
    ops = AsyncfsOperations(FakeVolume())
    for call in (lambda: ops.open(12, 1, None), lambda: ops.mkdir(1, b"d", 0o755, None),
                 lambda: ops.unlink(1, b"f", None), lambda: ops.setxattr(12, b"a", b"b", None),
                 lambda: ops.access(12, 2, None)):
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await call()
        assert ei.value.errno == errno.EROFS


async def test_root_reports_ext4_inode_number() -> None:
    """stat of the mount root shows ext4's 2 (as the kernel's mount does) while lookups name
    FUSE's node 1 for it."""
    ops = AsyncfsOperations(FakeVolume())
    assert (await ops.getattr(pyfuse3.ROOT_INODE)).st_ino == ROOT
    assert (await ops.lookup(pyfuse3.ROOT_INODE, b"..")).st_ino == pyfuse3.ROOT_INODE


@pytest.mark.parametrize("variant", ["kernel", "flush_succeeds"])
async def test_flush_answers_enosys_so_the_kernel_stops_sending_it(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(2) of a file sends FLUSH and waits for it until the daemon answers ENOSYS once
    (fc->no_flush); a read-only mount has nothing to flush, so it always answers ENOSYS.

    Broken variant: ``flush`` returning None (success: a FLUSH round trip on every close)."""
    breaks(variant, monkeypatch, AsyncfsOperations, "flush",
           "raise pyfuse3.FUSEError(errno.ENOSYS)", "return None")
    ops = AsyncfsOperations(FakeVolume())
    fi = await ops.open(12, 0, None)
    try:
        await ops.flush(fi.fh)
        answer = 0
    except pyfuse3.FUSEError as e:
        answer = e.errno
    assert (answer == errno.ENOSYS) == (variant == "kernel")
    await ops.release(fi.fh)


def test_errno_table_prefers_subclasses() -> None:
    assert errno_for(errors.ChecksumError("x")) == errno.EIO
    assert errno_for(errors.NoEntryError("x")) == errno.ENOENT
    assert errno_for(ValueError()) == errno.EIO


def _record_stores(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bytes]]:
    """pyfuse3.notify_store needs a live FUSE session; record the calls instead (the mount
    test test_small_file_is_in_the_page_cache_after_open checks the kernel's side)."""
    stores: list[tuple[int, int, bytes]] = []

    def store(inode: int, offset: int, data: bytes) -> None:
        stores.append((inode, offset, bytes(data)))

    monkeypatch.setattr(pyfuse3, "notify_store", store)
    return stores


_PUSH_BROKEN = {
    "no_open_check": ("open", "and ino not in self._open_count", "and True"),
    "one_read": ("_push", "data = await self._read_full(handle, 0, size)",
                 "data = await self.volume.read(handle, 0, size)"),
    "no_pushed_memory": ("open", "and ino not in self._pushed", "and True"),
}


@pytest.mark.parametrize("variant", ["kernel", *_PUSH_BROKEN])
async def test_small_file_is_pushed_whole_once_and_not_while_open(
    variant: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broken variants: no open-handle check (the second open, while the first handle is
    open and a READ of it could hold page locks, stores again); one volume.read instead of
    reading to EOF (the chunked volume gives a short piece: nothing stored); no ``_pushed``
    memory (the reopen stores again)."""
    if variant != "kernel":
        breaks(variant, monkeypatch, AsyncfsOperations, *_PUSH_BROKEN[variant])
    stores = _record_stores(monkeypatch)
    data = bytes(range(256)) * 40
    ops = AsyncfsOperations(FakeVolume(data, chunk=1000))
    fi0 = await ops.open(12, os.O_RDONLY, None)
    assert stores == []  # before FUSE_INIT there is no session to store into
    ops.init()
    fi1 = await ops.open(12, os.O_RDONLY, None)
    seen = [stores == []]  # fi0 is open: a READ through it may be holding page locks
    await ops.release(fi0.fh)
    await ops.release(fi1.fh)
    stores.clear()
    fi1 = await ops.open(12, os.O_RDONLY, None)
    seen.append(stores == [(12, 0, data)])
    fi2 = await ops.open(12, os.O_RDONLY, None)
    seen.append(len(stores) == 1)
    await ops.release(fi1.fh)
    await ops.release(fi2.fh)
    fi3 = await ops.open(12, os.O_RDONLY, None)
    seen.append(len(stores) == 1)
    assert all(seen) == (variant == "kernel"), seen
    assert bytes(await ops.read(fi3.fh, 0, len(data) + 10)) == data  # READ still serves


@pytest.mark.parametrize("variant", ["kernel", "no_size_check"])
async def test_push_is_skipped_where_it_cannot_help(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large files, O_DIRECT opens, -o direct_io and empty files are never stored; a failed
    store or a failing read leaves the open working and the error to READ.

    Broken variant: no size check (the PUSH_MAX + 1 byte file is stored)."""
    breaks(variant, monkeypatch, AsyncfsOperations, "_push",
           "if not 0 < size <= PUSH_MAX:", "if not 0 < size:")
    stores = _record_stores(monkeypatch)
    big = AsyncfsOperations(FakeVolume(b"x" * (PUSH_MAX + 1)))
    big.init()
    await big.open(12, os.O_RDONLY, None)
    assert (stores == []) == (variant == "kernel")
    if variant != "kernel":
        return
    direct = AsyncfsOperations(FakeVolume(b"abc"))
    direct.init()
    await direct.open(12, os.O_RDONLY | os.O_DIRECT, None)
    dio = AsyncfsOperations(FakeVolume(b"abc"), direct_io=True)
    dio.init()
    await dio.open(12, os.O_RDONLY, None)
    empty = AsyncfsOperations(FakeVolume(b""))
    empty.init()
    await empty.open(12, os.O_RDONLY, None)
    assert stores == []

    def refuse(inode: int, offset: int, data: bytes) -> None:
        raise OSError(errno.ENOENT, "no such inode in the kernel")

    monkeypatch.setattr(pyfuse3, "notify_store", refuse)
    ops = AsyncfsOperations(FakeVolume(b"abc"))
    ops.init()
    fi = await ops.open(12, os.O_RDONLY, None)
    assert ops.pushed_files == 0
    assert bytes(await ops.read(fi.fh, 0, 10)) == b"abc"

    class BadRead(FakeVolume):
        async def read(self, handle: Any, off: int, size: int) -> bytes:
            raise errors.DeviceIOError("bad sector")

    bad = AsyncfsOperations(BadRead(b"abc"))
    bad.init()
    fi = await bad.open(12, os.O_RDONLY, None)  # the open works ...
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await bad.read(fi.fh, 0, 3)  # ... and the reader gets the EIO
    assert ei.value.errno == errno.EIO
