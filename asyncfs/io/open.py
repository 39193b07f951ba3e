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
from asyncfs.io.image import open_readonly, resolve_window
from asyncfs.io.threads import ThreadDevice
from asyncfs.io.uring import UringDevice, UringUnavailable

log = logging.getLogger(__name__)

# Chosen by measurement (docs/io.md, docs/benchmarks.md): buffered reads keep the host page
# cache as a second-level cache, reclaimable by the kernel, from which the RWF_NOWAIT probe
# serves a block asyncfs evicted without I/O (as the kernel's loop mount and fuse2fs get it).
# The kernel's own readahead on the image is switched off (POSIX_FADV_RANDOM): the engine
# decides readahead. O_DIRECT (-o odirect) streams a cold file ~20% faster but makes every
# second pass over more than the cache a device read again.
DEFAULT_DIRECT = False
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
) -> BlockDevice:
    """Open ``path`` read-only and return the device for the chosen filesystem window.

    ``direct=None`` takes the measured default (buffered, host readahead off);
    ``backend="auto"`` uses io_uring and falls back to threads where the ring cannot be set up.
    Raises ImageError with a one-line message for anything the user must fix.
    """
    p = os.fspath(path)
    if backend not in ("auto", "uring", "threads"):
        raise ImageError(f"unknown I/O backend {backend!r} (auto, uring, threads)")
    fd, size = await trio.to_thread.run_sync(open_readonly, p)
    try:
        base, length = await trio.to_thread.run_sync(
            lambda: resolve_window(fd, size, p, partition=partition, offset=offset,
                                   sizelimit=sizelimit)
        )
        use_direct = DEFAULT_DIRECT if direct is None else direct
        if use_direct and not _set_direct(fd):
            if direct:
                raise ImageError(f"{p}: O_DIRECT is not supported on this filesystem")
            log.debug("%s: O_DIRECT refused; using buffered reads", p)
            use_direct = False
        if not use_direct:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if backend in ("auto", "uring"):
            try:
                return await UringDevice.create(fd, base=base, size=length, direct=use_direct,
                                                path=p, depth=URING_DEPTH)
            except UringUnavailable as err:
                if backend == "uring":
                    raise ImageError(f"io_uring is unavailable: {err}") from None
                log.debug("io_uring unavailable (%s); using %d threads", err, threads)
        return ThreadDevice(fd, base=base, size=length, direct=use_direct, path=p,
                            threads=threads)
    except BaseException:
        os.close(fd)
        raise
