"""A bounded Hypothesis state-machine soak of the engine over {read, evict, fail next I/O,
release I/O, cancel a reader}, with the invariants of docs/invariants.md checked after every
step.

Hypothesis drives the machine from a worker thread; every rule runs its operation on the trio
loop (``trio.from_thread.run``) and lets the loop settle before the checks, so each check sees
a quiescent state: every woken task has run, every parked one is parked.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from asyncfs.engine.cache import PageCache
from asyncfs.errors import DeviceIOError
from asyncfs.pagecache import PAGE_SIZE, PG_ERROR, PG_LOCKED, PG_UPTODATE
from asyncfs.testing import GatedDevice, ListFileMap, pattern
from asyncfs.types import Run

DEV = pattern(24 * PAGE_SIZE + 1500, seed=7)
# A file of unaligned 1 KiB-block extents, a hole and inline-free tail.
FILE = ListFileMap(
    40_000,
    [
        Run(0, 9216, dev_off=3 * 1024),
        Run(9216, 3000),
        Run(12216, 27784, dev_off=40 * 1024 + 512),
    ],
)


def file_bytes() -> bytes:
    out = bytearray()
    for r in FILE.runs:
        out += DEV[r.dev_off : r.dev_off + r.length] if r.dev_off is not None else bytes(r.length)
    return bytes(out)


FILE_DATA = file_bytes()


class Reader:
    def __init__(self, kind: str, off: int, n: int) -> None:
        self.kind, self.off, self.n = kind, off, n
        self.scope = trio.CancelScope()
        self.result: object = None
        self.done = False


class EngineMachine(RuleBasedStateMachine):
    nursery: trio.Nursery
    wait_mode = "async"

    def __init__(self) -> None:
        super().__init__()
        self.dev = GatedDevice(DEV)
        self.cache = PageCache(
            self.dev, cache_bytes=8 * PAGE_SIZE, readahead_max=8 * PAGE_SIZE,
            wait_table_bits=0, wait_mode=self.wait_mode,  # type: ignore[arg-type]
        )
        self.ra = self.cache.new_readahead()
        self.readers: list[Reader] = []
        self.cancelled = 0

    # -- plumbing -----------------------------------------------------------------------
    def on_loop(self, fn: Any, *args: Any, **kw: Any) -> Any:
        async def run() -> Any:
            res = fn(*args, **kw)
            await trio.testing.wait_all_tasks_blocked(cushion=0.0001)
            # threads mode: a woken worker thread hands back to trio asynchronously; wait
            # until every woken reader has resumed (no page pinned by a pending wake).
            for _ in range(2000):
                if not any(p.refcount for p in self.cache.lru):
                    break
                await trio.sleep(0.0005)
                await trio.testing.wait_all_tasks_blocked(cushion=0.0001)
            return res

        return trio.from_thread.run(run)

    async def _read(self, r: Reader) -> None:
        with r.scope:
            try:
                if r.kind == "dev":
                    r.result = await self.cache.read_dev(r.off, r.n)
                else:
                    r.result = bytes(await self.cache.read_file(FILE, self.ra, r.off, r.n))
            except DeviceIOError:
                r.result = "EIO"
        r.done = True

    # -- rules --------------------------------------------------------------------------
    @rule(off=st.integers(0, len(DEV) - 1), n=st.integers(1, 5 * PAGE_SIZE))
    def read_dev(self, off: int, n: int) -> None:
        r = Reader("dev", off, min(n, len(DEV) - off))
        self.readers.append(r)
        self.on_loop(self.nursery.start_soon, self._read, r)

    @rule(off=st.integers(0, FILE.size + 100), n=st.integers(1, 6 * PAGE_SIZE))
    def read_file(self, off: int, n: int) -> None:
        r = Reader("file", off, n)
        self.readers.append(r)
        self.on_loop(self.nursery.start_soon, self._read, r)

    @rule(idx=st.integers(0, 24))
    def evict(self, idx: int) -> None:
        page = self.cache.lookup(idx)
        if page is not None:
            self.on_loop(self.cache.lru.evict, page)

    @rule(on=st.booleans())
    def host_cache(self, on: bool) -> None:
        """Toggle whether the device answers the RWF_NOWAIT probe (synchronous completion)."""
        self.dev.host_cached = on

    @rule()
    def fail_next_io(self) -> None:
        self.dev.fail_next += 1

    @precondition(lambda self: self.dev.pending)
    @rule(n=st.integers(1, 3), newest=st.booleans())
    def release_io(self, n: int, newest: bool) -> None:
        self.on_loop(self.dev.release, n, newest=newest)

    @precondition(lambda self: any(not r.done for r in self.readers))
    @rule(data=st.data())
    def cancel_reader(self, data: st.DataObject) -> None:
        live = [r for r in self.readers if not r.done]
        r = data.draw(st.sampled_from(live))
        self.cancelled += 1
        self.on_loop(r.scope.cancel)

    # -- invariants after every step ----------------------------------------------------------
    @invariant()
    def engine_invariants(self) -> None:
        c = self.cache
        c.wait_table.check_invariants()  # 2, 3: WAITERS sound, no lost wakeup
        queued = sum(1 for _ in c.wait_table.queued_entries())
        locked = 0
        for p in c.lru:
            f = p.flags
            assert not (f & PG_UPTODATE and f & PG_ERROR)  # 10: exactly one outcome
            if f & PG_UPTODATE:  # 10: UPTODATE data is the device's and never changes
                want = DEV[p.index * PAGE_SIZE : (p.index + 1) * PAGE_SIZE]
                assert p.data[: len(want)] == want  # (a frame is whole past the device end)
            if f & PG_LOCKED:
                locked += 1
                assert not f & PG_UPTODATE
            assert p.refcount == 0  # 14: parked readers pin nothing
        assert len(c.lru) <= c.lru.limit + locked  # 14: bounded memory
        s = c.stats()
        if self.wait_mode == "async":
            assert s["parked_now"] == queued  # 7: each park has exactly one queued entry
        # 12: no two backend reads in flight for the same page
        spans = sorted((r.offset, r.offset + r.length) for r in self.dev.pending)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert s["inflight_io"] == len(self.dev.pending)
        for r in self.readers:  # 10, 8: no reader returns wrong or short data
            if r.done and r.result is not None and r.result != "EIO":
                want = DEV if r.kind == "dev" else FILE_DATA
                assert r.result == want[r.off : r.off + r.n]

    def teardown(self) -> None:
        for _ in range(100):
            if all(r.done for r in self.readers):
                break
            self.on_loop(self.dev.release)
        assert all(r.done for r in self.readers)
        self.engine_invariants()
        assert self.cache.stats()["parked_now"] == 0
        assert sum(1 for _ in self.cache.wait_table.queued_entries()) == 0


@pytest.mark.parametrize("mode", ["async", "threads"])
async def test_engine_state_machine_soak(mode: str) -> None:
    """Random interleavings keep every invariant. (Each invariant's teeth are shown by its
    own test, which builds the invariant broken; this soak looks for interleavings those
    missed.)"""
    n_examples = 150 if mode == "async" else 25

    async with trio.open_nursery() as nursery:
        machine = type(f"EngineMachine_{mode}", (EngineMachine,), {
            "nursery": nursery, "wait_mode": mode,
        })

        def run() -> None:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=n_examples, stateful_step_count=25, deadline=None,
                    suppress_health_check=list(HealthCheck), database=None,
                ),
            )

        await trio.to_thread.run_sync(run)
        nursery.cancel_scope.cancel()
