"""A fault-injecting BlockDevice wrapper for tests and benchmarks: per-read latency (fixed or
random), EIO for reads touching chosen byte ranges, and a stall the test releases.

Over a backend with callback reads (io_uring), reads also complete by callback: each waits out
its latency in one shared delay line (a heap and one system task) instead of a task and a timer
of its own, so a slow device costs the daemon no more CPU per read than a fast one. Reads that
meet a stall or an injected EIO range take the plain ``read`` path.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable

import trio

from asyncfs.errors import DeviceIOError, UsageError
from asyncfs.io.device import BlockDevice, ReadCallback

_MAX_LATENCY_MS = 3_600_000  # an hour: anything longer is a typo, not a test


def parse_latency(text: str) -> tuple[float, float]:
    """``-o latency=`` value: ``MS`` (fixed) or ``LO-HI`` (uniform) -> (latency_ms, jitter_ms)."""
    try:
        if "-" in text:
            lo_s, hi_s = text.split("-", 1)
            lo, hi = float(lo_s), float(hi_s)
        else:
            lo = hi = float(text)
    except ValueError:
        raise UsageError(f"latency={text}: expected MS or LO-HI in milliseconds") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi > _MAX_LATENCY_MS:
        # nan and inf pass the comparisons below; trio.sleep would then fail every read
        raise UsageError(f"latency={text}: expected milliseconds up to {_MAX_LATENCY_MS}")
    if lo < 0 or hi < lo:
        raise UsageError(f"latency={text}: expected 0 <= LO <= HI")
    return lo, hi - lo


class FaultyDevice:
    """Wraps ``inner``; each read sleeps ``latency_ms`` plus uniform ``[0, latency_jitter_ms)``,
    fails with DeviceIOError if it touches any ``eio_ranges`` entry ``(start, end)`` (half-open
    device byte range), and waits while the device is stalled."""

    def __init__(
        self,
        inner: BlockDevice,
        *,
        latency_ms: float = 0,
        latency_jitter_ms: float = 0,
        eio_ranges: list[tuple[int, int]] | None = None,
        seed: int | None = None,
    ) -> None:
        self.inner = inner
        self._inner_submit: Callable[[int, int, ReadCallback], bool] | None = getattr(
            inner, "submit_read", None)
        self.latency_ms = latency_ms
        self.latency_jitter_ms = latency_jitter_ms
        self._eio: list[tuple[int, int]] = list(eio_ranges or [])
        self._rng = random.Random(seed)
        self._released = trio.Event()
        self._released.set()
        self.reads = 0  # reads asked of this device (tests count backend traffic with it)
        self.stalled_readers = 0
        # the delay line: (due, seq, offset, length, callback), and the task that drains it
        self._line: list[tuple[float, int, int, int, ReadCallback]] = []
        self._line_seq = 0
        self._line_scope: trio.CancelScope | None = None
        self._line_running = False
        self._closed = False

    @property
    def size(self) -> int:
        return self.inner.size

    def add_eio_range(self, start: int, end: int) -> None:
        self._eio.append((start, end))

    def clear_eio_ranges(self) -> None:
        self._eio.clear()

    def stall(self) -> None:
        """Reads issued from now on wait (after their latency) until ``release()``."""
        if self._released.is_set():
            self._released = trio.Event()

    def release(self) -> None:
        self._released.set()

    @property
    def is_stalled(self) -> bool:
        return not self._released.is_set()

    def _touches_eio(self, offset: int, length: int) -> bool:
        end = offset + max(length, 1)
        return any(offset < e and s < end for s, e in self._eio)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self.reads += 1
        released = self._released
        delay = self.latency_ms
        if self.latency_jitter_ms:
            delay += self._rng.uniform(0, self.latency_jitter_ms)
        if delay:
            await trio.sleep(delay / 1000)
        if not released.is_set():
            self.stalled_readers += 1
            try:
                await released.wait()
            finally:
                self.stalled_readers -= 1
        if self._touches_eio(offset, length):
            raise DeviceIOError(f"read of {length} bytes at {offset} failed: EIO (injected)")
        return await self.inner.read(offset, length)

    def submit_read(self, offset: int, length: int, callback: ReadCallback) -> bool:
        """``CallbackReads.submit_read`` when the inner device has it; ``False`` (use ``read``)
        otherwise, while stalled, or while any EIO range is set."""
        inner = self._inner_submit
        if inner is None or self._closed or self.is_stalled or self._eio:
            return False
        delay = self.latency_ms
        if self.latency_jitter_ms:
            delay += self._rng.uniform(0, self.latency_jitter_ms)
        if delay <= 0:
            started: bool = inner(offset, length, callback)
            self.reads += started
            return started
        self.reads += 1
        due = trio.current_time() + delay / 1000
        heapq.heappush(self._line, (due, self._line_seq, offset, length, callback))
        self._line_seq += 1
        if not self._line_running:
            self._line_running = True
            trio.lowlevel.spawn_system_task(self._run_line, name="asyncfs-fault-delay-line")
        elif self._line_scope is not None and due < self._line_scope.deadline:
            self._line_scope.deadline = due  # jitter: this one is due before the one waited on
        return True

    async def _run_line(self) -> None:
        try:
            while self._line and not self._closed:
                with trio.CancelScope(deadline=self._line[0][0]) as scope:
                    self._line_scope = scope
                    await trio.sleep_forever()
                self._line_scope = None
                now = trio.current_time()
                batch = []
                while self._line and self._line[0][0] <= now:
                    batch.append(heapq.heappop(self._line))
                released = self._released
                if batch and not released.is_set():  # stalled after these were queued
                    self.stalled_readers += len(batch)
                    try:
                        await released.wait()
                    finally:
                        self.stalled_readers -= len(batch)
                for _, _, offset, length, callback in batch:
                    self._start(offset, length, callback)
        finally:
            self._line_running = False
            self._line_scope = None
            self._fail_line("device closed")

    def _start(self, offset: int, length: int, callback: ReadCallback) -> None:
        if self._closed:
            callback(None, DeviceIOError(f"read of {length} bytes at {offset}: device closed"))
        elif self._inner_submit is None or not self._inner_submit(offset, length, callback):
            trio.lowlevel.spawn_system_task(self._read_for, offset, length, callback,
                                            name="asyncfs-fault-read")

    async def _read_for(self, offset: int, length: int, callback: ReadCallback) -> None:
        """The inner ring was full: a plain read, completed through the callback."""
        try:
            data = await self.inner.read(offset, length)
        except DeviceIOError as e:
            callback(None, e)
        except BaseException:  # cancelled at shutdown: the callback still comes, once
            callback(None, DeviceIOError(f"read of {length} bytes at {offset}: cancelled"))
            raise
        else:
            callback(memoryview(data), None)

    def _fail_line(self, why: str) -> None:
        line, self._line = self._line, []
        for _, _, offset, length, callback in line:
            callback(None, DeviceIOError(f"read of {length} bytes at {offset}: {why}"))

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        if self.latency_ms or self.latency_jitter_ms or self.is_stalled:
            return None
        if self._touches_eio(offset, length):
            return None
        return self.inner.read_nowait(offset, length)

    async def aclose(self) -> None:
        self._closed = True
        self.release()
        if self._line_scope is not None:
            self._line_scope.cancel()
        self._fail_line("device closed")
        await self.inner.aclose()
