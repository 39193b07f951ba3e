"""Bad input on the command line: one line saying what is wrong, a non-zero exit, no traceback,
and the image is never written."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.mount.helpers import (
    daemon_pid,
    is_mounted,
    mounted,
    require_fuse,
    run_asyncfs,
    wait_gone,
)


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("asyncfs: "), lines
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    d = tmp_path / "mnt"
    d.mkdir()
    return d


def test_missing_image(tmp_path: Path, mnt: Path) -> None:
    _one_line_error(run_asyncfs("mount", str(tmp_path / "nope.img"), str(mnt)), "does not exist")


def test_image_is_a_directory(tmp_path: Path, mnt: Path) -> None:
    _one_line_error(run_asyncfs("mount", str(tmp_path), str(mnt)), "directory")


@pytest.mark.parametrize("cmd", ["mount", "ls"])
def test_image_is_a_fifo(cmd: str, tmp_path: Path, mnt: Path) -> None:
    """A FIFO (or any non-file) as the image is refused at once, not waited on.

    Guards ``open_readonly``'s O_NONBLOCK: without it open() blocks until a writer comes
    and the command times out."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [cmd, str(fifo)] + ([str(mnt)] if cmd == "mount" else [])
    _one_line_error(run_asyncfs(*args, timeout=20), "not a regular file or block device")


def test_empty_image(tmp_path: Path, mnt: Path) -> None:
    img = tmp_path / "empty.img"
    img.touch()
    _one_line_error(run_asyncfs("mount", str(img), str(mnt)), "empty")


def test_not_an_ext_image(tmp_path: Path, mnt: Path) -> None:
    img = tmp_path / "random.img"
    img.write_bytes(os.urandom(4 << 20))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    _one_line_error(run_asyncfs("mount", str(img), str(mnt)))
    assert not is_mounted(mnt)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def test_partition_that_does_not_exist(ext4_image: Path, mnt: Path) -> None:
    _one_line_error(run_asyncfs("mount", str(ext4_image), str(mnt), "-o", "partition=3"),
                    "partition")


@pytest.mark.parametrize(
    ("opt", "needle"),
    [("bogus", "unknown mount option: bogus"), ("cache_size=12Q", "malformed size"),
     ("wait=never", "wait=never"), ("rw", "read-only"),
     # nan/inf passed the range checks and then failed every read ("I/O error ...")
     ("latency=nan", "latency=nan"), ("latency=1e309", "latency=1e309")],
)
def test_bad_options(ext4_image: Path, mnt: Path, opt: str, needle: str) -> None:
    _one_line_error(run_asyncfs("mount", str(ext4_image), str(mnt), "-o", opt), needle)


def test_mount_point_missing(ext4_image: Path, tmp_path: Path) -> None:
    _one_line_error(run_asyncfs("mount", str(ext4_image), str(tmp_path / "nowhere")),
                    "does not exist")


def test_mount_point_is_a_file(ext4_image: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.touch()
    _one_line_error(run_asyncfs("mount", str(ext4_image), str(f)), "not a directory")


def test_mount_point_already_mounted(ext4_image: Path, mnt: Path) -> None:
    with mounted(ext4_image, mnt):
        _one_line_error(run_asyncfs("mount", str(ext4_image), str(mnt)), "busy")


def test_stale_mount_point_is_explained(ext4_image: Path, mnt: Path) -> None:
    require_fuse()
    r = run_asyncfs("mount", str(ext4_image), str(mnt))
    assert r.returncode == 0, r.stderr
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    try:
        with pytest.raises(OSError) as ei:
            os.statvfs(mnt)
        # ECONNABORTED while the kernel still tears the connection down (CI saw it once)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        _one_line_error(run_asyncfs("mount", str(ext4_image), str(mnt)),
                        "Transport endpoint is not connected", "fusermount3 -u")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    assert not is_mounted(mnt)


def test_stats_of_a_plain_directory(mnt: Path) -> None:
    _one_line_error(run_asyncfs("stats", str(mnt)), "not an asyncfs mount")


def test_usage_error_is_one_line() -> None:
    _one_line_error(run_asyncfs("mount"), "required")


def test_dangling_symlink_image(tmp_path: Path, mnt: Path) -> None:
    link = tmp_path / "gone.img"
    link.symlink_to(tmp_path / "nowhere.img")
    _one_line_error(run_asyncfs("mount", str(link), str(mnt)), "dangling symbolic link")


def test_newline_in_a_path_stays_one_line(tmp_path: Path, mnt: Path) -> None:
    """A newline in the path is escaped: the message printed raw would split in two."""
    odd = tmp_path / "new\nline"
    odd.mkdir()
    _one_line_error(run_asyncfs("mount", str(odd / "x.img"), str(mnt)), "does not exist",
                    "new\\nline")
