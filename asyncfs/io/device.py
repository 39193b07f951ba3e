"""The block-device interface every backend implements, and that the engine reads through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from asyncfs.errors import DeviceIOError

# ``(data, None)`` or ``(None, error)``; ``data`` is a view valid only during the call.
ReadCallback = Callable[[memoryview | None, DeviceIOError | None], None]
# ``(None, True)`` when the caller's buffers hold the bytes; ``(error, released)`` when not,
# ``released`` False if the kernel may still write into them (never reuse them then).
IntoCallback = Callable[[DeviceIOError | None, bool], None]


class BlockDevice(Protocol):
    """A read-only byte-addressed device: a whole image, a partition of one, or a test double.

    ``read`` returns exactly ``length`` bytes at ``offset`` (the engine asks page-aligned,
    page-multiple ranges that may end at ``size``, where the tail is short). It raises
    ``DeviceIOError`` for an I/O error or a range past ``size``; it never blocks the trio thread.
    """

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """Non-blocking probe (``preadv2(RWF_NOWAIT)``): the bytes if the host has them cached,
        else ``None``. Backends that cannot probe return ``None``."""
        ...

    async def aclose(self) -> None: ...


class CallbackReads(Protocol):
    """Optional: backends that can complete a read by calling back instead of waking a task
    (io_uring). ``submit_read`` returns ``False`` when it cannot start the read now (queue
    full); the caller then uses ``read``. It may raise ``DeviceIOError`` where ``read`` would
    (a closed device, a range past the end). The callback runs on the trio thread, exactly
    once, with ``(data, None)`` or ``(None, error)``; ``data`` is a view of the backend's
    buffer, valid only during the call (copy what you keep)."""

    def submit_read(self, offset: int, length: int, callback: ReadCallback) -> bool: ...


class IntoReads(Protocol):
    """Optional: backends that read straight into the caller's buffers (one iovec each), so
    the page cache's frames are filled without a bounce buffer or a copy.

    ``submit_read_into`` starts a read of ``sum(len(v) for v in views)`` bytes at ``offset``
    (the read starts ``delay`` seconds from now); ``False`` when it cannot start it now (queue
    full, or an O_DIRECT span the buffers cannot take): the caller reads another way. The
    callback runs on the trio thread exactly once. ``read_nowait_into`` is the
    ``RWF_NOWAIT`` probe into the buffers: ``True`` only if all of them were filled."""

    def submit_read_into(
        self, offset: int, views: list[memoryview], callback: IntoCallback, delay: float = 0.0
    ) -> bool: ...

    def read_nowait_into(self, offset: int, views: list[memoryview]) -> bool: ...
