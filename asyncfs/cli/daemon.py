"""The mount's lifetime: start-up report to the parent, serving, signals, clean unmount.

Without ``-f`` the command forks before any event loop or thread exists; the child mounts and
writes one status line into a pipe ("OK" or the error), so the parent exits 0 only once the
mount answers, or non-zero with the child's one-line reason. A child that dies without a word
(a fatal signal in native code) is reported by how it died, with the end of its log, where
faulthandler has left the Python stack.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

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
from asyncfs.io.remote import redact, remote_stats
from asyncfs.testing import FaultyDevice

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
    said_before = _log_size()
    try:
        pyfuse3.init(ops, mountpoint, opts.fuse_options(os.path.basename(image)))
    except RuntimeError as e:
        why = _fuse_complaint(said_before)
        raise AsyncfsError(f"cannot mount on {mountpoint}: {e}"
                           + (f" ({why})" if why else "")) from None
    unmount_needed = True
    cache = stack.cache
    waits = request_wait.install(pyfuse3, may_spin=lambda: not cache.inflight_io,
                                 spin_s=opts.spin_us / 1e6)
    _tune_gc()
    try:

        def snapshot() -> dict[str, Any]:
            s: dict[str, Any] = dict(stack.cache.stats())
            s.update(image=redact(image) if "://" in image else image, mountpoint=mountpoint,
                     pid=os.getpid(), version=__version__,
                     uptime_s=round(time.time() - started, 3),
                     backend=stack.backend, backend_note=stack.backend_note,
                     requests_failed=ops.requests_failed,
                     pushed_files=ops.pushed_files,
                     requests_taken_at_once=waits.taken_at_once if waits else None,
                     requests_waited_for=waits.waited_for if waits else None,
                     device_readahead_windows=stack.volume.device_readahead.windows,
                     remote=remote_stats(stack.device),
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


def setup_logging(opts: MountOptions, stream: TextIO) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    logging.basicConfig(level=level, handlers=[logging.StreamHandler(stream)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)


# The daemon's log, kept open for the process's lifetime: faulthandler writes into its file
# descriptor from a signal handler, long after setup, and must never find it closed.
_daemon_log: TextIO | None = None


def _daemon_stdio(log_file: Path) -> TextIO:
    """stdin and stdout to /dev/null, stderr into the log, and faulthandler on the log. So what
    would otherwise be lost is where `asyncfs mount` looks after a failed start: the Python
    stack of a fatal signal (SIGSEGV, SIGILL, SIGBUS, SIGFPE, SIGABRT) in any thread, and what
    libfuse and fusermount3 print when they refuse a mount."""
    global _daemon_log
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):  # 2 too: if the log cannot be opened, nothing reaches the terminal
        os.dup2(devnull, std)
    os.close(devnull)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)  # a log left by an older asyncfs may be 0644
    os.dup2(fd, 2)  # not close-on-exec: fusermount3, which libfuse runs, writes here too
    _daemon_log = open(fd, "a", buffering=1, encoding="utf-8",  # noqa: SIM115 (see above)
                       errors="backslashreplace")
    faulthandler.enable(file=_daemon_log, all_threads=True)
    return _daemon_log


def _log_size() -> int | None:
    if _daemon_log is None:
        return None  # in the foreground libfuse's complaints reach the terminal themselves
    return os.fstat(_daemon_log.fileno()).st_size


# How libfuse and fusermount3 start the lines they print when they refuse a mount.
_FUSE_COMPLAINT = re.compile(r"^(fusermount3?|fuse|mount\.fuse3?): \S")


def _fuse_complaint(since: int | None) -> str | None:
    """The last line libfuse or fusermount3 wrote to stderr (the log) after offset ``since``:
    pyfuse3 reports any refused mount as "fuse_session_mount failed", and the reason is in
    that line ("option allow_other only allowed if ...", "mountpoint ... not owned by user")."""
    if since is None or _daemon_log is None:
        return None
    try:
        with open(f"/proc/self/fd/{_daemon_log.fileno()}", "rb") as f:
            f.seek(since)
            text = f.read(LOG_TAIL_BYTES).decode(errors="replace")
    except OSError:
        return None
    found = [line.strip() for line in text.splitlines() if _FUSE_COMPLAINT.match(line)]
    return found[-1] if found else None


def describe_wait_status(status: int) -> str:
    """A wait status as words: "killed by SIGILL (illegal instruction)", "exited with
    status 3"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        what = signal.strsignal(sig)
        text = f"killed by {name}" + (f" ({what.lower()})" if what else "")
        return text + (", core dumped" if os.WCOREDUMP(status) else "")
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"stopped with wait status {status:#x}"


LOG_TAIL_LINES = 5
LOG_TAIL_BYTES = 64 * 1024
MAX_SHOWN_LINE = 300
# faulthandler's report starts with this line, then the crashing thread's frames, innermost
# first: what the user needs is the top of the report, not the end of the log.
_FATAL = "Fatal Python error: "


def log_tail(log_file: Path, start: int) -> list[str]:
    """What the daemon wrote to its log after offset ``start`` (its size before the fork), as
    at most a handful of non-empty lines: from faulthandler's report its first line and the
    innermost frames, otherwise the last lines."""
    try:
        with open(log_file, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - LOG_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    fatal = [i for i, line in enumerate(lines) if line.startswith(_FATAL)]
    shown = (lines[fatal[-1]:fatal[-1] + LOG_TAIL_LINES + 1] if fatal
             else lines[-LOG_TAIL_LINES:])
    return [one_line(line if len(line) <= MAX_SHOWN_LINE else line[:MAX_SHOWN_LINE] + "...")
            for line in shown]


def startup_death_report(status: int, log_file: Path, start: int) -> str:
    """What `asyncfs mount` prints when the daemon ended without a word: one line saying how
    it ended, then the end of its log, indented."""
    was = "was " if os.WIFSIGNALED(status) else ""
    head = f"asyncfs: the daemon {was}{describe_wait_status(status)} during start-up"
    tail = log_tail(log_file, start)
    if not tail:
        return f"{head}, before it wrote anything to its log {log_file}"
    return "\n".join([f"{head}; the end of its log {log_file}:", *(f"    {t}" for t in tail)])


def run_mount(image: str, mountpoint: str, opts: MountOptions, *, foreground: bool) -> int:
    """Entry for `asyncfs mount`: fork unless foreground, then serve."""
    control.ensure_runtime_dir()
    if foreground:
        faulthandler.enable(file=sys.stderr, all_threads=True)
        setup_logging(opts, sys.stderr)
        return trio.run(serve, image, mountpoint, opts, StartupReporter(None))

    log_file = control.log_path(mountpoint)
    try:
        log_start = log_file.stat().st_size
    except OSError:
        log_start = 0
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
            _, wait_status = os.waitpid(pid, 0)
            print(startup_death_report(wait_status, log_file, log_start), file=sys.stderr)
        return 1

    # Child: detach from the terminal and the caller's session so the mount outlives both.
    os.close(rfd)
    os.setsid()
    code = 1
    reporter = StartupReporter(wfd)
    try:
        setup_logging(opts, _daemon_stdio(log_file))
        log.info("asyncfs %s daemon, pid %d, starting: %s on %s", __version__, os.getpid(),
                 image, mountpoint)
        code = trio.run(serve, image, mountpoint, opts, reporter)
    except BaseException as e:  # the parent must hear something, whatever went wrong
        log.exception("daemon failed")
        reporter.send(f"ERR the daemon failed during start-up ({type(e).__name__}: {e}); "
                      f"see its log {log_file}")
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
