"""pyfuse3 Operations over an engine Volume: convert values, loop short reads, map errors.

Invariant 15 lives here: every handler replies exactly once. pyfuse3 replies for a returned value
or a raised FUSEError; any other exception would escape into pyfuse3's worker loop and end the
whole mount, so every handler funnels failures through ``_fail``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar, cast

import pyfuse3
import trio

from asyncfs.engine.seen import RecentlySeen
from asyncfs.errors import AsyncfsError, CorruptionError, DeviceIOError
from asyncfs.fuse.errnos import errno_for
from asyncfs.types import Attr, DirEntry, StatFs

log = logging.getLogger("asyncfs.fuse")

# The image never changes while mounted, so the kernel may cache names and attributes for as
# long as it likes; a day keeps `find` and `stat` off the FUSE channel on every repeat.
CACHE_TIMEOUT = 86400.0

# Files up to this size have their bytes stored into the kernel's page cache while their OPEN
# is answered (FUSE_NOTIFY_STORE), so reading them needs no READ round trip: one READ reply's
# worth (the kernel's max_read window, 128 KiB).
PUSH_MAX = 128 * 1024
_PUSHED_MAX = 16384  # inodes already stored (the kernel keeps them: keep_cache), bounded

T = TypeVar("T")


class VolumeLike(Protocol):
    """The engine Volume surface the adapter calls (see asyncfs/engine/volume.py)."""

    root_ino: int

    async def getattr(self, ino: int) -> Attr: ...
    async def lookup(self, parent_ino: int, name: bytes) -> Attr: ...
    async def readdir(self, ino: int, off: int) -> list[DirEntry]: ...
    async def readlink(self, ino: int) -> bytes: ...
    async def open(self, ino: int) -> Any: ...
    async def read(self, handle: Any, off: int, size: int) -> bytes | memoryview: ...
    async def getxattr(self, ino: int, name: bytes) -> bytes: ...
    async def listxattr(self, ino: int) -> list[bytes]: ...
    def statfs(self) -> StatFs: ...


# Distinct failure messages already logged: a damaged object is logged once, not on every
# request that meets it (a loop of `ls -l` must not grow the log without bound).
_LOGGED = RecentlySeen(4096)

# ext4 EXT4_FT_* -> S_IFMT bits, for a readdirplus entry whose inode cannot be read
_FT_MODE = {1: 0o100000, 2: 0o040000, 3: 0o020000, 4: 0o060000, 5: 0o010000, 6: 0o140000,
            7: 0o120000}


def _log_once(level: int, msg: str, exc: BaseException | None = None) -> None:
    if _LOGGED.add(msg):
        log.log(level, msg, exc_info=exc)


def _fail(exc: BaseException, what: str) -> NoReturn:
    code = errno_for(exc)
    if isinstance(exc, (CorruptionError, DeviceIOError)):
        _log_once(logging.WARNING, f"{what}: {exc}")
    elif not isinstance(exc, AsyncfsError):
        _log_once(logging.ERROR, f"{what}: unexpected {type(exc).__name__}: {exc}", exc)
    raise pyfuse3.FUSEError(code) from None


def _unreadable_entry(ent: DirEntry) -> pyfuse3.EntryAttributes:
    """A readdirplus entry for a child whose inode cannot be read: the name is listed (as
    ext4's readdir lists it) with zero timeouts, so the kernel's next lookup or stat of it
    reaches us again and gets the error."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ent.ino
    e.st_mode = _FT_MODE.get(ent.file_type, 0o100000)
    e.st_nlink = 1
    e.entry_timeout = 0
    e.attr_timeout = 0
    return e


def _entry(attr: Attr, root_ino: int | None) -> pyfuse3.EntryAttributes:
    """EntryAttributes for ``attr``. ``root_ino`` given: this names a FUSE node (lookup,
    readdirplus), so ext4's root becomes FUSE's node 1. ``None``: only the attributes are used
    (getattr, "." and ".." in readdirplus, which the kernel never links), so st_ino stays the
    ext4 number and ``stat`` shows 2 for the root, as the kernel's own mount does."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.ROOT_INODE if attr.ino == root_ino else attr.ino
    e.generation = attr.generation
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = attr.blksize
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    e.st_birthtime_ns = attr.crtime_ns
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    return e


class AsyncfsOperations(pyfuse3.Operations):  # type: ignore[misc]
    """Read-only handlers. Inode numbers are ext4's, except FUSE's root (1) is ext4's root (2)."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, volume: VolumeLike, *, direct_io: bool = False, push_small_files: bool = True
    ) -> None:
        super().__init__()
        self.volume = volume
        self.direct_io = direct_io
        self.push_small_files = push_small_files and not direct_io
        self._root = volume.root_ino
        self._handles: dict[int, Any] = {}
        self._fh_ino: dict[int, int] = {}
        self._open_count: dict[int, int] = {}  # inode -> handles open on it
        self._pushed = RecentlySeen(_PUSHED_MAX)
        self.pushed_files = 0
        self._next_fh = 1
        self.requests_failed = 0
        # set once the kernel's FUSE_INIT has been answered: connection tunables written
        # before then are overwritten by the kernel's processing of the INIT reply
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()

    def _ino(self, fuse_ino: int) -> int:
        return self._root if fuse_ino == pyfuse3.ROOT_INODE else fuse_ino

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except pyfuse3.FUSEError:
            raise
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException as exc:  # one reply per request, whatever failed
            if isinstance(exc, (CorruptionError, DeviceIOError)) or not isinstance(
                exc, AsyncfsError
            ):
                self.requests_failed += 1  # damage or a bug; ENOENT/ENODATA are answers
            _fail(exc, what)

    # --- names and attributes -------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._ino(parent_inode)

        async def go() -> pyfuse3.EntryAttributes:
            if name == b".":
                return _entry(await self.volume.getattr(parent), self._root)
            if name == b".." and parent == self._root:
                return _entry(await self.volume.getattr(self._root), self._root)
            return _entry(await self.volume.lookup(parent, name), self._root)

        return await self._call("lookup", go)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        ino = self._ino(inode)
        return await self._call(
            "getattr", lambda: self._getattr_entry(ino)
        )

    async def _getattr_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        return _entry(await self.volume.getattr(ino), None)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        ino = self._ino(inode)
        return await self._call("readlink", lambda: self.volume.readlink(ino))

    async def forget(self, inode_list: Any) -> None:
        # Inode numbers are stable on-disk numbers; there is no per-lookup state to drop.
        return None

    # --- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        ino = self._ino(inode)

        async def go() -> int:
            attr = await self.volume.getattr(ino)
            if (attr.mode & 0o170000) != 0o040000:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return ino

        return await self._call("opendir", go)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        async def go() -> None:
            off = start_id
            while True:
                batch = await self.volume.readdir(fh, off)
                if not batch:
                    return
                for ent in batch:
                    dots = ent.name in (b".", b"..")
                    try:
                        attr = await self.volume.getattr(ent.ino)
                    except AsyncfsError as exc:
                        if dots:
                            raise
                        _log_once(logging.WARNING, f"readdir: inode {ent.ino}: {exc}")
                        entry = _unreadable_entry(ent)
                    else:
                        entry = _entry(attr, None if dots else self._root)
                    if not pyfuse3.readdir_reply(token, ent.name, entry, ent.next_off):
                        return
                    off = ent.next_off

        await self._call("readdir", go)

    async def releasedir(self, fh: int) -> None:
        return None

    # --- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        ino = self._ino(inode)
        handle = await self._call("open", lambda: self.volume.open(ino))
        if (
            self.push_small_files
            and not flags & os.O_DIRECT
            and ino not in self._open_count
            and ino not in self._pushed
            and self.initialized.is_set()
        ):
            await self._push(inode, ino, handle)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        self._fh_ino[fh] = ino
        self._open_count[ino] = self._open_count.get(ino, 0) + 1
        # keep_cache: the image cannot change under us, so the kernel's copy stays valid.
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=not self.direct_io)

    async def read(self, fh: int, off: int, size: int) -> Any:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)

        return await self._call("read", lambda: self._read_full(handle, off, size))

    async def _read_full(self, handle: Any, off: int, size: int) -> bytes | memoryview:
        # pyfuse3 pads a short reply with zeros up to the request size, so anything short
        # of `size` must be EOF: keep asking until the volume says there is no more.
        first = await self.volume.read(handle, off, size)
        if len(first) >= size or len(first) == 0:
            return first  # replied before this task awaits again: a view of the cache is fine
        # A view the volume returns is valid only until the next await: copy each piece.
        parts = [bytes(first)]
        got = len(first)
        while got < size:
            more = await self.volume.read(handle, off + got, size - got)
            if not more:
                break
            parts.append(bytes(more))
            got += len(more)
        return b"".join(parts)

    async def _push(self, fuse_ino: int, ino: int, handle: Any) -> None:
        """Store a small file's bytes in the kernel's page cache before OPEN is answered.

        Only when no other handle of the inode is open: then no READ of it can be queued or
        running, so no page of it is locked waiting on this daemon, and ``notify_store`` (a
        write to /dev/fuse on this thread) cannot block on one (a READ is only sent through an
        open file, and RELEASE only comes after its READs). The store covers exactly
        ``[0, i_size)``: it never extends the kernel's size, and the kernel zeroes the tail
        page beyond EOF. A hint: any failure leaves the READ path to serve (and report).
        """
        try:
            size = (await self.volume.getattr(ino)).size
            if not 0 < size <= PUSH_MAX:
                return
            data = await self._read_full(handle, 0, size)
            if len(data) != size:
                return  # short (a damaged map): let READ serve what there is
            # any contiguous buffer will do (PyObject_GetBuffer): no copy of a memoryview
            pyfuse3.notify_store(fuse_ino, 0, cast(bytes, data))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:  # the file is still opened; READ reports real errors
            _log_once(logging.DEBUG, f"notify_store of inode {ino} skipped: {exc}")
            return
        self.pushed_files += 1
        self._pushed.add(ino)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        ino = self._fh_ino.pop(fh, None)
        if ino is not None:
            left = self._open_count.get(ino, 0) - 1
            if left > 0:
                self._open_count[ino] = left
            else:
                self._open_count.pop(ino, None)

    async def flush(self, fh: int) -> None:
        # Nothing to write back. ENOSYS (not success) makes the kernel set fc->no_flush and
        # stop sending FLUSH on every close(2): one request less per file a `cat` reads.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # --- xattrs and the rest --------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        ino = self._ino(inode)
        return await self._call("getxattr", lambda: self.volume.getxattr(ino, name))

    async def listxattr(self, inode: int, ctx: Any) -> Any:
        ino = self._ino(inode)
        return await self._call("listxattr", lambda: self.volume.listxattr(ino))

    async def statfs(self, ctx: Any) -> Any:
        async def go() -> pyfuse3.StatvfsData:
            s = self.volume.statfs()
            out = pyfuse3.StatvfsData()
            out.f_bsize = s.bsize
            out.f_frsize = s.frsize
            out.f_blocks = s.blocks
            out.f_bfree = s.bfree
            out.f_bavail = s.bavail
            out.f_files = s.files
            out.f_ffree = s.ffree
            out.f_favail = s.ffree
            out.f_namemax = s.namemax
            return out

        return await self._call("statfs", go)

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # --- every write path: read-only file system ------------------------------------------

    async def _erofs(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    write = create = setxattr = removexattr = _erofs

