"""`mount -t fuse.asyncfs` and fstab lines: mount(8) runs /sbin/mount.fuse.asyncfs, which turns
its calling convention into `asyncfs mount`. Real mount(8), real fstab files (``mount -T``),
real partitioned disks, `umount` to end the mount.

/sbin/mount.fuse.asyncfs is what ``./mount.sh`` installs (a link to the venv's console
script); where it is missing the tests install it with mount.sh's own function.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.testing.imagegen import compare_trees
from tests.mount.helpers import (
    daemon_pid,
    is_mounted,
    require_fuse,
    run_asyncfs,
    stats,
    unmount,
    wait_gone,
)

REPO = Path(__file__).resolve().parents[2]
HELPER_LINK = Path("/sbin/mount.fuse.asyncfs")
VENV_HELPER = Path(sys.executable).parent / "mount.fuse.asyncfs"
FIELDS = frozenset({"content", "link", "size"})
MIB = 1 << 20


def _mount_sh_function(name: str) -> str:
    """One function of mount.sh, as text (mount.sh itself runs its whole set-up)."""
    text = (REPO / "mount.sh").read_text()
    m = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.S | re.M)
    assert m, f"mount.sh has no function {name}"
    return m.group(0)


def ensure_helper() -> None:
    """/sbin/mount.fuse.asyncfs as ./mount.sh installs it, pointing at this checkout."""
    assert VENV_HELPER.exists(), (
        f"{VENV_HELPER} is missing: the venv predates the console script; run "
        f"./mount.sh --setup (or {sys.executable} -m pip install -e {REPO})")
    if not HELPER_LINK.is_symlink():
        # what ./mount.sh's set-up does, done with its own code
        subprocess.run(["bash", "-euc", _mount_sh_function("install_mount_helper")
                        + "install_mount_helper"], env=dict(os.environ, HERE=str(REPO)),
                       check=True)
    assert HELPER_LINK.is_symlink(), f"{HELPER_LINK} is not a link to an asyncfs venv's helper"
    target = Path(os.readlink(HELPER_LINK))
    assert target.parts[-3:] == (".venv", "bin", "mount.fuse.asyncfs"), target
    assert HELPER_LINK.resolve() == VENV_HELPER.resolve(), (
        f"{HELPER_LINK} -> {target}: another checkout's helper; run ./mount.sh --setup here")


@pytest.fixture(scope="module", autouse=True)
def helper_installed() -> None:
    if os.geteuid() != 0:
        reason = "needs root: the tests install the helper and mount as root"
        print(reason)
        pytest.skip(reason)
    require_fuse()
    ensure_helper()


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("asyncfs: "), lines
    for n in needles:
        assert n in lines[0], lines[0]


@contextlib.contextmanager
def _ended_by_umount(mnt: Path) -> Iterator[int]:
    """Yield the daemon's pid; afterwards the mount must be gone (the test ends it with
    `umount`) and so must the daemon. Cleans up after a failed test too."""
    pid = daemon_pid(mnt)
    try:
        yield pid
    finally:
        unmount(mnt)
    assert wait_gone(pid), "the daemon outlived its mount"


def _umount(mnt: Path) -> None:
    r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)


def test_mount_t_fuse_asyncfs(small_tree: Path, ext4_image: Path, tmp_path: Path) -> None:
    """`mount -t fuse.asyncfs IMG MNT -o ro`: the whole tree reads back as the source."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _mount("-t", "fuse.asyncfs", str(ext4_image), str(mnt), "-o", "ro")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    with _ended_by_umount(mnt):
        assert compare_trees(small_tree, mnt, fields=FIELDS) == []
        assert stats(mnt)["image"] == str(ext4_image)
        _umount(mnt)


def _partitioned_disk(path: Path, label: str, fs_image: Path, decoy: Path) -> None:
    """A disk with two partitions: 1 holds a small ext2 built from ``decoy``, 2 a copy of
    ``fs_image`` (so mounting the wrong one shows other files)."""
    part2_mib = -(-fs_image.stat().st_size // MIB)
    with open(path, "wb") as f:
        f.truncate((1 + 8 + part2_mib + 1) * MIB)
    script = (f"label: {label}\nsize=8MiB, type=L\nsize={part2_mib}MiB, type=L\n"
              if label == "gpt" else
              f"label: dos\nsize=8MiB, type=83\nsize={part2_mib}MiB, type=83\n")
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True,
                   capture_output=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                      capture_output=True, text=True).stdout)
    p1, p2 = table["partitiontable"]["partitions"]
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-E", f"offset={p1['start'] * 512}",
                    "-d", str(decoy), str(path), f"{p1['size'] // 2}k"],
                   check=True, capture_output=True)
    subprocess.run(["dd", f"if={fs_image}", f"of={path}", "bs=1M", f"seek={p2['start'] * 512}",
                    "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"], check=True)


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_fstab_line_with_partition(small_tree: Path, ext4_image: Path, tmp_path: Path,
                                   label: str) -> None:
    """An fstab line with partition=2, asyncfs's own cache_size, and what only mount(8) and
    systemd act on (nofail, _netdev, x-systemd.automount): `mount -T FILE MNT` mounts the
    second partition of a GPT or MBR disk with that cache size; `umount` ends it."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "partition-1.txt").write_text("the wrong partition\n")
    disk = tmp_path / f"{label}.disk"
    _partitioned_disk(disk, label, ext4_image, decoy)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a test fstab\n"
        f"{disk} {mnt} fuse.asyncfs "
        "ro,partition=2,nofail,_netdev,x-systemd.automount,cache_size=32M 0 0\n")
    r = _mount("-T", str(fstab), str(mnt))
    assert r.returncode == 0, r.stderr
    with _ended_by_umount(mnt):
        assert not (mnt / "partition-1.txt").exists()
        assert compare_trees(small_tree, mnt, fields=FIELDS) == []
        s = stats(mnt)
        assert s["image"] == str(disk)
        assert s["cache_max_bytes"] == 32 * MIB
        _umount(mnt)


@pytest.mark.parametrize(("options", "needles", "status"), [
    ("ro,partition=2,bogus", ["unknown mount option: bogus"], 1),
    ("ro,nofail,cache_size=12Q", ["malformed size for cache_size: '12Q'"], 1),
    ("rw,nofail", ["read-only", "add ro"], 1),
    ("defaults", ["read-only", "add ro"], 1),  # mount(8) passes rw for defaults
    ("ro,partition=7", ["partition=7 does not exist"], 32),
])
def test_fstab_bad_line_is_one_line(ext4_image: Path, tmp_path: Path, options: str,
                                    needles: list[str], status: int) -> None:
    """A bad fstab line: asyncfs's one-line error through mount(8), exit 1 for a bad option
    (mount(8)'s "incorrect invocation") or 32 ("mount failure"), nothing mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{ext4_image} {mnt} fuse.asyncfs {options} 0 0\n")
    r = _mount("-T", str(fstab), str(mnt))
    _one_line_error(r, *needles)
    assert r.returncode == status
    assert not is_mounted(mnt)


def test_sloppy_drops_unknown_options(ext4_image: Path, small_tree: Path,
                                      tmp_path: Path) -> None:
    """`mount -s`: options asyncfs does not have are dropped; a bad value of one it has is
    still an error."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bad = _mount("-s", "-t", "fuse.asyncfs", str(ext4_image), str(mnt), "-o",
                 "ro,readahead=lots")
    _one_line_error(bad, "readahead")
    r = _mount("-s", "-t", "fuse.asyncfs", str(ext4_image), str(mnt), "-o",
               "ro,no_such_option,other=1,readahead=1M")
    assert r.returncode == 0, r.stderr
    with _ended_by_umount(mnt):
        assert compare_trees(small_tree / "files", mnt / "files", fields=FIELDS) == []
        _umount(mnt)


def test_fake_mount_checks_only(ext4_image: Path, tmp_path: Path) -> None:
    """`mount -f -v`: the helper checks the image, mount point and options, says what it
    would run, and mounts nothing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _mount("-f", "-v", "-t", "fuse.asyncfs", str(ext4_image), str(mnt), "-o",
               "ro,nofail,cache_size=64M")
    assert r.returncode == 0, r.stderr
    assert f"asyncfs mount {ext4_image} {mnt} -o ro,cache_size=64M" in r.stderr
    assert not is_mounted(mnt)
    _one_line_error(_mount("-f", "-t", "fuse.asyncfs", str(tmp_path / "none.img"), str(mnt),
                           "-o", "ro"), "does not exist")


def test_mount_in_another_namespace(ext4_image: Path, small_tree: Path,
                                    tmp_path: Path) -> None:
    """`mount -N NS`: the helper enters that mount namespace before it mounts; the mount is
    seen there, not here, and serves reads there."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               "sleep", "600"])
    ns = f"/proc/{holder.pid}/ns/mnt"
    pid = None
    try:
        deadline = time.monotonic() + 10
        while os.readlink(ns) == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make its namespace"
            time.sleep(0.01)
        r = _mount("-N", ns, "-t", "fuse.asyncfs", str(ext4_image), str(mnt), "-o", "ro")
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        pid = daemon_pid(mnt)  # its socket lives in /run, shared by both namespaces
        rel = "files/inline_small"
        there = subprocess.run(["nsenter", f"--mount={ns}", "cat", str(mnt / rel)],
                               capture_output=True, check=True)
        assert there.stdout == (small_tree / rel).read_bytes()
        subprocess.run(["nsenter", f"--mount={ns}", "umount", str(mnt)], check=True)
        assert wait_gone(pid)
    finally:
        if pid is not None and not wait_gone(pid, 0.1):
            subprocess.run(["nsenter", f"--mount={ns}", "umount", "-l", str(mnt)],
                           capture_output=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        holder.kill()
        holder.wait()


def test_asyncfs_mount_itself_still_refuses_mount8_options(ext4_image: Path,
                                                            tmp_path: Path) -> None:
    """Only the helper drops mount(8)'s options: typed at `asyncfs mount` they are mistakes."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _one_line_error(run_asyncfs("mount", str(ext4_image), str(mnt), "-o", "ro,nofail"),
                    "unknown mount option: nofail")
