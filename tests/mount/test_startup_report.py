"""A daemon that dies during start-up is reported for what it is: how it died (the signal by
name, or its exit status), then the end of its log, where faulthandler has left the Python
stack of a fatal signal.

The deaths are real. A ``sitecustomize`` module that exists only in the test's directory (put
on PYTHONPATH for the one `asyncfs mount` run) marks the forked daemon and, when the daemon
opens the image, executes an illegal instruction, reads address 0, exits, or is killed at the
fork itself. asyncfs has no hook for this: the module uses Python's audit and fork hooks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asyncfs.cli import control
from asyncfs.cli.daemon import LOG_TAIL_LINES, describe_wait_status, log_tail
from tests.mount.helpers import asyncfs_cmd, is_mounted, mounted, require_fuse

# ud2 (x86-64) and udf #0 (AArch64): instructions that are defined to be undefined.
_UNDEFINED_INSTRUCTION = {"x86_64": b"\x0f\x0b", "aarch64": b"\x00\x00\x00\x00"}

_HOOK = '''
import ctypes
import mmap
import os
import platform
import signal
import sys

IMAGE = {image!r}
DEATH = {death!r}
UNDEFINED = {undefined!r}
_in_daemon = False


def _no_core():
    # a dump would only litter the test's directory (or a pipe's handler) and change the
    # wording ("..., core dumped"); a process that is not dumpable never dumps
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


def _die():
    _no_core()
    if DEATH == "sigsegv":
        ctypes.string_at(0)
    elif DEATH == "sigill":
        code = UNDEFINED.get(platform.machine())
        if code is None:  # no encoding at hand: the same signal, delivered by the kernel
            os.kill(os.getpid(), signal.SIGILL)
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    elif DEATH == "exit3":
        os._exit(3)


def _forked():
    global _in_daemon
    _in_daemon = True
    if DEATH == "sigkill_at_fork":
        os.kill(os.getpid(), signal.SIGKILL)


def _audit(event, args):
    if _in_daemon and event == "open" and args and args[0] == IMAGE:
        _die()


os.register_at_fork(after_in_child=_forked)
sys.addaudithook(_audit)
'''


def _mount_dying(image: Path, mnt: Path, hook_dir: Path,
                 death: str) -> subprocess.CompletedProcess[str]:
    """`asyncfs mount` whose daemon dies the way ``death`` says."""
    require_fuse()
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_HOOK.format(
        image=os.path.abspath(image), death=death, undefined=_UNDEFINED_INSTRUCTION))
    mnt.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(hook_dir))
    return subprocess.run(asyncfs_cmd("mount", str(image), str(mnt)), capture_output=True,
                          text=True, timeout=60, env=env)


def _report(r: subprocess.CompletedProcess[str], mnt: Path, how: str) -> list[str]:
    """Check the report's shape; return the log lines it shows (without their indent)."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.rstrip("\n").split("\n")
    log = control.log_path(os.path.realpath(mnt))
    assert lines[0].startswith(f"asyncfs: the daemon {how} during start-up"), r.stderr
    assert str(log) in lines[0], r.stderr
    assert all(line.startswith("    ") for line in lines[1:]), r.stderr
    assert not is_mounted(mnt)
    return [line[4:] for line in lines[1:]]


@pytest.mark.parametrize(("death", "how", "fault"), [
    ("sigsegv", "was killed by SIGSEGV (segmentation fault)", "Segmentation fault"),
    ("sigill", "was killed by SIGILL (illegal instruction)", "Illegal instruction"),
])
def test_fatal_signal_is_named_with_its_stack(ext4_image: Path, tmp_path: Path, death: str,
                                              how: str, fault: str) -> None:
    """The signal's name, not the raw wait status ("status 11"); faulthandler's stack from
    the daemon's log (without faulthandler the log ends at "starting"); the top of its
    report, not the last lines of the log (only the outermost frames and "Extension
    modules" would show, not the crash site)."""
    mnt = tmp_path / "mnt"
    r = _mount_dying(ext4_image, mnt, tmp_path / "hook", death)
    shown = _report(r, mnt, how)
    assert shown[0] == f"Fatal Python error: {fault}", r.stderr
    assert shown[1].startswith("Current thread 0x"), r.stderr
    # innermost first: the hook, called from the image's open in asyncfs's I/O layer
    assert any("sitecustomize.py" in line for line in shown), r.stderr
    assert any(re.search(r'asyncfs/io/\w+\.py", line \d+ in open_readonly', line)
               for line in shown), r.stderr
    assert len(shown) <= LOG_TAIL_LINES + 1
    log = control.log_path(os.path.realpath(mnt)).read_text(errors="replace")
    assert f"Fatal Python error: {fault}" in log
    assert "Current thread 0x" in log and "(most recent call first)" in log
    assert "daemon, pid" in log  # the start line, written before the crash


def test_exit_status_is_reported_with_the_log_tail(ext4_image: Path, tmp_path: Path) -> None:
    """A daemon that exits (here with 3) without a status line: "exited with status 3" and
    the last lines it logged, not the raw wait status (768)."""
    mnt = tmp_path / "mnt"
    r = _mount_dying(ext4_image, mnt, tmp_path / "hook", "exit3")
    shown = _report(r, mnt, "exited with status 3")
    assert shown, r.stderr
    assert "768" not in r.stderr.split("\n")[0]
    assert re.search(r"daemon, pid \d+, starting: .* on ", shown[-1]), r.stderr


def test_death_before_logging_shows_no_earlier_log(ext4_image: Path, tmp_path: Path) -> None:
    """Killed at the fork, before it logs a line: the report says the log has nothing from
    this start, and does not pass off an earlier mount's lines (there is one: a good mount
    of the same mount point first), as tailing the whole log file would."""
    mnt = tmp_path / "mnt"
    with mounted(ext4_image, mnt):
        pass
    log = control.log_path(os.path.realpath(mnt))
    assert "unmounted" in log.read_text()
    r = _mount_dying(ext4_image, mnt, tmp_path / "hook", "sigkill_at_fork")
    shown = _report(r, mnt, "was killed by SIGKILL (killed)")
    assert shown == [], r.stderr
    assert r.stderr.rstrip("\n").endswith(f"before it wrote anything to its log {log}")


def _wait_status(code: str) -> int:
    """The raw wait status of a real process that runs ``code``."""
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", code], dict(os.environ))
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize(("code", "words"), [
    ("raise SystemExit(0)", "exited with status 0"),
    ("raise SystemExit(3)", "exited with status 3"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
     "killed by SIGSEGV (segmentation fault)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGILL)",
     "killed by SIGILL (illegal instruction)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL (killed)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGBUS)", "killed by SIGBUS (bus error)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGRTMIN + 2)",
     f"killed by signal {signal.SIGRTMIN + 2} (real-time signal 2)"),
])
def test_describe_wait_status(code: str, words: str) -> None:
    """Statuses of real processes, made non-dumpable (PR_SET_DUMPABLE 0) so that none is
    "core dumped" whatever the host's core settings."""
    status = _wait_status("import ctypes; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\n" + code)
    assert describe_wait_status(status) == words
    if os.WIFSIGNALED(status):
        assert os.waitstatus_to_exitcode(status) < 0


def _faulthandler_log(path: Path) -> None:
    path.write_text(textwrap.dedent("""\
        2026-01-01 00:00:00,000 asyncfs INFO asyncfs 0.1.0 daemon, pid 1, starting: a on b
        Fatal Python error: Illegal instruction

        Current thread 0x00007f0000000001 (most recent call first):
          File "/x/asyncfs/io/uring.py", line 10 in setup
          File "/x/asyncfs/io/open.py", line 20 in open_image
          File "/x/asyncfs/cli/wiring.py", line 30 in open_stack
          File "/x/asyncfs/cli/daemon.py", line 40 in serve
          File "/x/trio/_core/_run.py", line 50 in run

        Extension modules: crc32c._crc32c, pyfuse3 (total: 2)
        """))


def test_log_tail_shows_the_top_of_a_fault_report(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    _faulthandler_log(log)
    shown = log_tail(log, 0)
    assert shown[0] == "Fatal Python error: Illegal instruction"
    assert shown[1].startswith("Current thread")
    assert shown[2].endswith("in setup")
    assert len(shown) == LOG_TAIL_LINES + 1


def test_log_tail_from_the_start_offset_and_one_line_each(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    old = "".join(f"old line {i}\n" for i in range(20))
    log.write_text(old + "\n\nnew\x1b[31m line\n" + "x" * 1000 + "\n")
    shown = log_tail(log, len(old))
    assert shown[0] == "new\\x1b[31m line"
    assert shown[1].endswith("...") and len(shown[1]) < 400
    assert len(shown) == 2
    assert log_tail(log, log.stat().st_size) == []
    assert log_tail(tmp_path / "missing.log", 0) == []
    assert len(log_tail(log, 0)) == LOG_TAIL_LINES


def test_core_dump_is_mentioned() -> None:
    """The kernel's encoding of "killed by signal 11, core dumped" (bit 0x80 over the signal):
    a real dump depends on the host's core settings, so the status is written out here."""
    assert describe_wait_status(signal.SIGSEGV | 0x80) == (
        "killed by SIGSEGV (segmentation fault), core dumped")
