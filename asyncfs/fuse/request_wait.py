"""The wait for the next FUSE request: take one already queued without a trip through epoll.

pyfuse3's workers each call ``_wait_fuse_readable()`` before they read a request from
``/dev/fuse``: count themselves idle, take a ``trio.Lock``, park in
``trio.lowlevel.wait_readable(fd)``, wake on the next epoll round, hand the lock to the next
worker. Under load the kernel's queue is rarely empty, so every request paid for that round (an
``epoll_ctl``, an ``epoll_wait``, a lock hand-off and a scheduler pass) although it was already
there. On this machine that bounded all-hit reads to ~25k a second (docs/benchmarks.md).

:class:`RequestWait` wraps that function. A worker first asks the fd with ``poll(0)``; if a
request is queued it returns at once and pyfuse3 reads it in the same step, with no await in
between, so no other task can take it first. Only an empty queue goes through pyfuse3's own
wait (``park``), which keeps what it does well: one reader in ``wait_readable`` at a time (trio
allows no more) and its count of idle workers, by which pyfuse3 starts and retires workers.
The rules that keep it correct:

- a parked reader that wakes asks ``poll(0)`` again before it answers True, and parks again if
  the queue is empty: a worker taking the fast way may have read the request that woke it, and
  reading an empty queue would block the whole thread in ``read()``;
- after every ``YIELD_EVERY`` calls the worker yields to the scheduler, so completions,
  signals and the control socket still run when the queue never drains;
- an empty queue is watched for up to ``spin_s`` (50 µs by default) before parking, but only
  while ``may_spin()`` says nothing else can need the thread (the daemon: no backend read in
  flight) and no other task is runnable. A lone reader's next request usually arrives within
  that time (fio, 1 job, cached: 18.5k -> 27-31k IOPS); parking and waking cost more;
- once pyfuse3's wait has answered False (``pyfuse3.terminate``: the session is over) every
  later caller answers False too, even with requests still queued.

:func:`install` puts it in place only when pyfuse3 has the function this was written against
and the process holds exactly one ``/dev/fuse`` descriptor; otherwise pyfuse3 keeps its own.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("asyncfs")

YIELD_EVERY = 32  # calls between two forced scheduler passes
SPIN_S = 50e-6  # default watch of an empty queue before parking
_PYFUSE3_HOOK = "_wait_fuse_readable"  # pyfuse3 3.x: the session loop looks it up by name


class RequestWait:
    """``async () -> bool``: True when a request can be read without blocking, False at close.

    ``park`` is pyfuse3's own wait (its lock, its count of idle workers, ``wait_readable``),
    used only when the queue is empty."""

    def __init__(self, fd: int, park: Callable[[], Awaitable[bool]],
                 ready: Callable[[], bool] | None = None, *,
                 may_spin: Callable[[], bool] | None = None, spin_s: float = SPIN_S) -> None:
        if ready is None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)

            def ready() -> bool:
                return bool(poller.poll(0))  # POLLERR/POLLHUP too: the read then reports it

        self._ready = ready
        self.park = park
        self._may_spin = may_spin
        self._spin_s = spin_s
        self._closed = False
        self._since_yield = 0
        self.taken_at_once = 0
        self.waited_for = 0

    async def __call__(self) -> bool:
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await trio.lowlevel.checkpoint()
        if self._closed:
            return False
        if self._ready() or self._spin():
            self.taken_at_once += 1
            return True
        while await self.park():
            if self._ready():
                self.waited_for += 1
                return True
        self._closed = True
        return False

    def _spin(self) -> bool:
        """Watch the empty queue for up to ``spin_s``; True as soon as a request is queued."""
        if self._spin_s <= 0 or self._may_spin is None or not self._may_spin():
            return False
        if trio.lowlevel.current_statistics().tasks_runnable:
            return False
        deadline = time.perf_counter() + self._spin_s
        while time.perf_counter() < deadline:
            if self._ready():
                return True
        return False


def _fuse_fds() -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            pass  # the listing's own descriptor, already closed
    return found


def install(pyfuse3_module: Any, *, may_spin: Callable[[], bool] | None = None,
            spin_s: float = SPIN_S) -> RequestWait | None:
    """Wrap pyfuse3's wait after ``pyfuse3.init``; None (and pyfuse3's own wait kept) when
    this pyfuse3 has no such function or the session's descriptor cannot be told apart."""
    original: Callable[[], Awaitable[bool]] | None = getattr(pyfuse3_module, _PYFUSE3_HOOK, None)
    if original is None or not callable(original):
        log.info("pyfuse3 %s has no %s; keeping its own request wait",
                 getattr(pyfuse3_module, "__version__", "?"), _PYFUSE3_HOOK)
        return None
    fds = _fuse_fds()
    if len(fds) != 1:
        log.info("%d /dev/fuse descriptors open; keeping pyfuse3's own request wait", len(fds))
        return None
    if isinstance(original, RequestWait):  # a second session in this process
        original = original.park
    wait = RequestWait(fds[0], original, may_spin=may_spin, spin_s=spin_s)
    setattr(pyfuse3_module, _PYFUSE3_HOOK, wait)
    return wait
