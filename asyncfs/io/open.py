"""``open_image``: the one entry point that turns a path and mount options into a BlockDevice
whose offset 0 is the filesystem's first byte.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from typing import Literal

import trio

from asyncfs.errors import ImageError
from asyncfs.io.device import BlockDevice
from asyncfs.io.format import FileOpener, open_format
from asyncfs.io.image import open_readonly, resolve_window
from asyncfs.io.nbd import NbdDevice, is_nbd_uri
from asyncfs.io.qcow2 import MAGIC as QCOW2_MAGIC
from asyncfs.io.remote import RemoteOptions, is_remote_url, open_remote
from asyncfs.io.threads import ThreadDevice
from asyncfs.io.uring import UringDevice, UringUnavailable
from asyncfs.io.window import open_window

log = logging.getLogger(__name__)

# Chosen by measurement (docs/io.md, docs/benchmarks.md). The default is hybrid. Reads of
# DIRECT_MIN bytes or more (readahead windows: streams) go O_DIRECT: a cold 2 GiB stream ran at
# 860-890 MiB/s and 1.1 CPU-s/GiB that way, against 340-490 MiB/s and 2.1-3.0 CPU-s/GiB
# buffered, which copies every byte once more and caches it a second time under the FUSE
# page cache. Smaller reads (random blocks, metadata) go through the host page cache with the
# kernel's readahead off (POSIX_FADV_RANDOM: the engine decides readahead), which then serves
# as a second-level cache: a block asyncfs evicted comes back through the RWF_NOWAIT probe
# with no I/O, as the kernel's loop mount and fuse2fs get it.
DIRECT_MIN = 128 * 1024
URING_DEPTH = 128


def _set_direct(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT; False where the filesystem refuses it (tmpfs: EINVAL)."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return True


async def open_image(
    path: str | os.PathLike[str],
    *,
    backend: Literal["auto", "uring", "threads"] = "auto",
    direct: bool | None = None,
    partition: int | None = None,
    offset: int | None = None,
    sizelimit: int | None = None,
    threads: int = 16,
    remote: RemoteOptions | None = None,
) -> BlockDevice:
    """Open ``path`` read-only and return the device for the chosen filesystem window.

    ``path`` is a raw or qcow2 image file (told by its magic), or an NBD URI
    (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``) serving either.

    ``direct=None`` takes the measured default, hybrid: reads of ``DIRECT_MIN`` bytes or more
    go O_DIRECT (where the filesystem allows it), smaller ones through the host page cache;
    ``direct=False``: every read through the host page cache; ``direct=True``: every read
    O_DIRECT;
    ``backend="auto"`` uses io_uring and falls back to threads where the ring cannot be set up
    (logging one line that says why, kept in the device's ``backend_note``); ``"uring"``
    without a ring is an ImageError.
    Raises ImageError with a one-line message for anything the user must fix.
    """
    p = os.fspath(path)
    if backend not in ("auto", "uring", "threads"):
        raise ImageError(f"unknown I/O backend {backend!r} (auto, uring, threads)")
    if is_remote_url(p):  # http(s):// or s3://, with the options in ``remote``
        return await _open_layered(await open_remote(p, remote), None, None,
                                   partition=partition, offset=offset, sizelimit=sizelimit)
    if is_nbd_uri(p):
        return await _open_layered(await NbdDevice.connect(p), None, None, partition=partition,
                                   offset=offset, sizelimit=sizelimit)
    fd, size = await trio.to_thread.run_sync(open_readonly, p)
    try:
        # A raw image's window is resolved on the descriptor (the fast path); a qcow2 image
        # gets a device stack: file -> qcow2 guest disk -> window.
        window = await trio.to_thread.run_sync(
            lambda: None if os.pread(fd, 4, 0) == QCOW2_MAGIC else resolve_window(
                fd, size, p, partition=partition, offset=offset, sizelimit=sizelimit)
        )
    except BaseException:
        os.close(fd)
        raise
    if window is None:
        async def open_file(fp: str) -> BlockDevice:
            ffd, fsize = await trio.to_thread.run_sync(open_readonly, fp)
            return await _file_device(ffd, fp, 0, fsize, backend=backend, direct=direct,
                                      threads=threads)

        filedev = await _file_device(fd, p, 0, size, backend=backend, direct=direct,
                                     threads=threads)
        return await _open_layered(filedev, p, open_file, partition=partition, offset=offset,
                                   sizelimit=sizelimit)
    return await _file_device(fd, p, *window, backend=backend, direct=direct, threads=threads)


async def _open_layered(transport: BlockDevice, path: str | None, open_file: FileOpener | None,
                        *, partition: int | None, offset: int | None, sizelimit: int | None,
                        ) -> BlockDevice:
    """transport -> format (raw or qcow2 with its backing chain) -> window; all of it closed
    on error."""
    dev = transport
    try:
        dev = await open_format(transport, path_for_backing=path, open_file=open_file)
        return await open_window(dev, partition=partition, offset=offset, sizelimit=sizelimit)
    except BaseException:
        with trio.CancelScope(shield=True):
            await dev.aclose()
        raise


async def _file_device(
    fd: int, p: str, base: int, length: int, *, backend: Literal["auto", "uring", "threads"],
    direct: bool | None, threads: int,
) -> BlockDevice:
    """The backend device for ``[base, base + length)`` of the open image ``fd`` (which it
    then owns: closed here on error)."""
    dfd = -1
    try:
        use_direct = bool(direct)
        if direct and not _set_direct(fd):
            raise ImageError(f"{p}: O_DIRECT is not supported on this filesystem")
        if not use_direct:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if direct is None:
            dfd = _direct_twin(fd)
            if dfd < 0:
                log.debug("%s: O_DIRECT refused; every read goes through the host cache", p)
        dmin = DIRECT_MIN if dfd >= 0 else 0
        fallback: str | None = None
        if backend in ("auto", "uring"):
            try:
                return await UringDevice.create(fd, base=base, size=length, direct=use_direct,
                                                path=p, depth=URING_DEPTH, direct_fd=dfd,
                                                direct_min=dmin)
            except UringUnavailable as err:
                if backend == "uring":
                    raise ImageError(f"backend=uring: io_uring is unavailable: {err}") from None
                fallback = f"io_uring is unavailable ({err})"
                log.info("%s; serving through the threads backend", fallback)
        dev = ThreadDevice(fd, base=base, size=length, direct=use_direct, path=p,
                           threads=threads, direct_fd=dfd, direct_min=dmin)
        dev.backend_note = fallback
        return dev
    except BaseException:
        os.close(fd)
        if dfd >= 0:
            os.close(dfd)
        raise


def _direct_twin(fd: int) -> int:
    """A second descriptor of the image ``fd`` holds, switched to O_DIRECT; -1 where the
    filesystem refuses O_DIRECT (tmpfs). Reopened through /proc/self/fd, so it is the very
    file ``fd`` holds even if its path was replaced since."""
    dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _set_direct(dfd):
            return dfd
    except BaseException:
        os.close(dfd)
        raise
    os.close(dfd)
    return -1
