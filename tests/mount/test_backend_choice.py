"""Which image backend serves a mount, and what happens where io_uring is refused.

The kernel's own switch, ``kernel.io_uring_disabled`` = 2, refuses every ring as a container's
seccomp filter or a hardened kernel does. A mount with ``backend=auto`` must come up anyway,
served by the threads backend, with one line in its log saying why; ``asyncfs stats`` (and
``--json``, key ``backend``) names the backend; ``backend=uring`` is a one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.cli import control
from tests.mount.helpers import mounted, require_fuse, run_asyncfs, stats

SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.fixture
def io_uring_disabled() -> Iterator[None]:
    if not SYSCTL.exists() or os.geteuid() != 0:
        pytest.skip("needs root and a kernel with kernel.io_uring_disabled (6.6 or newer)")
    old = SYSCTL.read_text().strip()
    SYSCTL.write_text("2")
    try:
        yield
    finally:
        SYSCTL.write_text(old)


def _read_all(mnt: Path, src: Path) -> None:
    for p in sorted(src.rglob("*")):
        if not p.is_symlink() and p.is_file():
            assert (mnt / p.relative_to(src)).read_bytes() == p.read_bytes(), p


def test_stats_name_the_backend(ext4_image: Path, small_tree: Path, tmp_path: Path) -> None:
    """Where the kernel gives a ring, ``auto`` serves through io_uring, and stats say so."""
    with mounted(ext4_image, tmp_path / "mnt") as mnt:
        _read_all(mnt, small_tree)
        s = stats(mnt)
        text = run_asyncfs("stats", str(mnt))
    assert s["backend"] == "uring" and s["backend_note"] is None
    assert text.returncode == 0 and "backend   uring:" in text.stdout


def test_auto_falls_back_to_threads_where_io_uring_is_refused(
    ext4_image: Path, small_tree: Path, tmp_path: Path, io_uring_disabled: None
) -> None:
    """With io_uring refused, ``auto`` mounts and serves every byte through threads; its log
    has the one line that says why, and stats name the backend and the reason."""
    mnt = tmp_path / "mnt"
    with mounted(ext4_image, mnt) as m:
        _read_all(m, small_tree)
        s = stats(m)
        text = run_asyncfs("stats", str(m))
        log = control.log_path(str(m)).read_text()
    assert s["backend"] == "threads"
    assert "io_uring is unavailable" in s["backend_note"] and "EPERM" in s["backend_note"]
    assert "backend   threads (io_uring is unavailable" in text.stdout
    lines = [ln for ln in log.splitlines() if "serving through the threads backend" in ln]
    assert len(lines) == 1 and "EPERM" in lines[0], log[-2000:]


def test_backend_uring_without_a_ring_is_a_one_line_error(
    ext4_image: Path, tmp_path: Path, io_uring_disabled: None
) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_asyncfs("mount", str(ext4_image), str(mnt), "-o", "backend=uring")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncfs: "), r.stderr
    assert "io_uring is unavailable" in lines[0] and "EPERM" in lines[0]
    assert "Traceback" not in r.stderr
