"""What every local-file backend shares: the open image, the window it serves, bounds checks,
O_DIRECT alignment arithmetic and the ``RWF_NOWAIT`` probe.

A backend serves the byte window ``[base, base + size)`` of the image file as device offsets
``[0, size)``; with O_DIRECT it widens each read to 4 KiB-aligned file offsets and copies the
asked-for bytes out, so partitions at any byte offset (MBR sector 63) work.

The default is *hybrid*: two descriptors of the same image, a buffered one for small reads
(the host page cache then serves as a second-level cache that the ``RWF_NOWAIT`` probe reads
without I/O) and an O_DIRECT twin for reads of ``direct_min`` bytes or more (readahead
windows: streams are not cached a second and third time, nor copied twice).

The probe is one syscall on the trio thread, and on a cold page it also starts the device
read there (block layer, virtio notification: ~25 µs on this VM, 30% of the daemon's CPU on
cold random reads). So it backs off: after ``PROBE_BACKOFF`` misses in a row only one call in
``PROBE_SAMPLE`` probes, until one finds the bytes cached again. Skipping it costs a cached
read one ring round trip; a cold read starts its I/O in the ring instead, once.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from asyncfs.errors import DeviceIOError
from asyncfs.io.buffers import ALIGN, AlignedPool, align_down, align_up

PROBE_BACKOFF = 16  # probe misses in a row before probing backs off
PROBE_SAMPLE = 32  # while backed off, one call in this many still probes


def describe_oserror(err: OSError) -> str:
    code = err.errno if err.errno is not None else errno.EIO
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


class FileDeviceBase:
    """Bounds, alignment and the non-blocking probe; subclasses supply ``read``/``aclose``."""

    backend_name = "file"

    def __init__(
        self, fd: int, *, base: int, size: int, direct: bool, path: str, direct_fd: int = -1,
        direct_min: int = 0,
    ) -> None:
        self._fd = fd
        self._base = base
        self._size = size
        self.direct = direct  # how ``fd`` was opened
        self.path = path
        self._dfd = direct_fd  # hybrid: the O_DIRECT twin of a buffered ``fd``, else -1
        self._direct_min = direct_min
        self._pool = AlignedPool()
        self._probe_buf = bytearray()
        self._probe_misses = 0  # in a row
        self._probe_skips = 0  # since the last sampled probe while backed off
        self.probes_skipped = 0
        self.backend_note: str | None = None  # why this backend serves, where it was not chosen
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def hybrid(self) -> bool:
        return self._dfd >= 0

    def _route(self, length: int) -> tuple[int, bool]:
        """The descriptor a read of ``length`` bytes goes through, and whether it is O_DIRECT."""
        if self._dfd >= 0 and length >= self._direct_min:
            return self._dfd, True
        return self._fd, self.direct

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise DeviceIOError(f"read of {length} bytes at {offset}: device {self.path} is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DeviceIOError(
                f"read of {length} bytes at {offset} is past the end of {self.path}"
                f" ({self._size} bytes)"
            )

    def _span(self, offset: int, length: int, direct: bool) -> tuple[int, int, int]:
        """(file offset to read at, bytes to read, where the wanted bytes start in the buffer)."""
        pos = self._base + offset
        if not direct:
            return pos, length, 0
        start = align_down(pos)
        return start, align_up(pos + length) - start, pos - start

    def _io_error(self, offset: int, length: int, why: str) -> DeviceIOError:
        return DeviceIOError(f"read of {length} bytes at {offset} of {self.path} failed: {why}")

    def _may_probe(self, offset: int, length: int) -> bool:
        """Whether to probe this read (buffered, in bounds, and not backed off)."""
        if self._route(length)[1] or self._closed or length <= 0:
            return False
        if offset < 0 or offset + length > self._size:
            return False
        if self._probe_misses >= PROBE_BACKOFF:
            self._probe_skips += 1
            if self._probe_skips < PROBE_SAMPLE:
                self.probes_skipped += 1
                return False
            self._probe_skips = 0
        return True

    def _probe(self, views: list[memoryview], offset: int, length: int) -> bool:
        try:
            got = os.preadv(self._fd, views, self._base + offset, os.RWF_NOWAIT)
        except OSError:
            got = -1  # EAGAIN (not cached) or a real error the blocking read will report
        if got != length:
            self._probe_misses += 1
            return False
        self._probe_misses = 0
        return True

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The bytes if the host page cache holds them all (buffered reads only), else None."""
        if not self._may_probe(offset, length):
            return None
        # One scratch buffer for every probe (they run one at a time, on the trio thread):
        # most probes of a cold range fail, and a fresh zeroed buffer each time cost more than
        # the syscall.
        if len(self._probe_buf) < length:
            self._probe_buf = bytearray(length)
        with memoryview(self._probe_buf)[:length] as view:
            return view.tobytes() if self._probe([view], offset, length) else None

    def read_nowait_into(self, offset: int, views: list[memoryview]) -> bool:
        """``read_nowait`` straight into ``views`` (``IntoReads``): True if all were filled.
        On False their contents are undefined."""
        length = sum(map(len, views))
        return self._may_probe(offset, length) and self._probe(views, offset, length)

    def _into_span(self, offset: int, views: list[memoryview]) -> tuple[int, int, int] | None:
        """``(fd, file position, length)`` of a read straight into ``views`` (page-aligned
        buffers: the page cache's frames), or None when O_DIRECT cannot take them: an
        unaligned file position (a partition's start) or length (the device's short last
        page)."""
        length = sum(map(len, views))
        self._check(offset, length)
        fd, direct = self._route(length)
        pos = self._base + offset
        if direct and (pos % ALIGN or any(len(v) % ALIGN for v in views)):
            return None
        return fd, pos, length

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1


_log = logging.getLogger(__name__)


def call_completion(callback: Callable[..., None], *args: object) -> None:
    """Call a completion callback (``ReadCallback`` or ``IntoCallback``), which may not raise:
    the backends run it inside the scheduler's instrument hooks, which trio drops for good if
    they raise."""
    try:
        callback(*args)
    except Exception:
        _log.exception("read completion callback failed")


def skip_views(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (the rest of a short read)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out
