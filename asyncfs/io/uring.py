"""io_uring backend: many reads in flight from one trio thread, no worker threads.

A reader prepares an SQE and parks. A trio Instrument does the ring work once per scheduler
pass: ``before_io_wait`` (just before trio polls) submits every SQE prepared during the pass
with one ``io_uring_enter``; ``after_io_wait`` reaps every ready CQE and reschedules the
readers. The ring fd itself is in trio's poll set (a system task waits on it with
``trio.lowlevel.wait_readable``; it is readable while CQEs wait), so completions arriving while
trio sleeps wake it. No eventfd, no extra syscall per completion.

The ring is asyncfs's own binding (``asyncfs.io._uring``, a C extension built at install time
against the system's liburing for the architecture's baseline). It holds an export of every
buffer a read targets until that read's completion is reaped, so no buffer can be freed or
resized under the kernel and no export outlives its read. Where it was not built, or the
kernel refuses a ring (ENOSYS; EPERM from seccomp or ``kernel.io_uring_disabled``),
``UringUnavailable`` says why and ``open_image`` falls back to the threads backend.

``submit_read`` starts a read that completes through a callback instead of a parked task (the
page cache's misses use it, so a miss costs no task of its own). ``submit_read_after`` delays
such a read in the kernel (an ``IORING_OP_TIMEOUT`` linked ahead of it): the injected latency of
``-o latency`` then costs no timer, task or wake-up in this thread, as a slow device would not.

A reader cancelled while its read is in flight leaves at once; its op (and the buffer the
kernel writes into) stays in ``_ops`` until the CQE arrives, so the ring never points at
freed memory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Any

import outcome
import trio

from asyncfs.errors import DeviceIOError
from asyncfs.io.buffers import Buffer
from asyncfs.io.device import IntoCallback, ReadCallback
from asyncfs.io.filedev import FileDeviceBase, call_completion, skip_views

try:
    import asyncfs.io._uring as _uring
except ImportError as _err:  # built without a compiler or liburing's headers
    _uring = None  # type: ignore[assignment]
    _IMPORT_ERROR = str(_err)

log = logging.getLogger(__name__)

_RETRY = (-errno.EAGAIN, -errno.EINTR)
_DRAIN_SECONDS = 10.0


class UringUnavailable(Exception):
    """The ring could not be set up (disabled by sysctl or seccomp, no kernel support, or the
    binding was not built); the message says which, in one line."""


def open_ring(depth: int) -> _uring.Ring:
    """A new ``_uring.Ring`` of ``depth`` entries, or ``UringUnavailable`` saying why not."""
    if _uring is None:
        raise UringUnavailable(f"the io_uring binding was not built ({_IMPORT_ERROR})")
    try:
        return _uring.Ring(depth)
    except OSError as err:
        code = err.errno or 0
        why = {
            errno.ENOSYS: "the kernel has no io_uring",
            errno.EPERM: "io_uring is forbidden here (kernel.io_uring_disabled or a seccomp "
                         "filter)",
            errno.EACCES: "io_uring is forbidden here (kernel.io_uring_disabled or a security "
                          "module)",
        }.get(code, "the kernel refused a ring")
        raise UringUnavailable(
            f"{why}: io_uring_setup failed with {errno.errorcode.get(code, code)}") from None


class _Op:
    """One device read: the file span it covers and how much of it has arrived."""

    __slots__ = (
        "buf", "callback", "delay", "done", "fd", "into", "length", "lo", "need", "offset",
        "pos", "task", "views", "want",
    )

    def __init__(
        self, task: trio.lowlevel.Task | None, fd: int, buf: Buffer | None, pos: int, want: int,
        lo: int, offset: int, length: int,
    ) -> None:
        self.task: trio.lowlevel.Task | None = task
        self.fd = fd
        self.callback: ReadCallback | None = None
        self.into: IntoCallback | None = None  # a read into the caller's ``views``
        self.views: list[memoryview] | None = None
        self.delay = 0.0  # seconds its first submission was held back (a linked timeout)
        self.buf = buf
        self.pos = pos
        self.want = want
        self.lo = lo
        self.need = lo + length
        self.done = 0
        self.offset = offset
        self.length = length

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        # The reader goes; the op stays registered until its CQE so the buffer outlives the I/O.
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _SubmitOnIdle(trio.abc.Instrument):
    """Flushes the device's prepared SQEs once per scheduler pass (see the module docstring)."""

    def __init__(self, dev: UringDevice) -> None:
        self.dev = dev

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            # trio is about to sleep: only submit. Reads that complete inline leave CQEs that
            # keep the ring fd readable, so the poll returns at once and after_io_wait reaps.
            self.dev._pump(reap=False)
        else:
            self.dev._pump()

    def after_io_wait(self, timeout: float) -> None:
        # Completions that woke the poll go to their readers in this same pass, one scheduler
        # pass before the reaper task itself would run.
        self.dev._pump()


class UringDevice(FileDeviceBase):
    """A window of the image file read through one io_uring (at most ``depth`` reads in flight)."""

    backend_name = "uring"

    def __init__(
        self, fd: int, *, base: int, size: int, direct: bool, path: str, depth: int = 128,
        direct_fd: int = -1, direct_min: int = 0,
    ) -> None:
        super().__init__(fd, base=base, size=size, direct=direct, path=path,
                         direct_fd=direct_fd, direct_min=direct_min)
        self._depth = depth
        self._ring = open_ring(depth)
        self._ring_fd: int = self._ring.fd
        self._ops: dict[int, _Op] = {}
        self._next_id = 1  # 0 is the binding's tag for delays
        self._slots = trio.lowlevel.ParkingLot()
        self._reaper_scope = trio.CancelScope()
        self._reaper_done = trio.Event()
        self._instrument: _SubmitOnIdle | None = None
        self._failed: str | None = None
        self.peak_in_flight = 0  # most reads ever submitted and not yet completed (a statistic)

    @classmethod
    async def create(
        cls, fd: int, *, base: int, size: int, direct: bool, path: str, depth: int = 128,
        direct_fd: int = -1, direct_min: int = 0,
    ) -> UringDevice:
        dev = cls(fd, base=base, size=size, direct=direct, path=path, depth=depth,
                  direct_fd=direct_fd, direct_min=direct_min)
        trio.lowlevel.spawn_system_task(dev._reaper, name=f"asyncfs-uring-reaper:{path}")
        dev._instrument = _SubmitOnIdle(dev)
        trio.lowlevel.add_instrument(dev._instrument)
        await trio.lowlevel.checkpoint()
        return dev

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return b""
        while len(self._ops) >= self._depth:
            await self._slots.park()
            self._check(offset, length)
        if self._failed is not None:
            raise DeviceIOError(self._failed)
        fd, direct = self._route(length)
        pos, want, lo = self._span(offset, length, direct)
        op = _Op(trio.lowlevel.current_task(), fd, self._pool.get(want), pos, want, lo, offset,
                 length)
        op_id = self._next_id
        self._next_id = op_id + 1
        try:
            self._prep(op_id, op)
        except OSError as err:
            raise self._io_error(offset, length, f"io_uring: {err}") from None
        self._ops[op_id] = op
        if self._instrument is None:
            self._flush()
        result: bytes = await trio.lowlevel.wait_task_rescheduled(op.abort)
        return result

    def submit_read(self, offset: int, length: int, callback: ReadCallback) -> bool:
        """Start a read whose completion calls ``callback(data, None)`` or
        ``callback(None, error)`` on the trio thread, from the scheduler pass that reaps it,
        instead of waking a parked task: a page-cache miss then costs no task of its own.
        ``False`` (nothing started) when the ring is full or has failed; the caller falls back
        to ``read``. Raises ``DeviceIOError`` for a range past the end or a closed device."""
        return self.submit_read_after(0.0, offset, length, callback)

    def submit_read_after(
        self, delay: float, offset: int, length: int, callback: ReadCallback
    ) -> bool:
        """``submit_read``, the read starting ``delay`` seconds from now: a timeout linked
        ahead of it in the ring (``IOSQE_IO_LINK``; ``IORING_TIMEOUT_ETIME_SUCCESS`` so its
        expiry does not break the link) holds it back in the kernel."""
        self._check(offset, length)  # raises once closed
        if length == 0 or len(self._ops) >= self._depth or self._failed is not None:
            return False
        fd, direct = self._route(length)
        pos, want, lo = self._span(offset, length, direct)
        buf = self._pool.get(want)
        op = _Op(None, fd, buf, pos, want, lo, offset, length)
        op.callback = callback
        if not self._start(op, delay):
            self._pool.put(buf)
            return False
        return True

    def submit_read_into(
        self, offset: int, views: list[memoryview], callback: IntoCallback, delay: float = 0.0
    ) -> bool:
        """``IntoReads.submit_read_into``: one ``readv`` straight into ``views`` (no bounce
        buffer, no copy); ``delay`` as in ``submit_read_after``."""
        span = self._into_span(offset, views)  # raises once closed or past the end
        if span is None or len(self._ops) >= self._depth or self._failed is not None:
            return False
        fd, pos, length = span
        if length == 0:
            return False
        op = _Op(None, fd, None, pos, length, 0, offset, length)
        op.views = views
        op.into = callback
        return self._start(op, delay)

    def _start(self, op: _Op, delay: float) -> bool:
        """Prepare a callback read (behind a linked timeout when ``delay`` > 0) and keep it
        in ``_ops`` until its CQE; False when no SQE could be had."""
        op_id = self._next_id
        self._next_id = op_id + 1
        op.delay = delay
        try:
            self._prep(op_id, op, delay)
        except OSError:
            return False
        self._ops[op_id] = op
        if self._instrument is None:
            self._flush()
        return True

    def _prep(self, op_id: int, op: _Op, delay: float = 0.0) -> None:
        """Prepare ``op``'s read (the rest of it, after a short read), held back ``delay``
        seconds in the kernel (only ever its first submission: a retry is not delayed again);
        ``OSError(EBUSY)`` when the submission queue stays full."""
        buf = op.buf
        target: Any
        if buf is None:
            assert op.views is not None
            target = op.views if op.done == 0 else skip_views(op.views, op.done)
        elif op.done == 0 and op.want == len(buf.mm):
            target = buf.view
        else:
            target = buf.view[op.done : op.want]
        ring, at = self._ring, op.pos + op.done
        if not ring.readv(op.fd, target, at, op_id, delay):
            self._flush()  # SQ full of prepared entries: push them and retry once
            if not ring.readv(op.fd, target, at, op_id, delay):
                raise OSError(errno.EBUSY, "submission queue full")

    def _flush(self) -> None:
        if self._ring.prepared:
            if len(self._ops) > self.peak_in_flight:
                self.peak_in_flight = len(self._ops)
            self._ring.submit()

    def _pump(self, reap: bool = True) -> int:
        """Submit what this scheduler pass prepared and (if ``reap``) hand ready completions to
        their readers; the number of CQEs reaped. Never raises: trio drops an instrument whose
        hook raises."""
        if not self._ops:  # nothing submitted or in flight: no CQE can be waiting
            return 0
        try:
            self._flush()
            if not reap:
                return 0
            n = self._reap()
            self._flush()  # short reads resubmitted by _reap
        except Exception as exc:
            if self._failed is None:  # log once, not on every scheduler pass
                log.exception("io_uring submit/reap failed")
            self._fail_all(f"io_uring backend failed: {exc}")
            return 1
        return n

    async def _reaper(self) -> None:
        """Keeps the ring fd in trio's poll set: it is readable while CQEs wait, so completions
        that arrive while trio sleeps wake it (the reaping itself mostly happens in the
        after_io_wait hook, before this task runs)."""
        try:
            with self._reaper_scope:
                while True:
                    await trio.lowlevel.wait_readable(self._ring_fd)
                    self._pump()
                    if self._failed is not None:
                        return
        finally:
            self._reaper_done.set()

    def _reap(self) -> int:
        done: list[tuple[int, int]] = self._ring.reap()
        if not done:
            return 0
        for op_id, res in done:
            self._complete(op_id, res)
        if self._slots:
            self._slots.unpark(count=len(done))
        return len(done)

    def _complete(self, op_id: int, res: int) -> None:
        op = self._ops.get(op_id)
        if op is None:
            return
        error: str | None = None
        if res > 0:
            op.done += res
            if op.done < op.need:
                error = self._resubmit(op_id, op)
                if error is None:
                    return
        elif res == 0:
            if op.done < op.need:
                error = "image ends early (truncated or removed?)"
        elif res in _RETRY or (res == -errno.ECANCELED and op.delay > 0
                                and not self._closed):
            # ECANCELED: a kernel without ETIME_SUCCESS broke the link when the delay expired;
            # the delay is over either way, so read now (once: the retry has no delay).
            op.delay = 0.0
            error = self._resubmit(op_id, op)
            if error is None:
                return
        else:
            error = f"{errno.errorcode.get(-res, str(-res))} ({os.strerror(-res)})"
        del self._ops[op_id]
        buf = op.buf
        if buf is None:  # a read into the caller's views: the kernel is done with them
            into, op.into = op.into, None
            op.views = None
            if into is not None:
                call_completion(into, None if error is None else
                      self._io_error(op.offset, op.length, error), True)
            return
        if op.callback is not None:
            callback, op.callback = op.callback, None
            if error is None:
                # The callback copies what it keeps: the view is valid only during the call.
                with buf.view[op.lo : op.need] as view:
                    call_completion(callback, view, None)
                self._pool.put(buf)
            else:
                self._pool.put(buf)
                call_completion(callback, None, self._io_error(op.offset, op.length, error))
            return
        task = op.task
        if task is None:  # the reader was cancelled: only the buffer was waiting for this
            self._pool.put(buf)
        elif error is not None:
            self._pool.put(buf)
            exc = self._io_error(op.offset, op.length, error)
            trio.lowlevel.reschedule(task, outcome.Error(exc))
        else:
            data = bytes(buf.view[op.lo : op.need])
            self._pool.put(buf)
            trio.lowlevel.reschedule(task, outcome.Value(data))

    def _resubmit(self, op_id: int, op: _Op) -> str | None:
        if self._failed is not None:
            return self._failed
        try:
            self._prep(op_id, op)
        except OSError as err:
            return f"resubmit: {err}"
        return None

    def _fail_all(self, why: str) -> None:
        """Wake every reader with an error. Ops still in the kernel stay in ``_ops`` (their
        buffers referenced) until the ring is torn down."""
        self._failed = why
        for op in self._ops.values():
            if op.into is not None:  # still in the kernel: its views must not be reused
                into, op.into = op.into, None
                call_completion(into, DeviceIOError(why), False)
            if op.callback is not None:
                callback, op.callback = op.callback, None
                call_completion(callback, None, DeviceIOError(why))
            if op.task is not None:
                task, op.task = op.task, None
                trio.lowlevel.reschedule(task, outcome.Error(DeviceIOError(why)))
        self._slots.unpark_all()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots.unpark_all()
        self._cancel_delays()
        with trio.move_on_after(_DRAIN_SECONDS):
            while self._ops and not self._reaper_done.is_set():
                await trio.sleep(0.001)
        if self._ops:
            self._fail_all(f"device {self.path} closed with reads in flight")
        if self._instrument is not None:
            trio.lowlevel.remove_instrument(self._instrument)
            self._instrument = None
        self._reaper_scope.cancel()
        await self._reaper_done.wait()
        self._teardown_ring()
        self._ops.clear()
        self._close_fd()

    def _cancel_delays(self) -> None:
        """End every pending delay now: their reads complete with ECANCELED (an error, the
        device being closed) instead of holding the close up for their latency."""
        if not any(op.delay > 0 for op in self._ops.values()):
            return
        try:
            if not self._ring.cancel_delays():
                self._flush()
                if not self._ring.cancel_delays():
                    return
            self._flush()
        except OSError:  # the drain below still bounds the close
            log.debug("cancelling delayed reads failed", exc_info=True)

    def _teardown_ring(self) -> None:
        # RuntimeError outside trio: set-up failed before the loop ever watched the fd.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._ring_fd)
        # The binding keeps the buffers of reads never reaped exported for good: the kernel
        # may still finish them after the ring's fd is closed.
        abandoned = self._ring.close()
        if abandoned:
            log.warning("%s: %d reads were still in the kernel at close", self.path, abandoned)
