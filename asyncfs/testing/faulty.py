"""A fault-injecting BlockDevice wrapper for tests, benchmarks and ``-o faults``: per-read
latency (fixed or random), EIO for reads touching chosen byte ranges, and a stall the test
releases.

Over io_uring, reads also complete by callback, and their latency is waited out in the kernel
(``UringDevice.submit_read_after``: a timeout linked ahead of the read), not by a timer, task
and wake-up of the trio thread: a slow device then costs the daemon no more CPU per read than a
fast one, as a real slow disk would. Reads that meet a stall or an injected EIO range take the
plain ``read`` path; a stall holds the reads issued after it (those already in the ring finish).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import trio

from asyncfs.errors import DeviceIOError, UsageError
from asyncfs.io.device import BlockDevice, IntoCallback, ReadCallback

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
        self._inner_submit_after: Callable[[float, int, int, ReadCallback], bool] | None = (
            getattr(inner, "submit_read_after", None))
        self._inner_into: Callable[..., bool] | None = getattr(inner, "submit_read_into", None)
        self._inner_nowait_into: Callable[[int, list[memoryview]], bool] | None = getattr(
            inner, "read_nowait_into", None)
        self.latency_ms = latency_ms
        self.latency_jitter_ms = latency_jitter_ms
        self._eio: list[tuple[int, int]] = list(eio_ranges or [])
        self._rng = random.Random(seed)
        self._released = trio.Event()
        self._released.set()
        self.reads = 0  # reads asked of this device (tests count backend traffic with it)
        self.stalled_readers = 0
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

    def _delay(self) -> float:
        delay = self.latency_ms
        if self.latency_jitter_ms:
            delay += self._rng.uniform(0, self.latency_jitter_ms)
        return delay / 1000

    def _may_submit(self) -> bool:
        return not (self._closed or self.is_stalled or self._eio)

    def submit_read_into(
        self, offset: int, views: list[memoryview], callback: IntoCallback, delay: float = 0.0
    ) -> bool:
        """``IntoReads.submit_read_into`` when the inner device has it, delayed by this
        device's latency; ``False`` (read another way) while stalled or while any EIO range
        is set."""
        if self._inner_into is None or not self._may_submit():
            return False
        started = self._inner_into(offset, views, callback, delay + self._delay())
        self.reads += started
        return bool(started)

    def read_nowait_into(self, offset: int, views: list[memoryview]) -> bool:
        if self._inner_nowait_into is None or self._probe_blocked(offset, sum(map(len, views))):
            return False
        return self._inner_nowait_into(offset, views)

    def _probe_blocked(self, offset: int, length: int) -> bool:
        """Whether the probe must answer "not cached": a latency, a stall or an EIO range."""
        return bool(self.latency_ms or self.latency_jitter_ms or self.is_stalled
                    or self._touches_eio(offset, length))

    def submit_read(self, offset: int, length: int, callback: ReadCallback) -> bool:
        """``CallbackReads.submit_read`` when the inner device has it (with a latency: when it
        can delay the read itself); ``False`` (use ``read``) otherwise, while stalled, or while
        any EIO range is set."""
        if self._inner_submit is None or not self._may_submit():
            return False
        delay = self._delay()
        if delay <= 0:
            started = self._inner_submit(offset, length, callback)
        elif self._inner_submit_after is not None:
            started = self._inner_submit_after(delay, offset, length, callback)
        else:
            return False
        self.reads += started
        return started

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        if self._probe_blocked(offset, length):
            return None
        return self.inner.read_nowait(offset, length)

    async def aclose(self) -> None:
        self._closed = True
        self.release()
        await self.inner.aclose()
