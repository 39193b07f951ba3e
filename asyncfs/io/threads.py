"""Thread-pool backend: blocking ``preadv`` in a bounded set of worker threads.

The fallback where io_uring is unavailable (``kernel.io_uring_disabled``, seccomp). In buffered
mode a ``preadv2(RWF_NOWAIT)`` probe on the trio thread serves cached pages without the
~110 µs thread hand-off.
"""

from __future__ import annotations

import os

import trio

from asyncfs.io.buffers import Buffer
from asyncfs.io.filedev import FileDeviceBase, describe_oserror

_CLOSE_WAIT_SECONDS = 10.0


class ThreadDevice(FileDeviceBase):
    """A window of the image file read through ``trio.to_thread`` (at most ``threads`` at once)."""

    backend_name = "threads"

    def __init__(
        self, fd: int, *, base: int, size: int, direct: bool, path: str, threads: int = 16,
        direct_fd: int = -1, direct_min: int = 0,
    ) -> None:
        super().__init__(fd, base=base, size=size, direct=direct, path=path,
                         direct_fd=direct_fd, direct_min=direct_min)
        self._limiter = trio.CapacityLimiter(max(1, threads))

    @staticmethod
    def _pread_full(fd: int, buf: Buffer, pos: int, want: int, need: int) -> int:
        """Runs in a worker: read until ``need`` bytes are in (short only at end of file)."""
        view = buf.view
        done = 0
        while done < need:
            got = os.preadv(fd, [view[done:want]], pos + done)
            if got == 0:
                break
            done += got
        return done

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return b""
        fd, direct = self._route(length)
        if not direct:
            hit = self.read_nowait(offset, length)
            if hit is not None:
                await trio.lowlevel.checkpoint()
                return hit
        pos, want, lo = self._span(offset, length, direct)
        buf = self._pool.get(want)
        try:
            done = await trio.to_thread.run_sync(
                self._pread_full, fd, buf, pos, want, lo + length,
                limiter=self._limiter, abandon_on_cancel=True,
            )
        except OSError as err:
            raise self._io_error(offset, length, describe_oserror(err)) from None
        # On cancellation the worker is abandoned, still writing into buf: it is not pooled.
        if done < lo + length:
            self._pool.put(buf)
            raise self._io_error(offset, length, "image ends early (truncated or removed?)")
        data = bytes(buf.view[lo : lo + length])
        self._pool.put(buf)
        return data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A worker abandoned by a cancelled reader keeps its limiter token until its preadv
        # returns: holding every token means no worker still uses the fd number.
        # After 10 s a worker stuck in the kernel is left behind: its preadv already holds
        # its own reference to the open file, and no new worker can start.
        owners = [object() for _ in range(int(self._limiter.total_tokens))]
        try:
            with trio.move_on_after(_CLOSE_WAIT_SECONDS):
                for owner in owners:
                    await self._limiter.acquire_on_behalf_of(owner)
            self._close_fd()
        finally:
            for owner in owners:
                if owner in self._limiter.statistics().borrowers:
                    self._limiter.release_on_behalf_of(owner)
