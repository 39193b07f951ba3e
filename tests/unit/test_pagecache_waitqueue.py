"""The pure wait table: page lock, WAITERS, wake walk (invariants 1-7 of docs/invariants.md).

Each invariant test runs twice: against the real code, where the check must hold, and against
a deliberately broken variant (named in the docstring, built with ``mutants.mutant`` or a small
replacement), where the same check must catch the breakage. That is the test's proof of teeth.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asyncfs.pagecache import (
    PG_LOCKED,
    PG_WAITERS,
    Page,
    PageStateError,
    WaitEntry,
    WaitTable,
)
from asyncfs.pagecache.waitqueue import PAGE_LOCK_UNFAIRNESS
from tests.mutants import mutant

VARIANTS = ["kernel", "broken"]


class Rec:
    """Records callback order; entries built through it log their name when woken."""

    def __init__(self) -> None:
        self.woken: list[str] = []

    def entry(self, name: str, *, exclusive: bool = False, hook: Callable[[], object] | None = None
              ) -> WaitEntry:
        def func(e: WaitEntry) -> None:
            self.woken.append(name)
            if hook is not None:
                hook()

        return WaitEntry(func, exclusive=exclusive)


def violations(wt: WaitTable) -> bool:
    try:
        wt.check_invariants()
    except PageStateError:
        return True
    return False


# -- 1. mutual exclusion ----------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_inv1_mutual_exclusion(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One owner per lock; unlocking an unlocked page is an error.

    Broken variant: ``unlock_page`` without the LOCKED check (a double unlock goes unseen)."""
    if variant == "broken":
        monkeypatch.setattr(
            WaitTable, "unlock_page",
            mutant(WaitTable, "unlock_page", "if not flags & PG_LOCKED:", "if False:"),
        )
    wt = WaitTable(0)
    p = Page(1)
    assert wt.trylock_page(p)
    assert not wt.trylock_page(p)  # a second owner is refused
    e = WaitEntry(lambda e: None, exclusive=True)
    assert not wt.lock_page_async(p, e)  # and queued, not granted
    wt.remove_wait_entry(e)
    wt.unlock_page(p)
    caught = False
    try:
        wt.unlock_page(p)
    except PageStateError:
        caught = True
    assert caught == (variant == "kernel")


# -- 2. no lost wakeup --------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_inv2_no_lost_wakeup(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every unlock no (P, LOCKED) waiter stays queued while P is unlocked.

    Broken variant: the enqueue path forgets ``SetPageWaiters``, so unlock's fast path
    skips the wake and the waiter sleeps forever."""
    if variant == "broken":
        monkeypatch.setattr(
            WaitTable, "_wait_on_page_locked_async",
            mutant(WaitTable, "_wait_on_page_locked_async",
                   "page.flags |= PG_WAITERS", "pass"),
        )
    wt = WaitTable(0)
    rec = Rec()
    p = Page(7, PG_LOCKED)
    assert not wt.wait_on_page_locked_async(p, rec.entry("r1"))
    assert not wt.lock_page_async(p, rec.entry("w1", exclusive=True))
    wt.unlock_page(p)
    lost = violations(wt) or rec.woken != ["r1", "w1"]
    assert lost == (variant == "broken")


# -- 3. WAITERS soundness ------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_inv3_waiters_soundness(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued entry => WAITERS; a stale WAITERS is cleared by the next wake that finds no
    entry of the page, even when other pages' entries share the head (bits = 0).

    Broken variant: the wake clears WAITERS only when the whole head is empty (ignores the
    page-match rule), so with a collision a stale bit survives forever."""
    if variant == "broken":
        monkeypatch.setattr(
            WaitTable, "wake_up_page_bit",
            mutant(WaitTable, "wake_up_page_bit",
                   "if not page_match or head.count == 0:", "if head.count == 0:"),
        )
    wt = WaitTable(0)
    p, q = Page(1, PG_LOCKED), Page(2, PG_LOCKED)
    ep = WaitEntry(lambda e: None)
    eq = WaitEntry(lambda e: None)
    assert not wt.wait_on_page_locked_async(p, ep)
    assert not wt.wait_on_page_locked_async(q, eq)
    assert p.flags & PG_WAITERS and not violations(wt)
    assert wt.remove_wait_entry(ep)  # cancel: WAITERS is now stale (kernel leaves it)
    assert p.flags & PG_WAITERS
    wt.unlock_page(p)  # finds no entry of p: must clear the stale bit
    stale = bool(p.flags & PG_WAITERS)
    assert stale == (variant == "broken")
    assert eq.queued and q.flags & PG_WAITERS  # q's entry untouched either way


# -- 4. key isolation ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["kernel", "no_key_filter", "stop_at_other_key"])
def test_inv4_key_isolation(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wake for (P, LOCKED) never dequeues or calls back an entry of another page in the
    same head, and does not stop at one.

    Broken variants: ``no_key_filter`` (wakes every entry of the head, like a plain
    wake_up on a shared queue); ``stop_at_other_key`` (the walk ends at the first entry of
    another page)."""
    if variant == "no_key_filter":
        monkeypatch.setattr(
            WaitTable, "wake_up_page_bit",
            mutant(WaitTable, "wake_up_page_bit", "if e.page is page:", "if True:"),
        )
    elif variant == "stop_at_other_key":
        monkeypatch.setattr(
            WaitTable, "wake_up_page_bit",
            mutant(WaitTable, "wake_up_page_bit", "        if e is last:\n",
                   "        if e.page is not page:\n            break\n"
                   "        if e is last:\n"),
        )
    wt = WaitTable(0)
    rec = Rec()
    p, q = Page(10, PG_LOCKED), Page(11, PG_LOCKED)
    wt.wait_on_page_locked_async(q, rec.entry("q1"))
    wt.wait_on_page_locked_async(p, rec.entry("p1"))
    wt.wait_on_page_locked_async(q, rec.entry("q2"))
    wt.wait_on_page_locked_async(p, rec.entry("p2"))
    wt.unlock_page(p)
    ok = rec.woken == ["p1", "p2"] and len(wt.heads()[0]) == 2
    assert ok == (variant == "kernel")


# -- 5. wake accounting -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["kernel", "wake_all", "no_stop_on_relock"])
def test_inv5_wake_accounting(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One unlock wakes every shared waiter of P up to and including the first exclusive one;
    if the lock is re-taken during the walk it stops before the next exclusive one.

    Broken variants: ``wake_all`` (exclusive entries do not end the walk: a thundering herd);
    ``no_stop_on_relock`` (an exclusive waiter is woken although the lock was re-taken)."""
    if variant == "wake_all":
        monkeypatch.setattr(
            WaitTable, "wake_up_page_bit",
            mutant(WaitTable, "wake_up_page_bit",
                   "                if e.exclusive:\n                    break\n", ""),
        )
    elif variant == "no_stop_on_relock":
        monkeypatch.setattr(
            WaitTable, "wake_up_page_bit",
            mutant(WaitTable, "wake_up_page_bit",
                   "break  # re-taken: leave this and the rest queued", "pass"),
        )
    wt = WaitTable(0)
    rec = Rec()
    p = Page(3, PG_LOCKED)
    for name, ex in [("a", False), ("b", False), ("X", True), ("c", False), ("Y", True)]:
        e = rec.entry(name, exclusive=ex)
        if ex:
            wt.lock_page_async(p, e)
        else:
            wt.wait_on_page_locked_async(p, e)
    wt.unlock_page(p)
    first_ok = rec.woken == ["a", "b", "X"]
    # Re-taken during the walk: a shared waiter's callback grabs the lock.
    wt2 = WaitTable(0)
    rec2 = Rec()
    p2 = Page(4, PG_LOCKED)
    wt2.wait_on_page_locked_async(p2, rec2.entry("s", hook=lambda: p2.trylock()))
    wt2.lock_page_async(p2, rec2.entry("E", exclusive=True))
    wt2.unlock_page(p2)
    second_ok = rec2.woken == ["s"] and len(wt2.heads()[0]) == 1
    assert (first_ok and second_ok) == (variant == "kernel")
    if variant == "kernel":
        assert not violations(wt) and not violations(wt2)


# -- 6. hand-off and bounded unfairness ---------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_inv6_bounded_unfairness_then_handoff(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock waiter may lose the lock to a thief a few times (PAGE_LOCK_UNFAIRNESS), then
    the waker hands the lock straight to it: it owns the page when it resumes.

    Broken variant: ``lock_page_async`` never spends the unfairness budget (no hand-off), so
    a steady thief starves the waiter."""
    if variant == "broken":
        monkeypatch.setattr(
            WaitTable, "lock_page_async",
            mutant(WaitTable, "lock_page_async", "entry.unfairness -= 1", "pass"),
        )
    wt = WaitTable(0)
    p = Page(5)
    assert wt.trylock_page(p)  # the thief holds it
    woken: list[WaitEntry] = []
    e = WaitEntry(woken.append, exclusive=True)
    assert not wt.lock_page_async(p, e)
    steals = 0
    owned = False
    for _ in range(50):
        wt.unlock_page(p)
        assert woken and woken.pop() is e  # exactly one callback per queued result
        if e.handed:
            owned = bool(p.flags & PG_LOCKED)  # nobody could steal in between
            break
        assert wt.trylock_page(p)  # the thief runs first and steals it again
        steals += 1
        assert not wt.lock_page_async(p, e)  # the waiter retries and queues again
    assert owned == (variant == "kernel")
    if owned:
        assert steals == PAGE_LOCK_UNFAIRNESS
        assert not wt.trylock_page(p)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inv6_exclusive_pending_wake_passed_on(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exclusively woken waiter that will not take the lock passes the wake on
    (``finish_wait``), so the next exclusive waiter is not stranded.

    Broken variant: ``finish_wait`` forgets the pending wake (it is swallowed)."""
    if variant == "broken":
        monkeypatch.setattr(
            WaitTable, "finish_wait",
            mutant(WaitTable, "finish_wait", "if entry.wake_pending:", "if False:"),
        )
    wt = WaitTable(0)
    rec = Rec()
    p = Page(6, PG_LOCKED)
    a, b = rec.entry("a", exclusive=True), rec.entry("b", exclusive=True)
    wt.lock_page_async(p, a)
    wt.lock_page_async(p, b)
    wt.unlock_page(p)
    assert rec.woken == ["a"] and b.queued
    assert not violations(wt)  # b queued on an unlocked page is fine while a's wake pends
    wt.finish_wait(a)  # a gives up (cancelled, or the page became UPTODATE)
    passed_on = rec.woken == ["a", "b"] and not b.queued and not violations(wt)
    assert passed_on == (variant == "kernel")


# -- 7. exactly once ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_inv7_exactly_once(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Acquired now" leaves no entry queued (its callback never fires); each "queued"
    result is called back exactly once, however many unlocks follow.

    Broken variant: the final trylock succeeds but the entry is left queued (the async page
    lock patch's ``__remove_wait_queue`` on success dropped)."""
    if variant == "broken":
        monkeypatch.setattr(
            WaitTable, "_wait_on_page_locked_async",
            mutant(WaitTable, "_wait_on_page_locked_async",
                   "    if done:\n        head.remove(entry)\n", ""),
        )
    wt = WaitTable(2)
    p = Page(9)
    calls: list[WaitEntry] = []
    now = WaitEntry(calls.append, exclusive=True)
    assert wt.lock_page_async(p, now)  # acquired now
    later = WaitEntry(calls.append, exclusive=True)
    assert not wt.lock_page_async(p, later)
    wt.unlock_page(p)  # hands the wake to `later` only
    if later.woken and p.trylock():
        wt.unlock_page(p)
    wt2_unlocks = 0
    while p.flags & PG_LOCKED and wt2_unlocks < 3:
        wt.unlock_page(p)
        wt2_unlocks += 1
    ok = calls == [later] and now.wakes == 0 and later.wakes == 1 and not now.queued
    assert ok == (variant == "kernel")


def test_wait_table_hash_spreads_and_bits() -> None:
    """Consecutive pages spread over the heads; bits = 0 puts every page in one head."""
    wt = WaitTable(8)
    heads = {id(wt.page_waitqueue(Page(i))) for i in range(256)}
    assert len(heads) > 128
    one = WaitTable(0)
    assert len({id(one.page_waitqueue(Page(i))) for i in range(10)}) == 1
    with pytest.raises(ValueError):
        WaitTable(-1)


def test_requeue_of_queued_entry_is_refused() -> None:
    wt = WaitTable(0)
    p = Page(1, PG_LOCKED)
    e = WaitEntry(lambda e: None)
    assert not wt.wait_on_page_locked_async(p, e)
    with pytest.raises(PageStateError):
        wt.wait_on_page_locked_async(p, e)
    assert wt.remove_wait_entry(e) and not wt.remove_wait_entry(e)
