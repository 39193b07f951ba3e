"""The hashed page wait table and its wake rules (``page_wait_table``, ``wake_page_function``).

A fixed table of ``2**bits`` wait-queue heads; a page's head is chosen by hashing its key, so
many pages share a head and a wake must filter entries by key ``(page, bit)``. Each head is an
intrusive doubly-linked list (O(1) enqueue and cancel, a walk that survives removal of the
entry it is visiting), like ``struct wait_queue_head``.

A wait entry carries its key, an exclusive flag and a wake callback. The callback runs inside
the wake walk (the kernel runs ``wait.func`` under the bucket spinlock), so it must only note
the wake and schedule its owner (trio: ``reschedule``; threads: ``Event.set``); it must not touch
the wait table.

All of this is pure and synchronous: one call is atomic with respect to the trio loop, which is
what makes "add entry, set WAITERS, final trylock" free of lost wakeups (invariant 2,
docs/invariants.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from asyncfs.pagecache.page import PG_LOCKED, PG_WAITERS, Page, PageStateError

# The kernel's sysctl_page_lock_unfairness default: how many times a lock waiter may be woken
# and find the lock stolen before the waker hands the lock to it directly.
PAGE_LOCK_UNFAIRNESS = 5

WakeFunc = Callable[["WaitEntry"], None]

# Fibonacci hashing of the page index (hash_ptr in the kernel): spreads consecutive indexes.
_GOLDEN = 0x61C8864680B583EB
_MASK64 = (1 << 64) - 1


class WaitEntry:
    """``struct wait_page_queue``: a key ``(page, bit)``, an exclusive flag and a callback.

    State, for the exactly-once rules (invariant 7):
    ``queued``: linked into a head now. ``woken``: dequeued by a wake (never by cancel);
    ``handed``: the waker set the lock bit on this entry's behalf (WQ_FLAG_DONE), the owner
    of the entry owns the page lock; ``handoff``: ask for hand-off (WQ_FLAG_CUSTOM), set when the
    unfairness budget is spent. ``flags_at_wake``: the page flags the waker saw (a reader of
    a page whose I/O failed learns of the error even if a retry starts before it runs).
    """

    __slots__ = (
        "_next",
        "_prev",
        "bit",
        "exclusive",
        "flags_at_wake",
        "func",
        "handed",
        "handoff",
        "page",
        "queued",
        "unfairness",
        "wake_pending",
        "wakes",
        "woken",
    )

    def __init__(self, func: WakeFunc, *, exclusive: bool = False) -> None:
        self.func = func
        self.exclusive = exclusive
        self.page: Page | None = None
        self.bit = PG_LOCKED
        self.queued = False
        self.woken = False
        self.handed = False
        self.handoff = False
        self.unfairness = PAGE_LOCK_UNFAIRNESS
        self.flags_at_wake = 0
        self.wakes = 0  # times the callback fired, over the entry's life (tests: exactly once)
        self.wake_pending = False  # woken exclusively, lock not yet retried or passed on
        self._prev: WaitEntry | None = None
        self._next: WaitEntry | None = None

    def __repr__(self) -> str:
        kind = "excl" if self.exclusive else "shared"
        return f"WaitEntry({self.page!r}, {kind}, queued={self.queued}, woken={self.woken})"


class WaitQueueHead:
    """``wait_queue_head_t``: a circular list with a sentinel; entries of many pages."""

    __slots__ = ("_sentinel", "count")

    def __init__(self) -> None:
        s = WaitEntry(_never_called)
        s._prev = s
        s._next = s
        self._sentinel = s
        self.count = 0

    def add_tail(self, entry: WaitEntry) -> None:
        s = self._sentinel
        last = s._prev
        assert last is not None
        entry._prev = last
        entry._next = s
        last._next = entry
        s._prev = entry
        entry.queued = True
        self.count += 1

    def remove(self, entry: WaitEntry) -> None:
        p, n = entry._prev, entry._next
        assert p is not None and n is not None
        p._next = n
        n._prev = p
        entry._prev = entry._next = None
        entry.queued = False
        self.count -= 1

    def __iter__(self) -> Iterator[WaitEntry]:
        s = self._sentinel
        e = s._next
        while e is not s:
            assert e is not None
            nxt = e._next
            yield e
            e = nxt

    def __len__(self) -> int:
        return self.count


def _never_called(entry: WaitEntry) -> None:  # pragma: no cover - sentinel only
    raise PageStateError("sentinel wait entry woken")


class WaitTable:
    """``page_wait_table``: the heads plus the page-lock operations that use them."""

    __slots__ = ("_heads", "_mask", "_pending", "bits", "wakeups")

    def __init__(self, bits: int = 8) -> None:
        if not 0 <= bits <= 20:
            raise ValueError("wait_table_bits must be in 0..20")
        self.bits = bits
        self._mask = (1 << bits) - 1
        self._heads = [WaitQueueHead() for _ in range(1 << bits)]
        self.wakeups = 0
        # Entries woken exclusively whose owner has not yet retried the lock or passed the
        # wake on: while one exists, waiters queued behind it on an unlocked page are not lost.
        self._pending: set[WaitEntry] = set()

    # -- lookup -------------------------------------------------------------------------
    def page_waitqueue(self, page: Page) -> WaitQueueHead:
        if not self.bits:
            return self._heads[0]
        h = ((page.index * _GOLDEN) & _MASK64) >> (64 - self.bits)
        return self._heads[h & self._mask]

    def heads(self) -> list[WaitQueueHead]:
        return self._heads

    def queued_entries(self) -> Iterator[WaitEntry]:
        for head in self._heads:
            yield from head

    # -- lock / wait (``__wait_on_page_locked_async`` of the async page lock patch) -----
    def _wait_on_page_locked_async(self, page: Page, entry: WaitEntry, set_: bool) -> bool:
        """Queue ``entry`` at the tail, set WAITERS, then the final test: if it succeeds the
        entry is taken off again (its callback will never run) and True is returned."""
        if entry.queued:
            raise PageStateError("wait entry is already queued")
        if entry.wake_pending:
            entry.wake_pending = False
            self._pending.discard(entry)
        entry.page = page
        entry.bit = PG_LOCKED
        entry.exclusive = set_
        entry.woken = False
        entry.handed = False
        head = self.page_waitqueue(page)
        head.add_tail(entry)
        page.flags |= PG_WAITERS
        # The final test, after WAITERS is visible: an unlock from now on will find us.
        done = page.trylock() if set_ else not page.flags & PG_LOCKED
        if done:
            head.remove(entry)
        return done

    def lock_page_async(self, page: Page, entry: WaitEntry) -> bool:
        """``__lock_page_async``: True = page locked by the caller now, entry not queued.
        False = queued (``-EIOCBQUEUED``): the callback fires exactly once; then, unless
        ``entry.handed`` (the caller owns the lock), the caller retries or ``finish_wait``."""
        entry.unfairness -= 1
        if entry.unfairness < 0:
            entry.handoff = True
        return self._wait_on_page_locked_async(page, entry, True)

    def wait_on_page_locked_async(self, page: Page, entry: WaitEntry) -> bool:
        """True = page is unlocked now (entry not queued); False = queued until unlock."""
        return self._wait_on_page_locked_async(page, entry, False)

    @staticmethod
    def trylock_page(page: Page) -> bool:
        return page.trylock()

    def unlock_page(self, page: Page) -> None:
        """Clear LOCKED; only if WAITERS is set walk the head (the fast path)."""
        flags = page.flags
        if not flags & PG_LOCKED:
            raise PageStateError(f"unlock of unlocked page {page.index}")
        page.flags = flags & ~PG_LOCKED
        if flags & PG_WAITERS:
            self.wake_up_page_bit(page, PG_LOCKED)

    def remove_wait_entry(self, entry: WaitEntry) -> bool:
        """Cancel: dequeue ``entry`` if still queued (True). A woken entry is never dequeued
        twice; its callback has already fired."""
        if not entry.queued:
            return False
        assert entry.page is not None
        self.page_waitqueue(entry.page).remove(entry)
        return True

    def finish_wait(self, entry: WaitEntry) -> None:
        """The owner of an exclusively woken entry will not retry the lock (cancelled, or the
        page no longer needs it): pass the wake on, so it is not swallowed
        (``abort_exclusive_wait``)."""
        if entry.wake_pending:
            entry.wake_pending = False
            self._pending.discard(entry)
            page = entry.page
            assert page is not None
            if not page.flags & PG_LOCKED and page.flags & PG_WAITERS:
                self.wake_up_page_bit(page, PG_LOCKED)

    # -- wake (wake_up_page_bit + wake_page_function) -----------------------------------
    def wake_up_page_bit(self, page: Page, bit: int) -> int:
        """Wake the entries keyed ``(page, bit)`` in order: every non-exclusive one up to and
        including the first exclusive one. Stop if ``bit`` is set again before an exclusive
        entry (the lock was re-taken). Entries of other keys are skipped, not dequeued.
        Clears WAITERS when the head is empty or no entry of this page was seen.
        Returns the number of callbacks fired."""
        head = self.page_waitqueue(page)
        s = head._sentinel
        last = s._prev  # entries queued by callbacks during the walk are not visited
        e = s._next
        page_match = False
        woken = 0
        while e is not s:
            assert e is not None
            nxt = e._next
            if e.page is page:
                page_match = True
                if e.bit == bit:
                    if e.exclusive:
                        if page.flags & bit:
                            break  # re-taken: leave this and the rest queued
                        if e.handoff:
                            page.flags |= bit
                            e.handed = True
                        else:
                            e.wake_pending = True
                            self._pending.add(e)
                    head.remove(e)
                    e.woken = True
                    e.flags_at_wake = page.flags
                    e.wakes += 1
                    woken += 1
                    e.func(e)
                    if e.exclusive:
                        break
            if e is last:
                break
            e = nxt
        self.wakeups += woken
        if not page_match or head.count == 0:
            page.flags &= ~PG_WAITERS
        return woken

    # -- checks used by tests and the soak ----------------------------------------------
    def check_invariants(self) -> None:
        """Raise PageStateError if a queued entry breaks invariant 2 or 3: every queued entry
        sits in its page's head with WAITERS set, and none waits for LOCKED on an unlocked
        page unless an exclusive wake for that page is still being acted on."""
        pending = {id(e.page) for e in self._pending}
        for idx, head in enumerate(self._heads):
            n = 0
            for e in head:
                n += 1
                page = e.page
                if page is None or not e.queued or e.woken:
                    raise PageStateError(f"bad entry state {e!r}")
                if self._heads[idx] is not self.page_waitqueue(page):
                    raise PageStateError(f"{e!r} in the wrong head")
                if not page.flags & PG_WAITERS:
                    raise PageStateError(f"{e!r} queued but page lacks WAITERS")
                if (
                    e.bit == PG_LOCKED
                    and not page.flags & PG_LOCKED
                    and id(page) not in pending
                ):
                    raise PageStateError(f"lost wakeup: {e!r} queued on an unlocked page")
            if n != head.count:
                raise PageStateError("head count out of step")
