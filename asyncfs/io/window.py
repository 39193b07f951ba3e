"""The filesystem's window inside any BlockDevice: ``open_window`` picks it (``partition=N``,
``offset=/sizelimit=``, or the one ext2/3/4 partition) by reading the partition table through
the device, and ``WindowDevice`` serves it.

This is the device-level twin of ``resolve_window`` on a file descriptor (``image.py``), for
every stack that is not a raw local file: a qcow2 guest disk, an NBD export, remote objects.

    dev = await open_window(await open_format(transport, path_for_backing=path),
                            partition=2, name=path)
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from asyncfs.errors import DeviceIOError
from asyncfs.io.device import BlockDevice, IntoCallback, ReadCallback
from asyncfs.io.image import ImageInfo, describe_reader, resolve_window_reader


class WindowDevice:
    """Bytes ``[start, start + size)`` of ``inner`` as offsets ``[0, size)``. Passes the
    optional fast paths (callback reads, reads into buffers, non-blocking probes) through."""

    def __init__(self, inner: BlockDevice, start: int, size: int) -> None:
        if start < 0 or size < 0 or start + size > inner.size:
            raise ValueError(f"window {start}+{size} exceeds the device ({inner.size} bytes)")
        self.inner = inner
        self.start = start
        self._size = size
        self.backend_name: str = str(getattr(inner, "backend_name", type(inner).__name__))
        self.backend_note: str | None = getattr(inner, "backend_note", None)
        self.path: str = str(getattr(inner, "path", "device"))
        self._into: Callable[..., bool] | None = getattr(inner, "submit_read_into", None)
        self._nowait_into: Callable[..., bool] | None = getattr(inner, "read_nowait_into", None)
        self._submit: Callable[..., bool] | None = getattr(inner, "submit_read", None)

    @property
    def size(self) -> int:
        return self._size

    def _ok(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self._size

    def _check(self, offset: int, length: int) -> None:
        if not self._ok(offset, length):
            raise DeviceIOError(f"read of {length} bytes at {offset} is past the end of "
                                f"{self.path}'s window ({self._size} bytes)")

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check(offset, length)
        return await self.inner.read(self.start + offset, length)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        if not self._ok(offset, length):
            return None
        return self.inner.read_nowait(self.start + offset, length)

    def submit_read(self, offset: int, length: int, callback: ReadCallback) -> bool:
        self._check(offset, length)
        return self._submit is not None and bool(
            self._submit(self.start + offset, length, callback))

    def submit_read_into(self, offset: int, views: list[memoryview], callback: IntoCallback,
                         delay: float = 0.0) -> bool:
        self._check(offset, sum(map(len, views)))
        return self._into is not None and bool(
            self._into(self.start + offset, views, callback, delay))

    def read_nowait_into(self, offset: int, views: list[memoryview]) -> bool:
        if self._nowait_into is None or not self._ok(offset, sum(map(len, views))):
            return False
        return bool(self._nowait_into(self.start + offset, views))

    async def aclose(self) -> None:
        await self.inner.aclose()


def blocking_reader(dev: BlockDevice) -> Callable[[int, int], bytes]:
    """A sync ``read(offset, length)`` of ``dev`` for code running in a trio worker thread
    (``trio.to_thread.run_sync``): each call runs ``dev.read`` on the trio thread. Short at the
    end of the device, as the partition parser expects."""

    def read(off: int, length: int) -> bytes:
        if off < 0 or off >= dev.size or length <= 0:
            return b""
        n = min(length, dev.size - off)
        return bytes(trio.from_thread.run(dev.read, off, n))

    return read


async def describe_device(dev: BlockDevice, name: str) -> ImageInfo:
    """``asyncfs info``'s partition listing, read through ``dev``."""
    return await trio.to_thread.run_sync(describe_reader, blocking_reader(dev), dev.size, name)


async def open_window(dev: BlockDevice, *, partition: int | None = None,
                      offset: int | None = None, sizelimit: int | None = None,
                      name: str | None = None) -> BlockDevice:
    """The device for the filesystem inside ``dev``, chosen as ``open_image`` chooses it in a
    file: ``dev`` itself when that is the whole of it, else a WindowDevice. ImageError (one
    line, naming ``name``) for a bad choice. Does not close ``dev`` on error."""
    label = name or str(getattr(dev, "path", "image"))
    start, length = await trio.to_thread.run_sync(
        lambda: resolve_window_reader(blocking_reader(dev), dev.size, label,
                                      partition=partition, offset=offset, sizelimit=sizelimit))
    if start == 0 and length == dev.size:
        return dev
    return WindowDevice(dev, start, length)
