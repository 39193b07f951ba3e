"""Block devices and file maps made of memory, for the engine's tests and the engine benchmarks.

``MemoryDevice`` serves bytes from memory (optionally after a trio sleep). ``GatedDevice``
holds every read until the test releases it (or fails it), and can be told to fail the next
read: this is how tests control the order of I/O completion against parked readers.
``ListFileMap`` is a file made of explicit runs (device extents, inline data, holes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from asyncfs.errors import DeviceIOError
from asyncfs.types import Run


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, position-dependent bytes (a misplaced page shows up as a mismatch)."""
    out = bytearray(size)
    for i in range(0, size, 4):
        v = ((i // 4) * 2654435761 + seed) & 0xFFFFFFFF
        out[i : i + 4] = v.to_bytes(4, "little")[: size - i]
    return bytes(out)


class MemoryDevice:
    """An in-memory BlockDevice; ``delay`` seconds (trio sleep) per read; counts reads."""

    def __init__(self, data: bytes, *, delay: float = 0.0, host_cached: bool = False) -> None:
        self.data = data
        self.delay = delay
        self.host_cached = host_cached  # read_nowait answers (a buffered, host-cached image)
        self.reads: list[tuple[int, int]] = []
        self.probes = 0
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()
        if offset < 0 or offset + length > len(self.data):
            raise DeviceIOError(f"read past device end at {offset}")
        return self.data[offset : offset + length]

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        self.probes += 1
        if not self.host_cached or offset < 0 or offset + length > len(self.data):
            return None
        return self.data[offset : offset + length]

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class PendingRead:
    """One read a ``GatedDevice`` holds until ``release``."""

    offset: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    fail: bool = False


class GatedDevice:
    """Reads complete only when the test calls ``release``/``fail`` (FIFO by default)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pending: list[PendingRead] = []
        self.reads: list[tuple[int, int]] = []
        self.fail_next = 0
        self.started = 0
        self.host_cached = False  # when set, read_nowait answers and no read is queued

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        self.started += 1
        req = PendingRead(offset, length)
        if self.fail_next:
            self.fail_next -= 1
            req.fail = True
        self.pending.append(req)
        try:
            await req.done.wait()
        finally:
            if req in self.pending:
                self.pending.remove(req)
        if req.fail:
            raise DeviceIOError(f"injected I/O error at {offset}+{length}")
        return self.data[offset : offset + length]

    def release(self, n: int | None = None, *, fail: bool = False, newest: bool = False) -> int:
        """Complete the ``n`` oldest (or newest) pending reads (all if None); returns how
        many."""
        if n is None:
            reqs = list(self.pending)
        else:
            reqs = list(self.pending[-n:] if newest else self.pending[:n])
        for r in reqs:
            self.pending.remove(r)
            r.fail = r.fail or fail
            r.done.set()
        return len(reqs)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        if not self.host_cached:
            return None
        return self.data[offset : offset + length]

    async def aclose(self) -> None:
        self.release()


class SlowBlockingDevice(MemoryDevice):
    """Deliberately broken backend for the never-block test: sleeps on the trio thread."""

    async def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        time.sleep(self.delay)
        return self.data[offset : offset + length]


class ListFileMap:
    """A FileMap over explicit runs; ``map`` clips them to the asked range."""

    def __init__(self, size: int, runs: list[Run]) -> None:
        self._size = size
        self.runs = runs
        self.map_calls = 0

    @property
    def size(self) -> int:
        return self._size

    async def map(self, off: int, length: int) -> list[Run]:
        self.map_calls += 1
        end = min(off + length, self._size)
        out: list[Run] = []
        for r in self.runs:
            a, b = max(off, r.file_off), min(end, r.file_off + r.length)
            if a >= b:
                continue
            d = a - r.file_off
            if r.dev_off is not None:
                out.append(Run(a, b - a, dev_off=r.dev_off + d))
            elif r.data is not None:
                out.append(Run(a, b - a, data=r.data[d : d + b - a]))
            else:
                out.append(Run(a, b - a))
        return out


def contiguous_file(size: int, dev_off: int = 0) -> ListFileMap:
    """A file stored in one extent at ``dev_off``."""
    return ListFileMap(size, [Run(0, size, dev_off=dev_off)])
