"""Thread-pool backend: blocking ``preadv`` in worker threads the device owns.

For hosts where io_uring is refused (Docker's default seccomp profile, hardened kernels,
``kernel.io_uring_disabled``). The device owns:

- up to ``threads`` plain ``threading`` workers, started when reads first need them. Each idle
  worker sleeps on a lock of its own, which the trio thread releases to hand it work: one futex
  wake, no trio token, no task, no ``CapacityLimiter``;
- the request queue (a ``deque``) the trio thread appends reads to, and the heap of delayed
  reads (``submit_read_after``, ``submit_read_into(delay=)``: the injected latency of
  ``-o latency``), whose earliest deadline one idle worker sleeps until, so a slow device costs
  the trio thread no timer, task or wake-up of its own;
- the completion queue and an eventfd. A worker ``preadv``s straight into the caller's buffers
  (``submit_read_into``: the page cache's frames) or into a pooled bounce buffer
  (``submit_read``, ``read``), then appends the read to the completion queue; it writes the
  eventfd only when the trio thread may be asleep (``_awake`` false), so a busy trio thread
  gets completions without any signal;
- a trio Instrument and a reaper system task, the shape of the io_uring backend's. Once per
  scheduler pass the instrument delivers completions (``after_io_wait``, and ``before_io_wait``
  when trio is not about to sleep) and, in ``before_io_wait``, wakes workers for the reads the
  pass queued; the reaper waits in ``wait_readable(eventfd)`` for a sleeping trio. Every
  callback runs on the trio thread, exactly once.

Python threads share one GIL, and the trio thread holds it most of the time: a worker that wakes
while the trio thread runs only waits for it, at the price of a futex call and a context
switch each way. So workers are woken where the trio thread is about to let go of the GIL (in
its poll, right after ``before_io_wait``), and a worker wakes the trio thread as the last thing
before it blocks.

The pool is the only place the image's descriptors and the eventfd are used off the trio thread,
so they are closed only once no worker holds a read (``aclose``; after its bounded wait, by the
last worker to finish). In buffered mode the ``preadv2(RWF_NOWAIT)`` probe of
``FileDeviceBase`` serves host-cached pages on the trio thread with no hand-off at all.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque

import outcome
import trio

from asyncfs.io.buffers import Buffer
from asyncfs.io.device import IntoCallback, ReadCallback
from asyncfs.io.filedev import FileDeviceBase, call_completion, describe_oserror, skip_views

log = logging.getLogger(__name__)

_CLOSE_WAIT_SECONDS = 10.0
_ENDS_EARLY = "image ends early (truncated or removed?)"


class _Read:
    """One device read, from submission until its completion is delivered on the trio thread.
    Workers write only ``error``; everything else belongs to the trio thread."""

    __slots__ = ("buf", "callback", "error", "fd", "into", "length", "lo", "need", "offset",
                 "pos", "task", "views")

    def __init__(self, fd: int, pos: int, views: list[memoryview], need: int, offset: int,
                 length: int) -> None:
        self.fd = fd
        self.pos = pos
        self.views = views  # what the worker reads into, in order
        # Bytes that must arrive: up to the end of the asked range. An O_DIRECT read widened to
        # 4 KiB may get less than its views hold at the end of the file, and that is no error.
        self.need = need
        self.offset = offset
        self.length = length
        self.lo = 0  # where the asked bytes start in ``buf``
        self.buf: Buffer | None = None
        self.task: trio.lowlevel.Task | None = None
        self.callback: ReadCallback | None = None
        self.into: IntoCallback | None = None
        self.error: str | None = None

    def abort(self, _: object) -> trio.lowlevel.Abort:
        # The reader leaves; the read stays registered until the worker is done with ``buf``.
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Worker:
    """A pool thread. ``wake`` is held while the worker sleeps in ``idle`` (or works): whoever
    takes the worker out of ``idle`` (the trio thread, or a worker handing on a due read)
    releases it, exactly once."""

    __slots__ = ("busy", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.busy = False  # inside a read (using the device's descriptors)


class _Reap(trio.abc.Instrument):
    """Once per scheduler pass, delivers completions and wakes workers for the reads the pass
    queued (see the module docstring)."""

    def __init__(self, dev: ThreadDevice) -> None:
        self.dev = dev

    def before_io_wait(self, timeout: float) -> None:
        dev = self.dev
        if timeout <= 0:
            dev._reap()
        n = len(dev._queue) + (dev._keeper is None and bool(dev._timers))
        if n:
            # Workers are woken here, once per pass, just before trio lets go of the GIL in
            # its poll: a worker woken while this thread runs would at once wait for the GIL.
            try:
                dev._kick(n)
            except Exception:  # (trio drops an instrument whose hook raises)
                log.exception("waking the threads backend's workers failed")
        if timeout > 0:
            # trio is about to sleep: from now on a worker must signal. Completions already
            # queued are not delivered here (trio would sleep with their readers runnable):
            # the eventfd makes the poll return at once instead.
            dev._awake = False
            if dev._done:
                dev._awake = True
                os.eventfd_write(dev._efd, 1)

    def after_io_wait(self, timeout: float) -> None:
        dev = self.dev
        dev._awake = True
        dev._reap()


class ThreadDevice(FileDeviceBase):
    """A window of the image file read by a pool of at most ``threads`` worker threads."""

    backend_name = "threads"

    def __init__(
        self, fd: int, *, base: int, size: int, direct: bool, path: str, threads: int = 16,
        direct_fd: int = -1, direct_min: int = 0,
    ) -> None:
        super().__init__(fd, base=base, size=size, direct=direct, path=path,
                         direct_fd=direct_fd, direct_min=direct_min)
        self._max_workers = max(1, threads)
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._queue: deque[_Read] = deque()
        self._done: deque[_Read] = deque()
        self._ops: set[_Read] = set()  # submitted, completion not yet delivered
        # Delayed reads: (deadline on time.monotonic, tie-breaker, read), under ``_tlock``;
        # ``_keeper`` is the idle worker sleeping until the earliest deadline.
        self._timers: list[tuple[float, int, _Read]] = []
        self._tlock = threading.Lock()
        self._keeper: _Worker | None = None
        self._seq = itertools.count()
        self._efd = -1
        self._awake = False  # the trio thread will look at ``_done`` without a signal
        self._stopping = False  # workers exit
        self._fd_lock = threading.Lock()
        self._release_fds = False  # aclose is done with them: the last user closes them
        self._closed_fds = False
        self._instrument: _Reap | None = None
        self._reaper_scope = trio.CancelScope()
        self._reaper_done: trio.Event | None = None
        self._drained: trio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Reads submitted whose completion has not been delivered yet."""
        return len(self._ops)

    # -- submission (trio thread) ---------------------------------------------------------
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
        op = self._bounce(fd, direct, offset, length)
        op.task = trio.lowlevel.current_task()
        self._start(op, 0.0)
        result: bytes = await trio.lowlevel.wait_task_rescheduled(op.abort)
        return result

    def submit_read(self, offset: int, length: int, callback: ReadCallback) -> bool:
        """``CallbackReads.submit_read``: ``callback(view, None)`` or ``callback(None, error)``
        on the trio thread, from the scheduler pass that reaps the read; ``view`` is the
        pooled bounce buffer, valid only during the call. Raises ``DeviceIOError`` for a
        range past the end or a closed device."""
        return self.submit_read_after(0.0, offset, length, callback)

    def submit_read_after(
        self, delay: float, offset: int, length: int, callback: ReadCallback
    ) -> bool:
        """``submit_read``, the read starting ``delay`` seconds from now (a worker waits the
        deadline out, not the trio thread)."""
        self._check(offset, length)
        if length == 0:
            return False
        fd, direct = self._route(length)
        op = self._bounce(fd, direct, offset, length)
        op.callback = callback
        self._start(op, delay)
        return True

    def submit_read_into(
        self, offset: int, views: list[memoryview], callback: IntoCallback, delay: float = 0.0
    ) -> bool:
        """``IntoReads.submit_read_into``: one ``preadv`` straight into ``views`` (no bounce
        buffer, no copy), starting ``delay`` seconds from now. ``False`` where O_DIRECT cannot
        read into them (``FileDeviceBase._into_span``). The callback gets ``(None, True)`` or
        ``(error, True)``; ``(error, False)`` only when ``aclose`` gave up waiting for the read,
        whose worker may still write the views."""
        span = self._into_span(offset, views)  # raises once closed or past the end
        if span is None or span[2] == 0:
            return False
        fd, pos, length = span
        op = _Read(fd, pos, views, length, offset, length)
        op.into = callback
        self._start(op, delay)
        return True

    def _bounce(self, fd: int, direct: bool, offset: int, length: int) -> _Read:
        """A read into a pooled buffer (widened to 4 KiB alignment for O_DIRECT)."""
        pos, want, lo = self._span(offset, length, direct)
        buf = self._pool.get(want)
        view = buf.view if want == len(buf.view) else buf.view[:want]
        op = _Read(fd, pos, [view], lo + length, offset, length)
        op.buf = buf
        op.lo = lo
        return op

    def _start(self, op: _Read, delay: float) -> None:
        if self._instrument is None:
            self._start_reaping()
        self._ops.add(op)
        if delay > 0:
            self._add_timer(op, delay)
        else:
            self._queue.append(op)  # a worker is woken for it at the end of this pass

    def _kick(self, n: int = 1) -> None:
        """Wake up to ``n`` idle workers, starting new ones while the pool is below its bound;
        reads left over wait for the first busy worker to finish its own."""
        for _ in range(n):
            if self._idle:
                self._wake_idle()  # (if the last one just left on its own, it took work)
            elif len(self._workers) >= self._max_workers or not self._add_worker():
                return

    def _add_worker(self) -> bool:
        """Start one more worker; False where no thread can be had."""
        w = _Worker()
        self._workers.append(w)
        try:
            threading.Thread(target=self._work, args=(w,), daemon=True,
                             name=f"asyncfs-read-{len(self._workers)}").start()
        except RuntimeError as err:  # no thread to be had (RLIMIT_NPROC, memory)
            self._workers.remove(w)
            if self._workers:
                return False  # the running workers take the reads in turn
            log.error("the threads backend cannot start a worker: %s", err)
            with self._tlock:
                timers, self._timers = self._timers, []
            for op in [*self._queue, *(t[2] for t in timers)]:
                self._finish(op, f"no worker thread: {err}")
            self._queue.clear()
            return False
        return True

    def _add_timer(self, op: _Read, delay: float) -> None:
        with self._tlock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), op))
            keeper = self._keeper
            if keeper is not None and self._timers[0][2] is op:
                # The keeper sleeps until a later deadline: wake it to keep this one. (Not in
                # ``idle``: it is awake, and looks at the heap before sleeping again.)
                with contextlib.suppress(ValueError):
                    self._idle.remove(keeper)
                    keeper.wake.release()
        # With no keeper, the instrument wakes one at the end of this pass (or a busy worker
        # keeps the deadline when it is back).

    def _start_reaping(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._reaper_done = trio.Event()
        trio.lowlevel.spawn_system_task(self._reaper, name=f"asyncfs-threads-reaper:{self.path}")
        self._instrument = _Reap(self)
        trio.lowlevel.add_instrument(self._instrument)

    # -- workers --------------------------------------------------------------------------
    def _work(self, w: _Worker) -> None:
        done = self._done
        signal = False  # a completion of this worker still owes the sleeping trio a wake-up
        while True:
            w.busy = True  # before taking a read: the descriptors stay open while it is held
            op = self._next()
            if op is None:
                if self._stopping:
                    w.busy = False
                    self._close_fds_if_unused()
                    return
                self._sleep(w, signal)
                signal = False
                continue
            if signal:  # more work: deliver the last completion now, not after this read
                signal = False
                os.eventfd_write(self._efd, 1)
            try:
                op.error = _pread(op)
            except BaseException as exc:  # a bug here must still complete the read
                op.error = f"{type(exc).__name__}: {exc}"
            done.append(op)
            if not self._awake:
                self._awake = True
                signal = True

    def _next(self) -> _Read | None:
        """The next read for a worker: a delayed one whose deadline has passed (first, or a
        busy queue would starve them), else the oldest queued one."""
        if self._timers:
            with self._tlock:
                timers = self._timers
                now = time.monotonic()
                op = heapq.heappop(timers)[2] if timers and timers[0][0] <= now else None
                # Another read due already: another worker reads it meanwhile. (One due
                # later is kept by this worker once it is back, or by a worker that sleeps
                # before it: a deadline may then pass during a read, never a whole sleep.)
                hand_on = op is not None and bool(timers) and timers[0][0] <= now
            if hand_on:
                self._wake_idle()
            if op is not None:
                return op
        try:
            return self._queue.popleft()
        except IndexError:
            return None

    def _wake_idle(self) -> None:
        try:
            w = self._idle.pop()
        except IndexError:
            return  # every worker is busy: the first to finish looks at the heap
        w.wake.release()

    def _sleep(self, w: _Worker, signal: bool) -> None:
        """Park ``w`` in ``idle`` until it is handed work, or (as the keeper) until the
        earliest delayed read is due; first wake the trio thread if ``signal``."""
        timeout = -1.0
        idle = self._idle
        with self._tlock:  # (with ``_add_timer``: a keeper is in ``idle`` with its timeout)
            if self._timers and self._keeper is None:
                self._keeper = w
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            idle.append(w)
        if signal:
            # The last thing before blocking: the trio thread, woken, finds the GIL free
            # instead of waiting for this worker to let go of it.
            os.eventfd_write(self._efd, 1)
        w.busy = False
        # Work queued between the worker's last look and its joining ``idle`` found no one to
        # wake: look once more, now that the trio thread can see it.
        if (self._queue or self._stopping or timeout == 0.0
                or not w.wake.acquire(timeout=timeout)):
            try:
                idle.remove(w)
            except ValueError:  # taken out by who hands it work: consume the release it owes
                w.wake.acquire()
        if self._keeper is w:
            with self._tlock:
                if self._keeper is w:
                    self._keeper = None

    # -- completion (trio thread) ---------------------------------------------------------
    def _reap(self) -> None:
        """Deliver every queued completion. Never raises: trio drops an instrument whose hook
        raises."""
        done = self._done
        while done:
            op = done.popleft()
            try:
                self._finish(op)
            except Exception:
                log.exception("completing a read failed")

    async def _reaper(self) -> None:
        """Keeps the eventfd in trio's poll set, so completions wake a sleeping trio (the
        after_io_wait hook mostly delivers them before this task runs)."""
        assert self._reaper_done is not None
        try:
            with self._reaper_scope:
                while True:
                    await trio.lowlevel.wait_readable(self._efd)
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._efd)
                    self._awake = True
                    self._reap()
        finally:
            self._reaper_done.set()

    def _finish(self, op: _Read, error: str | None = None, released: bool = True) -> None:
        """Deliver ``op``'s completion: ``error`` (reads ``aclose`` fails) or the worker's
        result. Only the first delivery counts: ``aclose`` may fail a read that its worker
        completes after all, and the reaper's last pass may still reap that completion."""
        try:
            self._ops.remove(op)
        except KeyError:
            return
        why = op.error if error is None else error
        buf = op.buf
        if op.into is not None:
            failure = None if why is None else self._io_error(op.offset, op.length, why)
            call_completion(op.into, failure, released)
        elif op.callback is not None:
            if why is None and buf is not None:
                # The callback copies what it keeps: the view is valid only during the call.
                with buf.view[op.lo : op.need] as view:
                    call_completion(op.callback, view, None)
            else:
                call_completion(op.callback, None,
                                self._io_error(op.offset, op.length, why or "no buffer"))
        elif op.task is not None:  # (None: the reader was cancelled)
            if why is None and buf is not None:
                data = bytes(buf.view[op.lo : op.need])
                trio.lowlevel.reschedule(op.task, outcome.Value(data))
            else:
                exc = self._io_error(op.offset, op.length, why or "no buffer")
                trio.lowlevel.reschedule(op.task, outcome.Error(exc))
        if buf is not None and released:
            self._pool.put(buf)
        if self._drained is not None and not self._ops:
            self._drained.set()

    # -- close ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        why = f"device {self.path} closed"
        # Reads no worker has taken fail at once, their buffers untouched: the queued ones and
        # the delayed ones (the close does not wait out their latency).
        with self._tlock:
            timers, self._timers = self._timers, []
        waiting = [t[2] for t in timers]
        while True:
            try:
                waiting.append(self._queue.popleft())
            except IndexError:
                break
        for op in waiting:
            self._finish(op, why)
        if self._ops:
            self._drained = trio.Event()
            with trio.move_on_after(_CLOSE_WAIT_SECONDS):
                await self._drained.wait()
        for op in list(self._ops):  # stuck in the kernel: its worker may still write
            self._finish(op, f"{why} with the read in flight", released=False)
        self._stopping = True
        while self._idle:
            try:
                self._idle.pop().wake.release()
            except IndexError:
                break
        if self._instrument is not None:
            trio.lowlevel.remove_instrument(self._instrument)
            self._instrument = None
            self._reaper_scope.cancel()
            assert self._reaper_done is not None
            await self._reaper_done.wait()
            trio.lowlevel.notify_closing(self._efd)
        self._release_fds = True
        self._close_fds_if_unused()

    def _close_fds_if_unused(self) -> None:
        """Close the image's descriptors and the eventfd once the device is closed and no
        worker is inside a read: from ``aclose``, or from the last worker ``aclose`` stopped
        waiting for (a number closed under a worker could be reused by another file)."""
        with self._fd_lock:
            if self._closed_fds or not self._release_fds or any(w.busy for w in self._workers):
                return
            self._closed_fds = True
        self._close_fd()
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1


def _pread(op: _Read) -> str | None:
    """Runs in a worker: read until ``op.need`` bytes are in; None, or why not."""
    views, fd, pos, need = op.views, op.fd, op.pos, op.need
    done = 0
    while done < need:
        try:
            got = os.preadv(fd, views if done == 0 else skip_views(views, done), pos + done)
        except BlockingIOError:  # EAGAIN (EINTR is retried by os.preadv itself)
            continue
        except OSError as err:
            return describe_oserror(err)
        if got == 0:
            return _ENDS_EARLY
        done += got
    return None
