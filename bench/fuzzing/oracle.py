"""The oracles of a case (:func:`run_case`): mount refused in one line, or the walk
finishes without a crash, hang, stall, log flood or memory growth, and every inode the
damage did not touch looks as in the pristine image (its :class:`Reference`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import signal
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from asyncfs.cli.options import MountOptions
from asyncfs.cli.wiring import open_stack
from asyncfs.engine.volume import Volume
from asyncfs.engine.volume_maps import ExtentFileMap, IndirectFileMap
from asyncfs.errors import AsyncfsError
from asyncfs.ext4.group import inode_location
from bench.fuzzing.cases import Case
from bench.fuzzing.damage import build_damaged, damaged_ranges
from bench.fuzzing.layout import Layout
from bench.fuzzing.walk import CaseFailure, InodeView, Walker

if TYPE_CHECKING:
    from bench.fuzzing.images import ImageStore

LOG_REPEAT_LIMIT = 20  # one damaged object may be reached a few times, not once per name


@dataclass
class Outcome:
    """Result of one case."""

    verdict: str  # "refused", "served", or a failure: crash/hang/memory/bytes/clean/message
    detail: str = ""
    seconds: float = 0.0
    peak_mib: float = 0.0
    log_records: int = 0
    longest_step: float = 0.0
    errors: int = 0
    inodes: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict not in ("refused", "served")


class _Hang(BaseException):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _Hang()


@dataclass
class Reference:
    """The pristine image as the walk sees it, and each inode's footprint on the device."""

    views: dict[int, InodeView]
    footprint: dict[int, list[tuple[int, int]]]


class _RecordingHost:
    """MapHost proxy that records the mapping blocks a file map reads."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.block_size = vol.block_size
        self.blocks_count = vol.blocks_count
        self.blocks: list[int] = []

    async def extent_block(self, ino: int, generation: int, pblk: int, depth: int) -> Any:
        self.blocks.append(pblk)
        return await self.vol.extent_block(ino, generation, pblk, depth)

    async def pointer_block(self, ino: int, pblk: int) -> Any:
        self.blocks.append(pblk)
        return await self.vol.pointer_block(ino, pblk)


async def _footprint(vol: Volume, ino: int) -> list[tuple[int, int]]:
    """Device byte ranges that make up inode ``ino``: its slot, mapping blocks, data, xattr
    block. Damage outside them must not change what the inode shows."""
    sb = vol.sb
    inode = await vol.inode(ino)
    gd = vol._gds[(ino - 1) // sb.s_inodes_per_group]
    loc = inode_location(sb, gd, ino)
    out = [(loc, loc + sb.s_inode_size)]
    bs = vol.block_size
    if inode.i_file_acl:
        out.append((inode.i_file_acl * bs, (inode.i_file_acl + 1) * bs))
    fast_link = inode.is_lnk and vol._is_fast_symlink(inode)
    if (inode.is_reg or inode.is_dir or inode.is_lnk) and not inode.has_inline_data \
            and not fast_link:
        host = _RecordingHost(vol)
        fmap: Any = (ExtentFileMap(host, inode) if inode.uses_extents
                     else IndirectFileMap(host, inode))
        runs = await fmap.map(0, inode.i_size)
        for r in runs:
            if r.dev_off is not None:
                first = r.dev_off - r.dev_off % bs
                out.append((first, r.dev_off + r.length))
        out += [(b * bs, (b + 1) * bs) for b in host.blocks]
    return out


def build_reference(img: Path, nocsum: bool) -> Reference:
    async def main() -> Reference:
        opts = MountOptions(cache_size=8 << 20, verify_csum=not nocsum)
        async with open_stack(img, opts) as stack:
            w = Walker(stack.volume, img, op_timeout=60)
            try:
                await w.walk()
            finally:
                w.close()
            bad = {ino: v.errors for ino, v in w.seen.items() if v.errors}
            if bad:
                raise RuntimeError(f"pristine image {img} has errors: {bad}")
            fp = {ino: await _footprint(stack.volume, ino) for ino in w.seen}
            return Reference(w.seen, fp)

    return trio.run(main)


def _clean_inodes(ref: Reference, case: Case, lay: Layout) -> set[int]:
    if case.truncate is not None or any(p.at.split(":")[0] in ("sb", "gdt", "gd")
                                        for p in case.patches):
        return set()
    dmg = damaged_ranges(case, lay)
    clean = set()
    for ino, fp in ref.footprint.items():
        if not any(a < e and s < b for a, b in fp for s, e in dmg):
            clean.add(ino)
    return clean


def _compare(ino: int, got: InodeView, want: InodeView) -> str | None:
    # a failed lookup of a child is the child's damage, not this directory's
    errors = [e for e in got.errors if not e.startswith("lookup ")]
    if errors:
        return f"errors {errors}"
    if got.attr != want.attr:
        return f"attr {got.attr} != {want.attr}"
    for what in ("reads", "link", "xattrs", "names"):
        if getattr(got, what) != getattr(want, what):
            return f"{what} differ"
    return None


class _StepTimer(trio.abc.Instrument):
    """Longest single trio task step: how long one request held the event loop, in CPU time
    of this thread (wall time would also count the time other processes of a busy CI machine
    took the core away)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.what = ""
        self._t = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        dt = time.thread_time() - self._t
        if dt > self.longest:
            self.longest = dt
            self.what = task.name


class _LogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.by_msg: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        key = record.getMessage()
        self.by_msg[key] = self.by_msg.get(key, 0) + 1


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(store: ImageStore, case: Case, workdir: Path, *, op_timeout: float = 10.0,
             case_timeout: float = 60.0, mem_limit_mib: float = 64.0,
             trace_memory: bool = False, step_limit: float = 1.0) -> Outcome:
    """Build the damaged image for ``case``, mount it in-process and walk it, with every
    oracle of the module docstring. Never raises for a bug in asyncfs: it is the verdict."""
    pristine = store.image(case.preset, case.profile, case.seed)
    lay = store.layout(pristine)
    ref = store.reference(pristine, case.nocsum)
    dst = workdir / "damaged.img"
    build_damaged(pristine, lay, case, dst)
    clean = _clean_inodes(ref, case, lay)
    counter = _LogCounter()
    logger = logging.getLogger("asyncfs")
    logger.addHandler(counter)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    old_propagate = logger.propagate
    logger.propagate = False
    walker: Walker | None = None
    steps = _StepTimer()
    t0 = time.monotonic()
    peak = 0.0
    outcome: Outcome

    async def main() -> Outcome:
        nonlocal walker
        opts = MountOptions(cache_size=4 << 20, verify_csum=not case.nocsum)
        try:
            with trio.fail_after(op_timeout):
                cm = open_stack(dst, opts)
                stack = await cm.__aenter__()
        except AsyncfsError as e:
            msg = str(e)
            if not msg or "\n" in msg:
                return Outcome("message", f"mount refused with {type(e).__name__} {msg!r}")
            return Outcome("refused", f"{type(e).__name__}: {msg}")
        except trio.TooSlowError:
            return Outcome("hang", "mount took too long")
        try:
            walker = Walker(stack.volume, dst, op_timeout=op_timeout)
            await walker.walk()
            for ino in sorted(clean & walker.seen.keys()):
                diff = _compare(ino, walker.seen[ino], ref.views[ino])
                if diff is not None:
                    return Outcome("clean", f"undamaged inode {ino}: {diff}")
            return Outcome("served", inodes=len(walker.seen), errors=walker.errors)
        finally:
            with trio.move_on_after(op_timeout) as cs:
                cs.shield = True
                await cm.__aexit__(None, None, None)

    if trace_memory:
        tracemalloc.start()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with _watchdog(case_timeout):
            outcome = trio.run(main, instruments=[steps])
    except CaseFailure as e:
        outcome = Outcome(e.verdict, e.detail)
    except _Hang:
        outcome = Outcome("hang", f"no answer within {case_timeout}s (a loop that never awaits?)")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        hang = any(isinstance(x, _Hang) for x in _leaves(e))
        fails = [x for x in _leaves(e) if isinstance(x, CaseFailure)]
        if fails:
            outcome = Outcome(fails[0].verdict, fails[0].detail)
        elif hang:
            outcome = Outcome("hang", f"no answer within {case_timeout}s")
        else:
            tb = "".join(traceback.format_exception(e)[-8:])
            outcome = Outcome("crash", f"{type(e).__name__}: {e}\n{tb}")
    finally:
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        logger.removeHandler(counter)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        if walker is not None:
            walker.close()
        dst.unlink(missing_ok=True)
    outcome.seconds = time.monotonic() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024
    if not trace_memory:
        peak = grew  # the process's high-water mark rose by this much during the case
    outcome.peak_mib = peak
    outcome.log_records = counter.count
    outcome.longest_step = steps.longest
    if not outcome.failed and steps.longest > step_limit:
        outcome = dataclasses.replace(
            outcome, verdict="stall",
            detail=f"one task step held the event loop {steps.longest:.2f}s ({steps.what})")
    if counter.by_msg and not outcome.failed:
        msg, n = max(counter.by_msg.items(), key=lambda kv: kv[1])
        if n > LOG_REPEAT_LIMIT:
            outcome = dataclasses.replace(outcome, verdict="logflood",
                                          detail=f"{n}x {msg!r}")
    if not outcome.failed and peak > mem_limit_mib:
        outcome = dataclasses.replace(outcome, verdict="memory",
                                      detail=f"{'traced peak' if trace_memory else 'RSS rose'}"
                                             f" {peak:.1f} MiB > {mem_limit_mib}")
    return outcome


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        out: list[BaseException] = []
        for x in e.exceptions:
            out += _leaves(x)
        return out
    return [e, *[x for x in (e.__context__, e.__cause__) if x is not None]]
