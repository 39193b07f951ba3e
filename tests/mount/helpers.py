"""Mounting real images through the real `asyncfs mount` command, for the mount tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncfs.cli.control import fetch_stats, request
from asyncfs.testing.treewalk import host_tree


def fuse_missing_reason() -> str | None:
    """Why FUSE mounts cannot run here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "FUSE is not available: /dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "FUSE is not available: fusermount3 is not installed (package fuse3)"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "FUSE is not available: /dev/fuse is not accessible to this user"
    return None


def require_fuse() -> None:
    reason = fuse_missing_reason()
    if reason:
        print(reason)
        pytest.skip(reason)


def asyncfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncfs", *args]


def run_asyncfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(asyncfs_cmd(*args), capture_output=True, text=True, timeout=timeout)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def daemon_pid(mnt: Path) -> int:
    return int(stats(mnt)["pid"])


def stats(mnt: Path) -> dict[str, Any]:
    """The daemon's counters, through the same socket `asyncfs stats` uses (in-process, so
    polling it is cheap)."""
    return fetch_stats(str(mnt))


def fault(mnt: Path, action: str, start: int = 0, end: int = 0) -> dict[str, Any]:
    """Fault injection on a mount made with ``-o faults`` (see `asyncfs fault`)."""
    req: dict[str, Any] = {"op": "fault", "action": action}
    if action == "eio":
        req.update(start=start, end=end)
    return request(str(mnt), req)


def unmount(mnt: Path) -> None:
    for _ in range(50):
        if not is_mounted(mnt):
            return
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if not is_mounted(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def mounted(img: Path, mnt: Path, *options: str) -> Iterator[Path]:
    """`asyncfs mount IMG MNT -o OPTIONS`; always unmounted afterwards."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    args = ["mount", str(img), str(mnt)]
    if options:
        args += ["-o", ",".join(options)]
    r = run_asyncfs(*args)
    assert r.returncode == 0, f"mount failed: {r.stderr}"
    assert is_mounted(mnt)
    try:
        yield mnt
    finally:
        pid = None
        with contextlib.suppress(Exception):
            pid = daemon_pid(mnt)
        unmount(mnt)
        if pid is not None:
            wait_gone(pid)


def regular_files(tree: Path) -> list[Path]:
    """Regular files under ``tree`` (lstat: symlinks are not followed), largest first."""
    out = [Path(os.fsdecode(path)) for _, path, st in host_tree(tree, skip_unreadable=True)
           if stat.S_ISREG(st.st_mode)]
    return sorted(out, key=lambda p: (-p.lstat().st_size, str(p)))
