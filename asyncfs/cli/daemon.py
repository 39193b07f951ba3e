"""The mount's lifetime: start-up report to the parent, serving, signals, clean unmount.

Without ``-f`` the command forks before any event loop or thread exists; the child mounts and
writes one status line into a pipe ("OK" or the error), so the parent exits 0 only once the
mount answers, or non-zero with the child's one-line reason.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pyfuse3
import trio

from asyncfs import __version__
from asyncfs.cli import control
from asyncfs.cli.messages import one_line
from asyncfs.cli.mountpoint import mount_entry, tune_fuse_connection
from asyncfs.cli.options import MountOptions
from asyncfs.cli.wiring import Stack, open_stack
from asyncfs.errors import AsyncfsError, UsageError
from asyncfs.fuse import request_wait
from asyncfs.fuse.ops import AsyncfsOperations
from asyncfs.io import FaultyDevice

log = logging.getLogger("asyncfs")
INIT_WAIT_S = 5.0  # longest wait for FUSE_INIT before start-up is reported anyway

# After SIGTERM/SIGINT, requests still in flight get this long to finish before the FUSE
# connection is aborted (their readers then see ENOTCONN instead of hanging on a dead device).
SHUTDOWN_GRACE_S = 2.0


class StartupReporter:
    """Carries the one start-up status line to the waiting parent (or nowhere with -f)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, line.replace("\n", "\\n").encode(errors="replace") + b"\n")
        except OSError:
            pass  # the parent is gone (killed or timed out); the log still has the story
        finally:
            os.close(self.fd)
            self.fd = None


def _tune_gc() -> None:
    """The cache holds up to hundreds of thousands of Page objects, which the cyclic collector
    would walk over and over (8% of the daemon's CPU on a cold stream, by perf). Startup
    objects go to the permanent generation, and young collections run less often; reference
    counting still frees the per-request garbage at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve(image: str, mountpoint: str, opts: MountOptions,
                reporter: StartupReporter) -> int:
    """Mount and serve until unmounted or signalled; return the exit status."""
    started = time.time()
    try:
        async with open_stack(image, opts) as stack:
            # Opened before mounting: a signal that arrives once the mount exists but before
            # the watcher runs is queued here instead of killing the daemon by the default
            # action and leaving the mount behind. (Before this point the default action is
            # right: a stuck image open must stay killable, and nothing is mounted yet.)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                           signal.SIGHUP) as signals:
                await _serve_mounted(stack, image, mountpoint, opts, reporter, started,
                                     signals)
    except AsyncfsError as e:
        if reporter.fd is not None:
            reporter.send(f"ERR {e}")
        else:
            print(f"asyncfs: {one_line(str(e))}", file=sys.stderr)
        return 1
    return 0


async def _serve_mounted(stack: Stack, image: str, mountpoint: str, opts: MountOptions,
                         reporter: StartupReporter, started: float,
                         signals: AsyncIterator[int]) -> None:
    ops = AsyncfsOperations(stack.volume, direct_io=opts.direct_io)
    try:
        pyfuse3.init(ops, mountpoint, opts.fuse_options(os.path.basename(image)))
    except RuntimeError as e:
        raise AsyncfsError(f"cannot mount on {mountpoint}: {e}") from None
    unmount_needed = True
    cache = stack.cache
    waits = request_wait.install(pyfuse3, may_spin=lambda: not cache.inflight_io,
                                 spin_s=opts.spin_us / 1e6)
    _tune_gc()
    try:

        def snapshot() -> dict[str, Any]:
            s: dict[str, Any] = dict(stack.cache.stats())
            s.update(image=os.path.abspath(image), mountpoint=mountpoint,
                     pid=os.getpid(), version=__version__,
                     uptime_s=round(time.time() - started, 3),
                     requests_failed=ops.requests_failed,
                     pushed_files=ops.pushed_files,
                     requests_taken_at_once=waits.taken_at_once if waits else None,
                     requests_waited_for=waits.waited_for if waits else None,
                     device_readahead_windows=stack.volume.device_readahead.windows,
                     log=str(control.log_path(mountpoint)))
            return s

        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, control.socket_path(mountpoint),
                                partial(_handle_request, snapshot, stack.faults, opts))
            log.info("mounted %s on %s", image, mountpoint)
            nursery.start_soon(_tune_after_init, ops, mountpoint, opts, reporter)
            signalled = trio.Event()
            detached = trio.Event()
            nursery.start_soon(_watch_signals, signals, signalled)
            nursery.start_soon(_watch_detach, mountpoint, stack.cache.stats, signalled,
                               detached)
            with trio.CancelScope() as fuse_scope:
                nursery.start_soon(_cancel_after_signal, signalled, detached, fuse_scope)
                await pyfuse3.main(min_tasks=min(opts.min_tasks, opts.max_tasks),
                                   max_tasks=opts.max_tasks)
            # main() returns when the kernel ends the session (fusermount3 -u, umount)
            # or after terminate(); either way the mount is finished.
            # after a lazy unmount the path may hold something else now: leave it be
            unmount_needed = signalled.is_set() and not detached.is_set()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=unmount_needed)
        log.info("unmounted %s", mountpoint)


def _handle_request(snapshot: Callable[[], dict[str, Any]], faults: FaultyDevice | None,
                    opts: MountOptions, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op", "stats")
    if op == "stats":
        return snapshot()
    if op != "fault":
        raise UsageError(f"unknown control request {op!r}")
    if faults is None or not opts.faults:
        raise UsageError("fault injection is off for this mount (mount it with -o faults)")
    action = req.get("action")
    if action == "eio":
        start, end = int(req["start"]), int(req["end"])
        if not 0 <= start < end:
            raise UsageError(f"bad EIO range {start}..{end}")
        faults.add_eio_range(start, end)
    elif action == "clear":
        faults.clear_eio_ranges()
    elif action == "stall":
        faults.stall()
    elif action == "release":
        faults.release()
    else:
        raise UsageError(f"unknown fault action {action!r} (eio, clear, stall, release)")
    log.info("fault injection: %s", req)
    return {"ok": True, "stalled": faults.is_stalled, "stalled_readers": faults.stalled_readers}


async def _tune_after_init(ops: AsyncfsOperations, mountpoint: str, opts: MountOptions,
                           reporter: StartupReporter) -> None:
    """Kernel-side tuning once FUSE_INIT is done (the kernel applies the INIT reply's
    readahead as a minimum over what is set before it), then the "OK" that lets
    ``asyncfs mount`` return: a reader that starts right after the command must find the
    mount tuned (a stream read before the tuning ran ~20% slower)."""
    try:
        with trio.move_on_after(INIT_WAIT_S):  # the kernel sends FUSE_INIT at mount time
            await ops.initialized.wait()
        if ops.initialized.is_set() and os.geteuid() == 0:
            await trio.sleep(0.05)  # the INIT reply is written right after init() returns
            for problem in tune_fuse_connection(
                mountpoint, readahead_kb=opts.kernel_readahead // 1024,
                max_background=opts.max_background,
            ):
                log.debug("FUSE tuning skipped: %s", problem)
    finally:
        reporter.send("OK")  # also if the mount ended first: it was made and served


# After a lazy unmount (fusermount3 -u -z, umount -l) the kernel keeps the connection while
# files are open. Requests that make no progress for this long are taken as stuck (a dead or
# stalled device) and the daemon shuts down as on SIGTERM; readers that make progress are
# served until they close their files, as lazy unmount promises.
STUCK_AFTER_DETACH_S = 2.0


async def _watch_detach(mountpoint: str, stats: Callable[[], dict[str, Any]],
                        signalled: trio.Event, detached: trio.Event) -> None:
    while mount_entry(mountpoint) is not None:
        await trio.sleep(0.25)
    detached.set()
    log.info("%s was detached (lazy unmount); serving open files until they close", mountpoint)
    last: tuple[Any, ...] | None = None
    since = trio.current_time()
    while not signalled.is_set():
        s = stats()
        progress = (s.get("backend_reads"), s.get("wakeups"), s.get("cache_hits"))
        now = trio.current_time()
        if progress != last or not (s.get("parked_now") or s.get("inflight_io")):
            last, since = progress, now
        elif now - since >= STUCK_AFTER_DETACH_S:
            log.warning("requests stuck after lazy unmount: shutting down")
            signalled.set()
            pyfuse3.terminate()
            return
        await trio.sleep(0.25)


async def _watch_signals(signals: AsyncIterator[int], signalled: trio.Event) -> None:
    async for signum in signals:
        log.info("signal %d: unmounting", signum)
        signalled.set()
        pyfuse3.terminate()
        return


async def _cancel_after_signal(signalled: trio.Event, detached: trio.Event,
                               scope: trio.CancelScope) -> None:
    await signalled.wait()
    if not detached.is_set():  # after a detach the requests were already seen stuck
        await trio.sleep(SHUTDOWN_GRACE_S)
    # Requests that did not finish in the grace period (a stalled device) are abandoned:
    # cancelling them frees their wait entries; close() then detaches the mount and drops the
    # FUSE connection, and the kernel fails those requests (ENOTCONN) instead of hanging them.
    scope.cancel()


def setup_logging(opts: MountOptions, mountpoint: str, foreground: bool) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    handlers: list[logging.Handler] = []
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    else:
        path = control.log_path(mountpoint)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(level=level, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)


def run_mount(image: str, mountpoint: str, opts: MountOptions, *, foreground: bool) -> int:
    """Entry for `asyncfs mount`: fork unless foreground, then serve."""
    if foreground:
        setup_logging(opts, mountpoint, foreground=True)
        return trio.run(serve, image, mountpoint, opts, StartupReporter(None))

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        status = _read_all(rfd).decode(errors="replace").strip()
        os.close(rfd)
        if status == "OK":
            return 0
        if status.startswith("ERR "):
            print(f"asyncfs: {one_line(status[4:])}", file=sys.stderr)
        else:
            _, code = os.waitpid(pid, 0)
            print(f"asyncfs: the daemon exited during start-up (status {code}); "
                  f"see {control.log_path(mountpoint)}", file=sys.stderr)
        return 1

    # Child: detach from the terminal and the caller's session so the mount outlives both.
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    code = 1
    reporter = StartupReporter(wfd)
    try:
        setup_logging(opts, mountpoint, foreground=False)
        code = trio.run(serve, image, mountpoint, opts, reporter)
    except BaseException:  # the parent must hear something, whatever went wrong
        log.exception("daemon failed")
        reporter.send("ERR the daemon failed during start-up; see its log")
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
