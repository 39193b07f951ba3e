"""Ordinary tools over an asyncfs mount give exactly what they give over the kernel's own mount
of the same image (cat, dd, cp -a, tar, find -ls, du, stat, getfattr, statfs)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.testing.imagegen import compare_trees
from tests.imagegen import kernel_mount
from tests.mount.helpers import mounted


@pytest.fixture(scope="module")
def both_mounts(ext4_image: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[Path, Path]]:
    """(asyncfs mount, kernel loop mount) of the same image."""
    base = tmp_path_factory.mktemp("both")
    with kernel_mount(ext4_image) as ref, mounted(ext4_image, base / "mnt") as mnt:
        yield mnt, ref


def _out(cmd: list[str], cwd: Path) -> bytes:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=300)
    assert r.returncode == 0, (cmd, r.stderr.decode(errors="replace"))
    return r.stdout


@pytest.mark.parametrize(
    "cmd",
    [
        ["find", ".", "-ls"],
        ["find", ".", "-printf", "%p %i %n %m %U %G %s %b %T@ %A@ %C@ %y %l\\n"],
        ["du", "-a", "-l", "--block-size=1"],  # -l: hard links counted wherever met
        ["du", "-a", "-l", "--apparent-size", "--block-size=1"],
        ["getfattr", "-R", "-h", "-d", "-m", "-", "--absolute-names", "."],
        ["stat", "-f", "-c", "%b %f %a %c %d %l %s %S", "."],
        ["tar", "c", "--sort=name", "--numeric-owner", "--xattrs", "--xattrs-include=*",
         "--acls", "-f", "-", "."],
        ["ls", "-lAnR", "--time-style=full-iso"],
    ],
    ids=["find-ls", "find-printf", "du", "du-apparent", "getfattr", "statfs", "tar", "ls-lR"],
)
def test_tool_output_matches_kernel(both_mounts: tuple[Path, Path], cmd: list[str]) -> None:
    mnt, ref = both_mounts
    ours, theirs = _out(cmd, mnt), _out(cmd, ref)
    if cmd[0] in ("find", "du", "getfattr", "ls"):
        # Same lines; the order of entries within a directory is compared by
        # test_readdir_order_matches_kernel. find -ls sizes its columns as it goes, so the
        # spacing depends on the order too: compare the fields.
        ours = b"\n".join(sorted(b" ".join(x.split()) for x in ours.split(b"\n")))
        theirs = b"\n".join(sorted(b" ".join(x.split()) for x in theirs.split(b"\n")))
    if ours != theirs:
        a, b = ours.decode(errors="replace").splitlines(), theirs.decode(errors="replace")
        diff = [line for line in a if line not in b.splitlines()][:10]
        pytest.fail(f"{cmd[0]} differs from the kernel mount; first lines only ours: {diff}")


def test_stat_every_entry_matches_kernel(both_mounts: tuple[Path, Path]) -> None:
    mnt, ref = both_mounts
    names = _out(["find", ".", "-print0"], ref).split(b"\0")[:-1]
    # Not %w (birth time): libfuse 3.14 has no statx handler, so FUSE cannot report it.
    fmt = "%n|%i|%a|%F|%h|%u|%g|%s|%b|%B|%t|%T|%x|%y|%z|%N"
    for i in range(0, len(names), 200):
        chunk = [os.fsdecode(n) for n in names[i : i + 200]]
        assert _out(["stat", "-c", fmt, "--", *chunk], mnt) == _out(
            ["stat", "-c", fmt, "--", *chunk], ref)


def test_cp_a_copies_the_same_tree(both_mounts: tuple[Path, Path], tmp_path: Path) -> None:
    mnt, ref = both_mounts
    subprocess.run(["cp", "-a", f"{mnt}/.", str(tmp_path / "ours")], check=True)
    subprocess.run(["cp", "-a", f"{ref}/.", str(tmp_path / "theirs")], check=True)
    assert compare_trees(tmp_path / "ours", tmp_path / "theirs",
                         fields=("mode", "uid", "gid", "size", "rdev", "mtime", "content",
                                 "link", "xattrs")) == []


def _biggest_file(root: Path) -> Path:
    best, size = root, -1
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size > size:
                best, size = p, st.st_size
    return best


@pytest.mark.parametrize(
    "dd_args",
    [["bs=1", "count=5000", "skip=4093"], ["bs=4k"], ["bs=1M"], ["bs=4k", "skip=3", "count=7"],
     ["bs=1M", "skip=1", "count=2"], ["bs=65537", "skip=3"], ["bs=511", "skip=9", "count=100"],
     ["bs=1M", "iflag=direct"]],
    ids=lambda a: ",".join(a),
)
def test_dd_matches_kernel(both_mounts: tuple[Path, Path], dd_args: list[str]) -> None:
    mnt, ref = both_mounts
    rel = _biggest_file(ref).relative_to(ref)
    assert (ref / rel).stat().st_size > 1 << 20, "the corpus should hold a file over 1 MiB"

    def dd(root: Path) -> str:
        out = _out(["dd", f"if={root / rel}", "of=/dev/stdout", "status=none", *dd_args], root)
        return hashlib.sha256(out).hexdigest() + f" {len(out)}"

    assert dd(mnt) == dd(ref)


def test_cat_every_file_matches_source(ext4_mount: Path, small_tree: Path) -> None:
    checked = 0
    for dirpath, _, files in os.walk(small_tree):
        for f in files:
            src = Path(dirpath) / f
            if src.is_symlink() or not src.is_file():
                continue
            ours = ext4_mount / src.relative_to(small_tree)
            assert _out(["cat", str(ours)], ext4_mount) == src.read_bytes(), ours
            checked += 1
    assert checked > 10


def test_readdir_order_matches_kernel(both_mounts: tuple[Path, Path]) -> None:
    """`ls -U`/`find` list entries in readdir order: hash order for an htree directory, disk
    order for a linear one. Ours must be the kernel's, not merely the same set."""
    mnt, ref = both_mounts
    for cmd in (["find", ".", "-printf", "%p\\n"], ["ls", "-aUR"], ["du", "-a"]):
        # du counts a hard-linked file at the first name it meets: order-dependent too
        assert _out(cmd, mnt).splitlines() == _out(cmd, ref).splitlines(), cmd
