"""Wait-entry glue between the pure wait table and trio: how a request parks on a page.

``async`` mode (the Linux patch "mm: add support for async page locking"): the entry's
callback is ``trio.lowlevel.reschedule`` of the parked task, so a parked request costs one
small entry and one suspended task, no thread.
``threads`` mode (how io_uring waited before that patch, for comparison): the callback sets a
``threading.Event`` and the request blocks a worker thread from a bounded pool on it, like
io-wq workers sleeping in ``lock_page_killable``.

Both keep the exactly-once rules (invariant 7, docs/invariants.md): an entry leaves its head
once, by a wake or by the cancel path here, and a cancelled owner of an exclusive wake passes
it on (or releases a lock handed to it) so the next waiter is not starved (invariant 6).
"""

from __future__ import annotations

import threading
from typing import Literal

import trio

from asyncfs.pagecache import WaitEntry, WaitTable
from asyncfs.pagecache.page import Page

WaitMode = Literal["async", "threads"]


class ParkCounters:
    """Counters the stats interface reports about parking."""

    __slots__ = ("parked_now", "parked_total")

    def __init__(self) -> None:
        self.parked_now = 0
        self.parked_total = 0


class TaskWaitEntry(WaitEntry):
    """A wait entry whose callback reschedules a trio task (``wake_page_function`` +
    ``wake_up_state``)."""

    __slots__ = ("counters", "task")

    def __init__(self, counters: ParkCounters, *, exclusive: bool = False) -> None:
        super().__init__(_wake_task, exclusive=exclusive)
        self.task: trio.lowlevel.Task | None = None
        self.counters = counters


def _wake_task(entry: WaitEntry) -> None:
    assert isinstance(entry, TaskWaitEntry)
    task = entry.task
    if task is not None:
        _pin(entry)
        entry.task = None
        entry.counters.parked_now -= 1
        trio.lowlevel.reschedule(task)


class ThreadWaitEntry(WaitEntry):
    """A wait entry whose callback sets an event a worker thread sleeps on."""

    __slots__ = ("counters", "event")

    def __init__(self, counters: ParkCounters, *, exclusive: bool = False) -> None:
        super().__init__(_wake_thread, exclusive=exclusive)
        self.event = threading.Event()
        self.counters = counters


def _wake_thread(entry: WaitEntry) -> None:
    assert isinstance(entry, ThreadWaitEntry)
    _pin(entry)
    entry.event.set()


def _pin(entry: WaitEntry) -> None:
    """A woken reader holds a page reference from its wake until it resumes (the kernel's
    waiter holds one throughout; ours pin nothing while parked). Without it, the completion
    that wakes readers under memory pressure could reclaim the page before they copy it."""
    page = entry.page
    if page is not None:
        page.refcount += 1


def _unpin(entry: WaitEntry) -> None:
    page = entry.page
    if page is not None and entry.woken and page.refcount > 0:
        page.refcount -= 1


class Waiter:
    """Parks the current request on a queued entry, in the chosen wait mode."""

    __slots__ = ("counters", "limiter", "mode", "wt")

    def __init__(self, wt: WaitTable, mode: WaitMode, threads: int) -> None:
        if mode not in ("async", "threads"):
            raise ValueError(f"unknown wait mode {mode!r}")
        self.wt = wt
        self.mode: WaitMode = mode
        self.counters = ParkCounters()
        self.limiter = trio.CapacityLimiter(max(1, threads)) if mode == "threads" else None

    def new_entry(self, *, exclusive: bool = False) -> WaitEntry:
        if self.mode == "async":
            return TaskWaitEntry(self.counters, exclusive=exclusive)
        return ThreadWaitEntry(self.counters, exclusive=exclusive)

    async def park(self, entry: WaitEntry) -> None:
        """Sleep until ``entry`` (already queued by the wait table) is woken. On cancellation
        the entry is dequeued (if still queued) and Cancelled propagates."""
        c = self.counters
        c.parked_total += 1
        if isinstance(entry, TaskWaitEntry):
            entry.task = trio.lowlevel.current_task()
            c.parked_now += 1
            wt = self.wt

            def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                # Called only while we are still parked, i.e. before any wake rescheduled
                # us, so the entry is still queued: dequeue it, and the wake it never got
                # goes to whoever is next.
                if wt.remove_wait_entry(entry):
                    entry.task = None
                    c.parked_now -= 1
                    return trio.lowlevel.Abort.SUCCEEDED
                return trio.lowlevel.Abort.FAILED  # pragma: no cover - woken already

            try:
                await trio.lowlevel.wait_task_rescheduled(abort)
            finally:
                _unpin(entry)
            return
        assert isinstance(entry, ThreadWaitEntry)
        c.parked_now += 1
        try:
            await trio.to_thread.run_sync(entry.event.wait, limiter=self.limiter)
        except BaseException:
            # Cancelled while queued for a worker thread: the entry may still be queued.
            self.wt.remove_wait_entry(entry)
            raise
        finally:
            c.parked_now -= 1
            if entry.event.is_set():
                _unpin(entry)

    async def lock_page(self, page: Page) -> None:
        """``lock_page`` for a trio task: take the page lock, parking (exclusive) until it is
        ours. Steals are bounded by the entry's unfairness budget, then the lock is handed
        off. Cancellation leaves no entry queued and does not swallow a wake."""
        wt = self.wt
        if wt.trylock_page(page):
            return
        entry = self.new_entry(exclusive=True)
        while True:
            if wt.lock_page_async(page, entry):
                return
            try:
                await self.park(entry)
            except BaseException:
                if entry.handed:
                    wt.unlock_page(page)  # a lock handed to a cancelled waiter goes on
                else:
                    wt.finish_wait(entry)
                raise
            if entry.handed:
                return
            if isinstance(entry, ThreadWaitEntry):
                entry.event.clear()
