"""Killed readers and unmount under load: readers parked on a stalled device must never pin the
mount, the daemon, or each other.

Each test runs the daemon in the foreground (``asyncfs mount -f``) as our child, so its exit
status is visible, on a mount made with ``-o faults,direct_io`` (every read reaches the daemon)
whose device the test stalls with ``asyncfs fault MNT stall``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.cli.control import request
from tests.mount.helpers import is_mounted, require_fuse, stats

KIB = 1024


@contextlib.contextmanager
def foreground_mount(img: Path, mnt: Path, *opts: str) -> Iterator[subprocess.Popen[bytes]]:
    """``asyncfs mount -f`` as a child; yields once the mount answers; always cleans up."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "asyncfs", "mount", "-f", str(img), str(mnt)]
    if opts:
        cmd += ["-o", ",".join(opts)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "mount never came up"
            if is_mounted(mnt):
                with contextlib.suppress(Exception):
                    stats(mnt)
                    break
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(Exception):
                request(str(mnt), {"op": "fault", "action": "release"}, timeout=2)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


class ParkedReaders:
    """``n`` threads, each reading one distinct 4 KiB page of ``path`` once (the mount uses
    direct_io, so each read is one FUSE READ). The files are opened before the device is
    stalled (a lookup parked on metadata would serialize every other opener in the kernel).
    Outcomes are recorded; nothing here ever blocks the test."""

    def __init__(self, path: Path, n: int) -> None:
        self.fds = [os.open(path, os.O_RDONLY) for _ in range(n)]
        self.results: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(n)]

    def _run(self, i: int) -> None:
        try:
            os.pread(self.fds[i], 4096, i * 2 * 4096)
            out = "ok"
        except OSError as e:
            out = f"errno {e.errno}"
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fds[i])
        with self._lock:
            self.results.append(out)

    def start(self) -> ParkedReaders:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


def _wait_parked(mnt: Path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while stats(mnt)["parked_now"] < n:
        assert time.monotonic() < deadline, f"only {stats(mnt)['parked_now']} of {n} parked"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["fusermount3", "umount", "sigterm"])
def test_unmount_with_32_readers_parked_on_stalled_device(how: str, fuzz_ext4: Path,
                                                         tmp_path: Path) -> None:
    """32 readers parked on a device that never answers; unmount: the daemon exits 0 within
    a few seconds, the mount point is free, and every reader returns (with an error).

    Guards the deadline on in-flight requests at exit (without it the stall is never
    released, the daemon never exits and the 6 s wait fails) and, for the lazy forms,
    `_watch_detach` (without it the daemon never exits)."""
    mnt = tmp_path / "mnt"
    with foreground_mount(fuzz_ext4, mnt, "faults", "direct_io", "readahead=0") as proc:
        readers = ParkedReaders(mnt / "files" / "big", 32)
        assert request(str(mnt), {"op": "fault", "action": "stall"})["stalled"]
        readers.start()
        _wait_parked(mnt, 32)
        t0 = time.monotonic()
        if how == "fusermount3":
            # files are open: plain -u is EBUSY as for any filesystem; -z detaches now
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True)
        elif how == "umount":
            subprocess.run(["umount", "-l", str(mnt)], check=True)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(6)
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - t0
        assert rc == 0, f"daemon still running {elapsed:.1f}s after {how} (rc={rc})"
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []
        assert readers.join(10), "a reader is still blocked after the daemon exited"
        assert len(readers.results) == 32


def test_sigkilled_parked_readers_leave_mount_serving(fuzz_ext4: Path, fuzz_tree: Path,
                                                      tmp_path: Path) -> None:
    """16 reader processes parked on a stalled device are SIGKILLed; the mount keeps serving
    cached pages meanwhile; after the device is released the killed readers are gone, every
    file reads back exactly and parked_now returns to 0.

    A killed reader's wait entry must be dequeued, or parked_now stays above 0; the
    unit-level variant (a cancelled waiter left queued) is built in
    tests/unit/test_engine_invariants.py."""
    mnt = tmp_path / "mnt"
    with foreground_mount(fuzz_ext4, mnt, "faults", "direct_io", "readahead=0") as proc:
        target = mnt / "files" / "big"
        cached = (mnt / "files" / "f70000").read_bytes()  # in the daemon's cache from now on
        request(str(mnt), {"op": "fault", "action": "stall"})
        procs = [subprocess.Popen(["dd", f"if={target}", "of=/dev/null", "bs=4k", "count=1",
                                   f"skip={i * 3}", "status=none"]) for i in range(16)]
        try:
            _wait_parked(mnt, 16)
        finally:
            for p in procs:
                p.kill()
        # A FUSE request already handed to the daemon is waited for even by a killed
        # process (the kernel has no way to take it back): the daemon must still serve.
        assert (mnt / "files" / "f70000").read_bytes() == cached
        assert proc.poll() is None
        request(str(mnt), {"op": "fault", "action": "release"})
        for p in procs:
            p.wait(30)
        deadline = time.monotonic() + 10
        while stats(mnt)["parked_now"] or stats(mnt)["inflight_io"]:
            assert time.monotonic() < deadline, f"still parked: {stats(mnt)}"
            time.sleep(0.05)
        for rel in ("files/big", "files/f70000", "lin/sub/deep"):
            assert (mnt / rel).read_bytes() == (fuzz_tree / rel).read_bytes()
        assert stats(mnt)["parked_now"] == 0
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert proc.wait(10) == 0
