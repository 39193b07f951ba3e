"""The things being measured: mount them, find their daemon, unmount them (always).

Targets: asyncfs (its command-line contract: ``asyncfs mount IMAGE MNT -o OPTS``), fuse2fs
(``fuse2fs IMAGE MNT -o ro``), the kernel's ext4 on a read-only loop device, and the raw image
file (nothing mounted; fio reads the byte range where a file lives in the image).

Every mount made here is recorded in ``_ACTIVE`` and torn down by ``cleanup_all`` (called from
``run.py``'s ``finally`` and on SIGTERM), so an exception or Ctrl-C never leaves a mount or loop
device behind. A daemon is found as the process whose argv has the mount point as one argument
(exact match, absolute path; our mount points are unique per target), preferring one that holds
/dev/fuse open: it works for any FUSE daemon that keeps its command line and needs no
cooperation from it. The mount itself is checked in ``/proc/self/mountinfo`` (``fuse*``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.image import FileInfo, verify_file

MOUNT_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 20.0  # the first mount: a healthy asyncfs answers in well under a second
UNMOUNT_WAIT_S = 15.0


class MountError(Exception):
    """A target could not be mounted; ``str()`` is the one-line reason shown in the report."""


class HungError(Exception):
    """A read through a mount did not finish in time; the mount was aborted to free it."""


T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], timeout_s: float, on_hang: Callable[[], None]) -> T:
    """Run ``fn`` (file I/O through a mount) in a thread; if it takes longer than ``timeout_s``
    call ``on_hang`` (abort the FUSE connection, which makes the blocked syscall fail) and raise
    HungError. A plain read on a wedged FUSE mount would otherwise block the harness forever."""
    box: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            err.append(exc)

    th = threading.Thread(target=body, daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        on_hang()
        th.join(10)
        raise HungError(f"I/O through the mount did not finish within {timeout_s:.0f} s")
    if err:
        raise err[0]
    return box[0]


@dataclass(slots=True)
class Mounted:
    """A live mount (or, for the raw target, the image itself)."""

    target: str
    options: str
    root: Path | None  # None: raw image, no filesystem
    image: Path
    pid: int | None = None  # FUSE daemon
    loop_dev: str | None = None
    fuse_conn: int | None = None  # /sys/fs/fuse/connections/N
    unmounted: bool = field(default=False)
    aborted: bool = field(default=False)  # its FUSE connection was aborted after a hang
    stats_cmd: list[str] | None = None  # asyncfs: `asyncfs stats MNT --json`

    def stats(self) -> dict[str, int] | None:
        """The daemon's integer counters (asyncfs only); None if it has none or cannot say."""
        if self.stats_cmd is None:
            return None
        try:
            r = _run(self.stats_cmd, timeout=10)
            doc = json.loads(r.stdout) if r.returncode == 0 else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
        if not isinstance(doc, dict):
            return None
        return {k: v for k, v in doc.items() if isinstance(v, int) and not isinstance(v, bool)}

    def file_spec(self, info: FileInfo) -> tuple[str, int, int]:
        """(filename, offset, size) for fio: the file on the mount, or its bytes in the image."""
        if self.root is None:
            return str(self.image), info.phys_off, info.size
        return str(self.root / info.path), 0, info.size


_ACTIVE: list[tuple[Target, Mounted]] = []

SYS_BDI = Path("/sys/class/bdi")


def _sysfs_int(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "?"


def kernel_tuning(m: Mounted) -> str:
    """The kernel-side knobs that shape this target's reads, read back from sysfs.

    FUSE: the mount's readahead (``/sys/class/bdi/0:N/read_ahead_kb``, which a daemon may raise
    after FUSE_INIT) and the connection's ``max_background``/``congestion_threshold``. Kernel
    loop mount: the loop device's readahead. Raw image: the readahead of the disk holding it.
    Recorded in every cell so a number can be traced to the tuning it ran with.
    """
    if m.root is None or m.loop_dev is not None:
        if m.loop_dev is not None:
            st = os.stat(m.loop_dev).st_rdev
            what = f"loop {m.loop_dev}"
        else:
            st = os.stat(m.image).st_dev
            what = "disk"
        dev = f"{os.major(st)}:{os.minor(st)}"
        return f"read_ahead_kb {_sysfs_int(SYS_BDI / dev / 'read_ahead_kb')} ({what} {dev})"
    entry = mount_entry(m.root)
    if entry is None:
        return "not mounted"
    dev = entry[0]
    parts = [f"read_ahead_kb {_sysfs_int(SYS_BDI / dev / 'read_ahead_kb')}"]
    if m.fuse_conn is not None:
        conn = FUSECTL / str(m.fuse_conn)
        parts.append(f"max_background {_sysfs_int(conn / 'max_background')}")
        parts.append(f"congestion_threshold {_sysfs_int(conn / 'congestion_threshold')}")
    return ", ".join(parts) + f" (bdi {dev})"


# ---- /proc helpers -------------------------------------------------------------------------


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(esc, ch)
    return s


def mount_entry(path: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of the mount at exactly ``path``, from /proc/self/mountinfo."""
    want = str(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) >= 5 and _unescape(parts[4]) == want:
                found = (parts[2], right.split()[0])  # the last (top) mount wins
    return found


def mounts_under(base: Path) -> list[Path]:
    prefix = str(base).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            p = _unescape(line.split()[4])
            if p.startswith(prefix):
                out.append(Path(p))
    return sorted(out, key=lambda p: len(str(p)), reverse=True)


def holds_dev_fuse(pid: int) -> bool:
    """Whether the process has /dev/fuse open (a FUSE daemon does; its helpers do not)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def find_daemon_pid(mnt: Path, exclude: Sequence[int] = ()) -> int | None:
    """The process whose argv contains ``mnt`` as one argument.

    If several do (a forked helper keeps its parent's argv), the one holding /dev/fuse open
    wins, then the oldest.
    """
    want = os.fsencode(str(mnt))
    best: tuple[bool, int, int] | None = None  # (not holding /dev/fuse, start time, pid)
    skip = {os.getpid(), *exclude}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if want not in argv:
                continue
            start = read_stat(int(name))[2]
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        cand = (not holds_dev_fuse(int(name)), start, int(name))
        if best is None or cand < best:
            best = cand
    return None if best is None else best[2]


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a daemon we started with ``start_new_session``)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # field 6: session id
            out.append(int(name))
    return sorted(out)


def read_stat(pid: int) -> tuple[int, int, int]:
    """(utime, stime, starttime) in clock ticks from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()  # comm may contain spaces and ')'
    # fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
    return int(fields[11]), int(fields[12]), int(fields[19])


def cpu_seconds(pid: int) -> float:
    ut, st, _ = read_stat(pid)
    return (ut + st) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2] != "Z"


def _tail(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


# ---- targets -------------------------------------------------------------------------------


class Target:
    """Base: a raw image needs no mount. Subclasses mount something at ``mnt_base/key``."""

    def __init__(self, key: str, image: Path, mnt_base: Path, options: Sequence[str] = ()):
        self.key = key
        self.image = image
        self.mnt = mnt_base / key
        self.base_options = list(options)

    def options(self, extra: Sequence[str] = ()) -> str:
        return ",".join([*self.base_options, *extra])

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine (None: it can). Cheap; no mount."""
        return None

    def _mount(self, opts: str) -> Mounted:
        return Mounted(self.key, opts, None, self.image)

    def _unmount(self, m: Mounted) -> None:
        pass

    def mount(self, extra: Sequence[str] = ()) -> Mounted:
        m = self._mount(self.options(extra))
        _ACTIVE.append((self, m))
        return m

    def unmount(self, m: Mounted) -> None:
        if m.unmounted:
            return
        try:
            self._unmount(m)
        finally:
            m.unmounted = True
            with contextlib.suppress(ValueError):
                _ACTIVE.remove((self, m))

    def abort(self, m: Mounted) -> None:
        """Unstick a hung mount so blocked readers return (FUSE: abort the connection)."""

    @contextlib.contextmanager
    def mounted(self, extra: Sequence[str] = ()) -> Iterator[Mounted]:
        m = self.mount(extra)
        try:
            yield m
        finally:
            self.unmount(m)


class RawTarget(Target):
    """fio straight on the image file: the device limit, no filesystem in the way."""


class KernelLoopTarget(Target):
    """The kernel's ext4 on a read-only loop device (what ``mount -o loop,ro`` does)."""

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root (loop device + mount)"
        return None

    def _mount(self, opts: str) -> Mounted:
        self.mnt.mkdir(parents=True, exist_ok=True)
        r = _run(["losetup", "--find", "--show", "--read-only", str(self.image)])
        if r.returncode != 0:
            raise MountError(f"losetup failed: {_tail(r.stderr)}")
        dev = r.stdout.strip()
        m = Mounted(self.key, opts, self.mnt, self.image, loop_dev=dev)
        r = _run(["mount", "-t", "ext4", "-o", opts or "ro", dev, str(self.mnt)])
        if r.returncode != 0:
            _run(["losetup", "-d", dev])
            raise MountError(f"mount {dev} failed: {_tail(r.stderr)}")
        return m

    def _unmount(self, m: Mounted) -> None:
        try:
            if mount_entry(self.mnt) is not None:
                r = _run(["umount", str(self.mnt)])
                if r.returncode != 0:
                    time.sleep(0.5)
                    r = _run(["umount", str(self.mnt)])
                    if r.returncode != 0:
                        _run(["umount", "-l", str(self.mnt)])
        finally:
            if m.loop_dev:
                _run(["losetup", "-d", m.loop_dev])


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_conn(conn: int) -> bool:
    """Abort FUSE connection ``conn`` (root): requests in flight fail, blocked readers return.

    Mounts the fusectl filesystem first if the host has not (systemd usually has).
    """
    if not os.path.ismount(FUSECTL):
        _run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)])
    try:
        with open(FUSECTL / str(conn) / "abort", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def abort_fuse(m: Mounted) -> None:
    if m.fuse_conn is not None:
        m.aborted = abort_conn(m.fuse_conn) or m.aborted


class FuseTarget(Target):
    """A FUSE daemon started by a command that returns once the mount answers."""

    unmount_cmd = "fusermount3"
    mount_timeout_s = MOUNT_TIMEOUT_S

    def command(self, opts: str) -> list[str]:
        raise NotImplementedError

    def _mount(self, opts: str) -> Mounted:
        # Check before mkdir: mkdir(exist_ok) stats the path, which hangs on a dead FUSE mount.
        if mount_entry(self.mnt) is not None:
            raise MountError(f"{self.mnt} is already a mount point")
        self.mnt.mkdir(parents=True, exist_ok=True)
        log = self.mnt.parent / f"{self.key}.log"
        with open(log, "a") as logf:
            logf.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(self.command(opts))}\n")
            logf.flush()
            start = logf.tell()
            # Output to a file, never a pipe: the daemon inherits it and would keep a pipe open.
            # A new session, so Ctrl-C reaches only us and we unmount in order.
            proc = subprocess.Popen(
                self.command(opts), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=self.mount_timeout_s)
            except subprocess.TimeoutExpired:
                self._kill_half_started(proc)
                raise MountError(
                    f"mount command did not return in {self.mount_timeout_s:.0f} s") from None
            except BaseException:
                self._kill_half_started(proc)
                raise
        entry = mount_entry(self.mnt)
        if rc != 0 or entry is None:
            self._kill_half_started(proc)
            with open(log, errors="replace") as f:
                f.seek(start)
                msg = _tail(f.read())
            raise MountError(f"mount exited {rc}: {msg}" if rc else f"no mount appeared: {msg}")
        if not entry[1].startswith("fuse"):
            raise MountError(f"{self.mnt} is a {entry[1]} mount, not FUSE")
        # argv first (the documented way); else the one process left in the session we made.
        pid = find_daemon_pid(self.mnt)
        if pid is None:
            members = session_members(proc.pid)
            pid = members[0] if len(members) == 1 else None
        conn = int(entry[0].split(":")[1])
        return Mounted(self.key, opts, self.mnt, self.image, pid=pid, fuse_conn=conn)

    def _kill_half_started(self, proc: subprocess.Popen[bytes]) -> None:
        """A mount that failed or hung: free its FUSE connection, end the processes we started
        (the command, and a daemon it forked, which may have left our session), unmount."""
        entry = mount_entry(self.mnt)
        if entry is not None and entry[1].startswith("fuse"):
            abort_conn(int(entry[0].split(":")[1]))  # a daemon stuck on its own mount returns
        ours = set(session_members(proc.pid))
        daemon = find_daemon_pid(self.mnt)
        if daemon is not None:
            ours.add(daemon)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        for pid in sorted(ours):
            self._reap(pid, grace_s=0.5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self._force_unmount()

    def _force_unmount(self) -> None:
        if mount_entry(self.mnt) is not None:
            _run(["umount", "-l", str(self.mnt)])

    def abort(self, m: Mounted) -> None:
        abort_fuse(m)

    def _unmount(self, m: Mounted) -> None:
        for attempt in range(3):
            if mount_entry(self.mnt) is None:
                break
            r = _run([self.unmount_cmd, "-u", str(self.mnt)])
            if r.returncode == 0:
                break
            if attempt == 1:
                self.abort(m)  # busy twice in a row: a reader is stuck in the daemon
            time.sleep(0.5)
        else:
            self._force_unmount()
        if m.pid is not None:
            # A daemon whose connection we aborted was hung: do not wait long for it.
            self._reap(m.pid, grace_s=2.0 if m.aborted else UNMOUNT_WAIT_S)

    @staticmethod
    def _reap(pid: int, grace_s: float = UNMOUNT_WAIT_S) -> None:
        """Wait for the daemon (ours, started by _mount) to exit; signal it only if it hangs."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(40):
                if not pid_alive(pid):
                    return
                time.sleep(0.05)


class Fuse2fsTarget(FuseTarget):
    """Debian's fuse2fs (libfuse 2): ``fuse2fs IMAGE MNT -o ro``."""

    unmount_cmd = "fusermount"

    def unavailable(self) -> str | None:
        return None if shutil.which("fuse2fs") else "fuse2fs not installed (apt install fuse2fs)"

    def command(self, opts: str) -> list[str]:
        return ["fuse2fs", str(self.image), str(self.mnt), "-o", opts or "ro"]


class AsyncfsTarget(FuseTarget):
    """asyncfs through its command-line contract; ``unavailable`` explains why it cannot run."""

    def __init__(self, key: str, image: Path, mnt_base: Path, exe: Path,
                 options: Sequence[str] = ()):
        super().__init__(key, image, mnt_base, options)
        self.exe = exe
        self.probe_failure: str | None = None  # set by probe()
        self.pid_found = True  # probe(): could the daemon be found (for its CPU and RSS)?

    def command(self, opts: str) -> list[str]:
        cmd = [str(self.exe), "mount", str(self.image), str(self.mnt)]
        return cmd + (["-o", opts] if opts else [])

    def _mount(self, opts: str) -> Mounted:
        m = super()._mount(opts)
        m.stats_cmd = [str(self.exe), "stats", str(self.mnt), "--json"]
        return m

    def unavailable(self) -> str | None:
        if not self.exe.exists():
            return f"{self.exe} does not exist (asyncfs not installed in the venv yet)"
        return self.probe_failure

    def probe(self, check: FileInfo) -> str | None:
        """Mount once, check a file's bytes, unmount. Records and returns the failure reason."""
        if not self.exe.exists():
            return self.unavailable()
        self.mount_timeout_s = PROBE_TIMEOUT_S
        try:
            with self.mounted() as m:
                assert m.root is not None
                root = m.root
                bad = call_with_timeout(lambda: verify_file(root / check.path, check),
                                        PROBE_TIMEOUT_S, lambda: abort_fuse(m))
                if bad:
                    self.probe_failure = f"mount works but serves {bad}"
                self.pid_found = m.pid is not None
        except (MountError, HungError, OSError, subprocess.SubprocessError) as exc:
            self.probe_failure = str(exc) or type(exc).__name__
        finally:
            self.mount_timeout_s = MOUNT_TIMEOUT_S
        return self.probe_failure


def cleanup_all() -> list[str]:
    """Unmount everything still mounted (newest first); return what went wrong, if anything."""
    problems = []
    while _ACTIVE:
        target, m = _ACTIVE[-1]
        try:
            target.unmount(m)
        except Exception as exc:  # cleanup must go on to the next mount
            problems.append(f"{target.key}: {exc}")
            with contextlib.suppress(ValueError):
                _ACTIVE.remove((target, m))
    return problems


def cleanup_stale(mnt_base: Path, image: Path) -> list[str]:
    """Remove what an earlier, killed run of this harness left: mounts under our base, loops."""
    done = []
    for p in mounts_under(mnt_base):
        _run(["umount", "-l", str(p)])
        done.append(f"unmounted stale {p}")
    r = _run(["losetup", "-j", str(image)]) if image.exists() else None
    if r is not None and r.returncode == 0:
        for line in r.stdout.splitlines():
            dev = line.split(":", 1)[0]
            if dev.startswith("/dev/loop"):
                _run(["losetup", "-d", dev])
                done.append(f"detached stale {dev}")
    return done
