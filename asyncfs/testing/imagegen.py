"""Source trees, ext2/3/4 images built from them with e2fsprogs, and tree comparers: the
image corpus of the tests and the benchmarks. Typical use::

    make_tree(src, "small")
    img = make_image(src, tmp / "img", preset)
    assert compare_trees(src, mounted, fields=SOURCE_FIELDS,
                         small_inodes=preset in SMALL_INODE_PRESETS) == []

The kernel's reference mount of an image, and the per-process image cache, are the tests'
(``tests/imagegen.py``).

Facts about ``mke2fs -d`` (e2fsprogs 1.47.0) that shaped this module, measured here:

* it copies mode, uid/gid (32-bit), rdev (old and new encodings), hard links, FIFOs, sockets,
  symlinks, xattrs and POSIX ACLs, and turns all-zero blocks into holes (so ``st_blocks``
  differs from the source);
* it copies only the seconds of mtime (no nanoseconds, no epoch bits past 2038) and sets atime
  and ctime to "now": :func:`make_image` therefore rewrites atime/mtime of every inode from the
  source with ``debugfs -w`` (``sif <ino> mtime @S`` + ``mtime_extra``). ctime stays "now";
* it rejects symlink targets of 1024 bytes or more, so the longest symlink here is 1000 bytes;
* it writes every directory linear (no htree) and every file contiguously. :func:`make_image`
  runs ``e2fsck -fyD`` afterwards on dir_index presets so multi-block directories get a real
  hash tree; fragmentation comes from files whose data alternates with holes (each data chunk
  is its own extent, 2000 of them give a depth-2 extent tree at every block size).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from asyncfs.testing.treewalk import DepthFirst

# --------------------------------------------------------------------------------------------
# source trees
# --------------------------------------------------------------------------------------------

BASE_TIME = 1_600_000_000  # 2020-09-13: ordinary timestamps are BASE_TIME + small offsets

# the tags of a POSIX ACL as Linux stores it in an xattr
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def linux_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The ``system.posix_acl_*`` value (version 2) for ``(tag, perm, id)`` entries."""
    out = struct.pack("<I", 2)
    for tag, perm, ident in entries:
        out += struct.pack("<HHI", tag, perm, ident)
    return out


def _rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _write(path: Path | bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_tree(root: Path, profile: Literal["full", "small"] = "full", seed: int = 0) -> None:
    """Build a source tree with every feature the decoder must handle under ``root``.

    ``root`` is created if missing and should be empty. Without root the tree lacks what
    needs privilege (device nodes, other owners, ``trusted.*``/``security.*``). Layout (each
    directory exercises one thing):

    ``files/`` sizes 0, 1, bs-1/bs/bs+1 for 1k/2k/4k, 12 blocks +1 (first indirect), a few MiB;
    ``sparse/`` holes at start, middle, end, an all-zero file, data past 4 GiB (triple
    indirect on 1k ext2; 70 MiB for "small"), ``fragmented`` (data chunks alternating with
    holes: many extents);
    ``bigdir/`` 3000 entries (300 for "small") of varied name lengths (htree after e2fsck -D);
    ``bigdir_long/`` 2500 (700) 200-byte names: a two-level htree (dx nodes) with 1 KiB blocks;
    ``names/`` 255-byte name, space, newline, tab, UTF-8, non-UTF-8, leading dash, dots;
    ``links/`` symlinks of 1, 59, 60, 61, 500, 1000 bytes, dangling, absolute, to a dir; hard
    links (3 names across 2 dirs); ``special/`` FIFO, socket, char/block devices with old
    (<256) and new (large) major/minor encodings; ``xattr/`` user/trusted/security values
    small (in-inode) and large (external block), empty values, many names, two files with
    identical xattrs, xattrs on a dir and a symlink; ``acl/`` access and default POSIX ACLs;
    ``modes/`` 000, 7777, setuid, setgid, sticky dir; ``owners/`` uid/gid 0, 1000, 65534,
    2**31+5, 2**32-2; ``times/`` nanoseconds, before 1970, after 2038 (2100, 2286);
    ``lost+found`` (mode 0700, so the image's own lost+found matches).

    Every byte, name and timestamp is a function of ``seed`` only.
    """
    full = profile == "full"
    priv = os.geteuid() == 0  # without root: no device nodes, trusted.*/security.*, chown
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    (root / "lost+found").mkdir(mode=0o700, exist_ok=True)
    # one shared rng, drawn from in this order: the same seed gives the same tree
    for build in (_tree_files, _tree_sparse, _tree_bigdir, _tree_bigdir_long, _tree_names,
                  _tree_links, _tree_special, _tree_xattr, _tree_acl, _tree_modes,
                  _tree_owners):
        build(root, rng, full, priv)
    time_fixed = _tree_times(root, rng, full, priv)
    os.chmod(root / "modes" / "dir0000", 0o000 if priv else 0o500)
    _tree_stamps(root, rng, time_fixed)


def _tree_files(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``files/``: sizes around each block size, 12 blocks + 1, inline candidates, a big file."""
    files = root / "files"
    files.mkdir()
    _write(files / "empty", b"")
    _write(files / "one", b"\x5a")
    for bs in (1024, 2048, 4096):
        for delta, tag in ((-1, "minus1"), (0, "exact"), (1, "plus1")):
            _write(files / f"bs{bs}_{tag}", _rand(rng, bs + delta))
    _write(files / "direct_plus1", _rand(rng, 12 * 1024 + 1))
    _write(files / "inline_small", b"tiny inline payload\n")
    _write(files / "inline_edge", _rand(rng, 60))
    _write(files / "inline_100", _rand(rng, 100))  # i_block + 40 bytes of system.data
    _write(files / "big", _rand(rng, (3 << 20) + 17 if full else (300 << 10) + 17))


def _tree_sparse(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``sparse/``: holes at start, middle and end, zeros, data far out, an extent per chunk."""
    sparse = root / "sparse"
    sparse.mkdir()
    with open(sparse / "hole_start", "wb") as f:
        f.seek(1 << 20)
        f.write(_rand(rng, 5000))
    with open(sparse / "hole_middle", "wb") as f:
        f.write(_rand(rng, 8192))
        f.seek(3 << 20)
        f.write(_rand(rng, 8192))
    with open(sparse / "hole_end", "wb") as f:
        f.write(_rand(rng, 4096))
        f.truncate(2 << 20)
    _write(sparse / "all_zero", b"\0" * 65536)
    with open(sparse / "far", "wb") as f:
        f.write(_rand(rng, 100))
        # past 4 GiB (i_size_high; triple indirect at 4 KiB), or 70 MiB (triple indirect
        # with 1 KiB blocks) for "small", which mount tests may read through FUSE
        f.seek((4 << 30) + 12345 if full else (70 << 20) + 12345)
        f.write(_rand(rng, 7000))
    # Every 4 KiB data chunk is followed by a 4 KiB hole: one extent per chunk at any block
    # size, so 2000 chunks need a depth-2 tree even with 4 KiB blocks (4 x 340 < 2000).
    chunks = 2000 if full else 400
    with open(sparse / "fragmented", "wb") as f:
        for i in range(chunks):
            f.seek(i * 8192)
            f.write(_rand(rng, 4096))


def _tree_bigdir(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``bigdir/``: many entries of varied name lengths: an htree after e2fsck -D."""
    bigdir = root / "bigdir"
    bigdir.mkdir()
    for i in range(3000 if full else 300):
        name = f"e{i:05d}_" + "n" * rng.randrange(0, 60)
        if i % 3 == 0:
            _write(bigdir / name, b"")
        elif i % 3 == 1:
            _write(bigdir / name, i.to_bytes(4, "little"))
        else:
            (bigdir / name).mkdir()


def _tree_bigdir_long(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``bigdir_long/``: 200-byte names: a two-level htree (dx nodes) with 1 KiB blocks."""
    # ~4 entries per 1 KiB block: more leaves than a 1 KiB dx root holds, so dx nodes
    longdir = root / "bigdir_long"
    longdir.mkdir()
    for i in range(2500 if full else 700):
        _write(longdir / (f"{i:05d}_" + "L" * 194), b"")


def _tree_names(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``names/``: names no shell quoting survives: 255 bytes, whitespace, UTF-8 and not, dots."""
    names = os.fsencode(root / "names")
    os.mkdir(names)
    odd = [
        b"x" * 255,
        b"with space",
        b"new\nline",
        b"tab\there",
        "ünïcødé-日本語".encode(),
        b"latin1-\xe9\xff\xfe",
        b"-leading-dash",
        b"...",
        b".hidden",
        b"quote\"'`$",
        b"\x01\x7f",
    ]
    for oname in odd:
        _write(os.path.join(names, oname), oname)
    os.mkdir(os.path.join(names, b"dir \xff\n"))
    _write(os.path.join(names, b"dir \xff\n", b"inner"), b"inner")


def _tree_links(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``links/``: fast and slow symlinks, dangling, absolute, to a dir; hard links across dirs."""
    links = root / "links"
    links.mkdir()
    _write(links / "target", b"target file\n")
    for length in (1, 59, 60, 61, 500, 1000):
        os.symlink("t" * length, links / f"len{length}")
    os.symlink("target", links / "rel")
    os.symlink("/absolute/path/that/does/not/exist", links / "abs_dangling")
    os.symlink("../files", links / "to_dir")
    os.symlink("a/" * 29 + "b", links / "deep_dangling")
    _write(links / "hard1", b"hard linked\n")
    os.link(links / "hard1", links / "hard2")
    os.link(links / "hard1", root / "files" / "hard3")


def _tree_special(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``special/``: FIFO, socket, and device nodes in old and new major/minor encodings."""
    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(special / "sock"))
    for name, kind, major, minor in (
        ("null", stat.S_IFCHR, 1, 3),
        ("sda1", stat.S_IFBLK, 8, 1),
        ("chr_255_255", stat.S_IFCHR, 255, 255),
        ("chr_256_0", stat.S_IFCHR, 256, 0),
        ("chr_300_70000", stat.S_IFCHR, 300, 70000),
        ("blk_max", stat.S_IFBLK, 4095, (1 << 20) - 1),
        ("chr_0_0", stat.S_IFCHR, 0, 0),
    ):
        if priv:
            os.mknod(special / name, kind | 0o640, os.makedev(major, minor))


def _tree_xattr(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``xattr/``: xattrs in the inode and in a block, empty, many, shared, on a dir and a link."""
    xd = root / "xattr"
    xd.mkdir()
    _write(xd / "small", b"s")
    os.setxattr(xd / "small", "user.small", b"v1")
    if priv:
        os.setxattr(xd / "small", "trusted.t", b"trusted value")
        os.setxattr(xd / "small", "security.s", b"sec\0with nul")
    os.setxattr(xd / "small", "user.empty", b"")
    _write(xd / "large", b"l")
    # 700 bytes: too big for any inode body, small enough for a 1 KiB xattr block
    os.setxattr(xd / "large", "user.large", _rand(rng, 700))
    os.setxattr(xd / "large", "user.tiny", b"t")
    shared = {"user.shared_a": _rand(rng, 300),
              "trusted.shared_b" if priv else "user.shared_b": _rand(rng, 200)}
    for fname in ("shared1", "shared2"):
        _write(xd / fname, fname.encode())
        for k, v in shared.items():
            os.setxattr(xd / fname, k, v)
    _write(xd / "many", b"m")
    for i in range(20):
        os.setxattr(xd / "many", f"user.attr{i:02d}", f"value-{i}".encode() * (i % 4 + 1))
    os.mkdir(xd / "dir")
    os.setxattr(xd / "dir", "user.on_dir", b"d")
    os.symlink("small", xd / "link")
    if priv:  # user.* is not allowed on symlinks
        os.setxattr(xd / "link", "trusted.on_link", b"l", follow_symlinks=False)
    _write(xd / "longname", b"n")
    os.setxattr(xd / "longname", "user." + "k" * 200, b"long name")


def _tree_acl(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``acl/``: access and default POSIX ACLs, and a minimal one the kernel does not store."""
    acl = root / "acl"
    acl.mkdir()
    _write(acl / "access", b"acl\n")
    os.setxattr(
        acl / "access",
        "system.posix_acl_access",
        linux_acl(
            [
                (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
                (ACL_USER, 7, 1000),
                (ACL_USER, 4, 2**31 + 5),
                (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
                (ACL_GROUP, 5, 100),
                (ACL_MASK, 7, ACL_UNDEFINED_ID),
                (ACL_OTHER, 0, ACL_UNDEFINED_ID),
            ]
        ),
    )
    os.mkdir(acl / "default_dir")
    os.setxattr(
        acl / "default_dir",
        "system.posix_acl_default",
        linux_acl(
            [
                (ACL_USER_OBJ, 7, ACL_UNDEFINED_ID),
                (ACL_GROUP_OBJ, 5, ACL_UNDEFINED_ID),
                (ACL_GROUP, 7, 4242),
                (ACL_MASK, 7, ACL_UNDEFINED_ID),
                (ACL_OTHER, 1, ACL_UNDEFINED_ID),
            ]
        ),
    )
    # minimal ACL equal to the mode: the kernel stores nothing, so the image must show nothing
    _write(acl / "minimal", b"m")


def _tree_modes(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``modes/``: every mode bit, setuid/setgid/sticky, an unreadable dir."""
    modes = root / "modes"
    modes.mkdir()
    for m in (0o000, 0o7777, 0o4755, 0o2755, 0o1777, 0o640, 0o111):
        _write(modes / f"f{m:04o}", b"mode")
        # mke2fs -d must read the file: without root keep it owner-readable
        os.chmod(modes / f"f{m:04o}", m if priv else m | 0o400)
    os.mkdir(modes / "sticky_dir")
    os.chmod(modes / "sticky_dir", 0o1777)
    os.mkdir(modes / "dir0000")


def _tree_owners(root: Path, rng: random.Random, full: bool, priv: bool) -> None:
    """``owners/``: uid/gid 0 to 2**32-2, and a symlink with its own owner."""
    owners = root / "owners"
    owners.mkdir()
    for uid, gid in ((0, 0), (1000, 1000), (65534, 65534), (2**31 + 5, 2**31 + 6), (65535, 65536),
                     (2**32 - 2, 123)):
        p = owners / f"u{uid}_g{gid}"
        _write(p, b"o")
        if priv:
            os.chown(p, uid, gid)
    os.symlink("x", owners / "link_1000")
    if priv:
        os.lchown(owners / "link_1000", 1000, 2000)


def _tree_times(root: Path, rng: random.Random, full: bool, priv: bool) -> set[bytes]:
    """``times/``: nanoseconds, before 1970, past 2038; returns the paths whose times are set."""
    times = root / "times"
    times.mkdir()
    # (name, atime_ns, mtime_ns)
    for name, at, mt in (
        ("ns", 1_500_000_000_123_456_789, 1_500_000_001_987_654_321),
        ("pre1970", -1_234_567_890_500_000_000, -86_400_000_000_001),
        ("epoch0", 0, 0),
        ("y2038_edge", (2**31 - 1) * 10**9, 2**31 * 10**9 + 1),
        ("y2100", 4_102_444_800_123_456_789, 4_102_444_800_999_999_999),
        ("y2286", 10_000_000_000 * 10**9, 9_999_999_999 * 10**9 + 5),
    ):
        _write(times / name, name.encode())
        os.utime(times / name, ns=(at, mt))
    return {os.fsencode(times / n) for n in os.listdir(times)}


def _tree_stamps(root: Path, rng: random.Random, time_fixed: set[bytes]) -> None:
    """Timestamps of every path but ``time_fixed``: last, children before parents, so
    creating entries cannot disturb them."""
    all_paths: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        dirnames.sort()
        for entry in sorted(filenames) + dirnames:
            all_paths.append(os.path.join(dirpath, entry))
    all_paths.sort(key=lambda q: (-q.count(b"/"), q))
    for path in [*all_paths, os.fsencode(root)]:
        if path in time_fixed:
            continue
        t = (BASE_TIME + rng.randrange(0, 10**8)) * 10**9 + rng.randrange(0, 10**9)
        os.utime(path, ns=(t + 10**9, t), follow_symlinks=False)


def make_fuzz_tree(root: Path, seed: int = 0) -> None:
    """A small tree with one of every structure worth damaging, cheap to walk (~150 inodes).

    ``files/`` small, block-sized and multi-block files; ``frag`` one extent per 4 KiB data
    chunk (depth-1 extent tree at every block size); ``far`` data past 70 MiB (double/triple
    indirect on 1 KiB ext2); ``dx/`` 120 entries (an htree after e2fsck -D); ``dx_long/`` 560
    entries of 200-byte names (two htree levels with 1 KiB blocks); ``lin/`` a one-block linear
    directory; ``links/`` fast and slow symlinks; ``xattr/`` in-inode and block xattrs, a
    shared block; ``inline`` files for the inline_data preset.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "lost+found").mkdir(mode=0o700, exist_ok=True)
    files = root / "files"
    files.mkdir()
    (files / "empty").write_bytes(b"")
    (files / "one").write_bytes(b"\x5a")
    (files / "inline_small").write_bytes(b"tiny inline payload\n")
    (files / "inline_100").write_bytes(rng.randbytes(100))
    for n in (1023, 4096, 4097, 12 * 1024 + 1, 70_000):
        (files / f"f{n}").write_bytes(rng.randbytes(n))
    (files / "big").write_bytes(rng.randbytes((260 << 10) + 17))
    with open(files / "frag", "wb") as f:
        for i in range(400):
            f.seek(i * 8192)
            f.write(rng.randbytes(4096))
    with open(files / "far", "wb") as f:
        f.write(rng.randbytes(100))
        f.seek((70 << 20) + 12345)
        f.write(rng.randbytes(7000))
    with open(files / "hole_end", "wb") as f:
        f.write(rng.randbytes(4096))
        f.truncate(1 << 20)
    dx = root / "dx"
    dx.mkdir()
    for i in range(120):
        name = f"e{i:04d}_" + "n" * rng.randrange(0, 40)
        if i % 10 == 0:
            (dx / name).mkdir()
        else:
            (dx / name).write_bytes(i.to_bytes(4, "little") * (i % 5))
    dxl = root / "dx_long"
    dxl.mkdir()
    for i in range(560):
        (dxl / (f"{i:04d}_" + "L" * 195)).write_bytes(b"")
    lin = root / "lin"
    lin.mkdir()
    for i in range(8):
        (lin / f"entry{i}").write_bytes(f"lin {i}\n".encode())
    (lin / "sub").mkdir()
    (lin / "sub" / "deep").write_bytes(b"deep\n")
    links = root / "links"
    links.mkdir()
    (links / "target").write_bytes(b"target file\n")
    for length in (1, 59, 60, 500, 1000):
        os.symlink("t" * length, links / f"len{length}")
    os.symlink("../files", links / "to_dir")
    (links / "hard1").write_bytes(b"hard linked\n")
    os.link(links / "hard1", links / "hard2")
    xd = root / "xattr"
    xd.mkdir()
    (xd / "small").write_bytes(b"s")
    os.setxattr(xd / "small", "user.small", b"v1")
    os.setxattr(xd / "small", "user.empty", b"")
    (xd / "large").write_bytes(b"l")
    os.setxattr(xd / "large", "user.large", rng.randbytes(700))
    os.setxattr(xd / "large", "user.tiny", b"t")
    for fname in ("shared1", "shared2"):
        (xd / fname).write_bytes(fname.encode())
        os.setxattr(xd / fname, "user.shared_a", bytes(range(256)) + b"a" * 44)
        os.setxattr(xd / fname, "user.shared_b", b"b" * 200)
    (xd / "many").write_bytes(b"m")
    for i in range(20):
        os.setxattr(xd / "many", f"user.attr{i:02d}", f"value-{i}".encode() * (i % 4 + 1))
    os.mkdir(xd / "dir")
    os.setxattr(xd / "dir", "user.on_dir", b"d")
    stamp = 1_600_000_000
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, list[str]] = {
    "ext2": ["-t", "ext2", "-b", "4096", "-I", "256"],
    "ext2-1k": ["-t", "ext2", "-b", "1024", "-I", "128"],
    "ext3": ["-t", "ext3", "-b", "4096", "-I", "256"],
    "ext4": ["-t", "ext4", "-b", "4096", "-I", "256"],
    "ext4-1k": ["-t", "ext4", "-b", "1024", "-I", "256"],
    "ext4-2k": ["-t", "ext4", "-b", "2048", "-I", "256"],
    "ext4-128inode": ["-t", "ext4", "-b", "4096", "-I", "128"],
    "inline_data": ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "inline_data"],
    "bigalloc": ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "bigalloc", "-C", "16384"],
    "meta_bg": ["-t", "ext4", "-b", "1024", "-I", "256", "-O", "meta_bg,^resize_inode"],
    "no_dir_index": ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "^dir_index"],
    "ext4-old": ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "^metadata_csum,^64bit,^flex_bg"],
    "gdt_csum": ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "^metadata_csum,uninit_bg"],
    "gdt_csum-32": ["-t", "ext4", "-b", "1024", "-I", "256", "-O",
                    "^metadata_csum,^64bit,uninit_bg"],
    "csum_seed": ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "metadata_csum_seed"],
    "hash-tea": ["-t", "ext4", "-b", "1024", "-I", "256"],
    "hash-legacy-unsigned": ["-t", "ext4", "-b", "1024", "-I", "256"],
    "hash-half_md4-unsigned": ["-t", "ext4", "-b", "1024", "-I", "256"],
}
"""Preset name -> ``mke2fs`` arguments (besides ``-q -F -d SRC IMG SIZE``)."""

# Presets whose directory hash is changed after mke2fs: (hash_alg, s_flags). e2fsck -D then
# rebuilds every htree with it. s_flags 1 = signed, 2 = unsigned directory hash.
_HASH_POST: dict[str, tuple[str, int]] = {
    "hash-tea": ("tea", 1),
    "hash-legacy-unsigned": ("legacy", 2),
    "hash-half_md4-unsigned": ("half_md4", 2),
}

SMALL_INODE_PRESETS = frozenset({"ext2-1k", "ext4-128inode"})
"""Presets with 128-byte inodes: no nanoseconds, timestamps are signed 32-bit seconds."""


def _run(cmd: list[str | bytes | Path], ok: Collection[int] = (0,)) -> str:
    res = subprocess.run(cmd, capture_output=True)
    if res.returncode not in ok:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} -> {res.returncode}: {res.stderr.decode(errors='replace')}"
        )
    return res.stdout.decode("utf-8", "surrogateescape")


def _tree_stats(src: Path) -> tuple[int, int]:
    """(bytes to reserve for data, inode count) for the tree under ``src``."""
    data = 0
    inodes = 16
    for dirpath, dirnames, filenames in os.walk(src):
        inodes += len(dirnames) + len(filenames)
        data += 64 * 1024 + 300 * (len(dirnames) + len(filenames))
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            # one 16 KiB bigalloc cluster per file at least, plus mapping/xattr blocks
            data += (st.st_blocks * 512 + 16383) // 16384 * 16384 + 8192
            data += st.st_size // 256  # ext2 indirect blocks of long (even sparse) files
    return data, inodes


def _ls_p(img: Path, ino: int) -> dict[bytes, int]:
    """Names -> inode numbers of directory ``ino`` in ``img``, via ``debugfs ls -p``."""
    res = subprocess.run(["debugfs", "-R", f"ls -p <{ino}>", str(img)], capture_output=True)
    out: dict[bytes, int] = {}
    # "/ino/mode/uid/gid/name/size/\n": names cannot hold '/', but can hold newlines
    for m in re.finditer(rb"/(\d+)/([0-7]+)/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/\n", res.stdout):
        if m.group(5) not in (b".", b".."):
            out[m.group(5)] = int(m.group(1))
    return out


def _extra_time(ns: int) -> tuple[int, int]:
    """(32-bit seconds as debugfs takes them, i_*time_extra) for a time in ns."""
    sec, nsec = divmod(ns, 10**9)
    lo = (sec + 2**31) % 2**32 - 2**31  # the signed 32-bit value the inode field holds
    epoch = ((sec - lo) >> 32) & 3
    return lo, (nsec << 2) | epoch


def _set_times(src: Path, img: Path, inode_size: int) -> None:
    """Copy atime and mtime (ns and epoch bits) of every source inode into the image, and the
    few attributes mke2fs -d gets wrong (root owner, i_size with inline_data)."""
    lines: list[str] = []
    stack: list[tuple[bytes, int]] = [(os.fsencode(src), 2)]
    while stack:
        path, ino = stack.pop()
        st = os.lstat(path)
        for field, ns in (("atime", st.st_atime_ns), ("mtime", st.st_mtime_ns)):
            lo, extra = _extra_time(ns)
            lines.append(f"sif <{ino}> {field} @{lo}")
            if inode_size > 128:
                lines.append(f"sif <{ino}> {field}_extra {extra}")
        if ino == 2:
            # mke2fs -d leaves the root directory owned by 0:0 whoever runs it
            lines += [f"sif <2> uid {st.st_uid}", f"sif <2> gid {st.st_gid}"]
        if stat.S_ISREG(st.st_mode):
            # mke2fs -d with inline_data drops a trailing hole from i_size (1.47.0)
            lines.append(f"sif <{ino}> size {st.st_size}")
        if stat.S_ISDIR(st.st_mode):
            listing = _ls_p(img, ino)
            for name in os.listdir(path):
                child = os.path.join(path, name)
                if name not in listing:
                    raise RuntimeError(f"{child!r} missing from {img}")
                stack.append((child, listing[name]))
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write("\n".join(lines) + "\n")
        script.flush()
        _run(["debugfs", "-w", "-f", script.name, img])


def _share_xattr_block(img: Path, first: str, second: str) -> None:
    """Make ``second`` use ``first``'s external xattr block (identical xattrs), as the
    kernel's mbcache would; mke2fs never shares. e2fsck then fixes h_refcount, its checksum
    and the freed block."""
    m = re.search(r"File ACL: (\d+)", _run(["debugfs", "-R", f"stat {first}", img]))
    if m is None or m.group(1) == "0":
        return
    _run(["debugfs", "-w", "-R", f"sif {second} file_acl {m.group(1)}", img])
    _run(["e2fsck", "-fy", img], ok=(0, 1))


def image_info(img: Path) -> dict[str, str]:
    """``dumpe2fs -h`` as a dict ("Inode size" -> "256", ...)."""
    info: dict[str, str] = {}
    for line in _run(["dumpe2fs", "-h", img]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def make_image(src: Path, img: Path, preset: str, size: str | None = None) -> Path:
    """Build ``img`` from the tree ``src`` with the ``PRESETS[preset]`` feature set.

    ``size`` is an mke2fs size ("64M"); by default it is computed from the tree. After
    ``mke2fs -d``: hash presets switch the directory hash, ``e2fsck -fyD`` builds htree indexes
    (dir_index presets), and atime/mtime of every inode are copied from the source with
    ns and post-2038 epoch bits. Needs no root. Returns ``img``.
    """
    args = PRESETS[preset]
    data, inodes = _tree_stats(src)
    blocks_kib = (data * 3 // 2) // 1024 + 16 * 1024
    if size is None:
        size = f"{blocks_kib}k"
    cmd: list[str | bytes | Path] = ["mke2fs", "-q", "-F", *args, "-N", str(inodes * 2 + 64)]
    cmd += ["-d", src, img, size]
    _run(cmd)
    if preset in _HASH_POST:
        alg, flags = _HASH_POST[preset]
        _run(["tune2fs", "-E", f"hash_alg={alg}", img])
        _run(["debugfs", "-w", "-R", f"ssv flags {flags}", img])
    if "^dir_index" not in " ".join(args):
        # exit 1 = "errors corrected" (here: directories optimized), which is the point
        _run(["e2fsck", "-fyD", img], ok=(0, 1))
    if (src / "xattr" / "shared1").exists() and (src / "xattr" / "shared2").exists():
        _share_xattr_block(img, "/xattr/shared1", "/xattr/shared2")
    _set_times(src, img, int(image_info(img)["Inode size"]))
    _run(["e2fsck", "-fn", img])
    return img


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------

ALL_FIELDS = frozenset(
    {
        "mode", "nlink", "dir_nlink", "uid", "gid", "size", "dir_size", "rdev", "blocks",
        "ino", "atime", "mtime", "ctime", "content", "link", "xattrs",
    }
)
"""Everything; for two views of the same image (kernel mount vs asyncfs)."""

SOURCE_FIELDS = frozenset(
    {"mode", "nlink", "uid", "gid", "size", "rdev", "atime", "mtime", "content", "link", "xattrs"}
)
"""What an image must preserve from its source tree. Not: ino, blocks (holes, zero blocks),
ctime, directory sizes and directory link counts (lost+found and the source fs differ)."""


def _s32_time(ns: int) -> int:
    sec = ns // 10**9
    return ((sec + 2**31) % 2**32 - 2**31) * 10**9


def _xattrs(path: bytes) -> list[tuple[str, bytes]] | str:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError as e:
        return f"error {e.errno}"


_CHUNK = 1 << 16


def _content(path: bytes) -> str:
    """SHA-256 over (offset, chunk) of every 64 KiB-aligned chunk that is not all zeros,
    plus the size: equal for equal bytes whatever the hole layout, and cheap on sparse files
    when the filesystem answers SEEK_DATA/SEEK_HOLE."""
    h = hashlib.sha256()
    zero = bytes(_CHUNK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        return f"error {e.errno}"
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                start, end = pos, size
            off = max(pos, start - start % _CHUNK)
            while off < end:
                chunk = os.pread(fd, _CHUNK, off)
                if not chunk:
                    break
                if chunk != zero[: len(chunk)]:
                    h.update(off.to_bytes(8, "little") + chunk)
                off += len(chunk)
            pos = max(off, end)
    except OSError as e:
        return f"error {e.errno}"
    finally:
        os.close(fd)
    return f"{size}:{h.hexdigest()}"


def compare_trees(
    a: Path,
    b: Path,
    *,
    check_atime: bool = False,
    fields: Collection[str] = ALL_FIELDS,
    small_inodes: bool = False,
    ignore: Collection[str] = (),
) -> list[str]:
    """Differences between the trees under ``a`` and ``b``, one human-readable line each.

    Walks both without following symlinks and compares, per path: the names in each
    directory, then the lstat fields named in ``fields`` (see :data:`ALL_FIELDS`;
    ``nlink``/``size`` apply to non-directories, ``dir_nlink``/``dir_size`` to directories),
    ``content`` (SHA-256 of regular files), ``link`` (readlink), ``xattrs`` (sorted names and
    values, not following symlinks). atime is compared only if ``check_atime`` and "atime" is
    in ``fields``. ``small_inodes``: compare times as a 128-byte inode stores them (signed
    32-bit seconds, no ns). ``ignore``: relative paths (str, '/'-separated) skipped with their
    subtrees. Directory mode bits are compared like any other. Returns [] when equal.
    """
    f = set(fields)
    if not check_atime:
        f.discard("atime")
    skip = {os.fsencode(p) for p in ignore}
    diffs: list[str] = []
    walk: DepthFirst[bytes] = DepthFirst(b"")
    ra, rb = os.fsencode(a), os.fsencode(b)
    for rel in walk:
        pa = os.path.join(ra, rel) if rel else ra
        pb = os.path.join(rb, rel) if rel else rb
        shown = rel.decode("utf-8", "backslashreplace") or "."
        try:
            sa, sb = os.lstat(pa), os.lstat(pb)
        except OSError as e:
            diffs.append(f"{shown}: lstat failed: {e}")
            continue

        def cmp(what: str, x: object, y: object, shown: str = shown) -> None:
            if x != y:
                diffs.append(f"{shown}: {what} {x!r} != {y!r}")

        isdir = stat.S_ISDIR(sa.st_mode)
        if "mode" in f:
            cmp("mode", oct(sa.st_mode), oct(sb.st_mode))
        elif stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            cmp("type", oct(stat.S_IFMT(sa.st_mode)), oct(stat.S_IFMT(sb.st_mode)))
        for name, attr, applies in (
            ("nlink", "st_nlink", not isdir),
            ("dir_nlink", "st_nlink", isdir),
            ("uid", "st_uid", True),
            ("gid", "st_gid", True),
            ("size", "st_size", not isdir),
            ("dir_size", "st_size", isdir),
            ("rdev", "st_rdev", True),
            ("blocks", "st_blocks", True),
            ("ino", "st_ino", True),
        ):
            if name in f and applies:
                cmp(name, getattr(sa, attr), getattr(sb, attr))
        for name in ("atime", "mtime", "ctime"):
            if name in f:
                ta, tb = getattr(sa, f"st_{name}_ns"), getattr(sb, f"st_{name}_ns")
                if small_inodes:
                    ta, tb = _s32_time(ta), _s32_time(tb)
                cmp(name + "_ns", ta, tb)
        if "xattrs" in f:
            cmp("xattrs", _xattrs(pa), _xattrs(pb))
        if stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode) and "link" in f:
            cmp("link", os.readlink(pa), os.readlink(pb))
        if stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode) and "content" in f:
            cmp("content", _content(pa), _content(pb))
        if isdir and stat.S_ISDIR(sb.st_mode):
            na = {e.name for e in os.scandir(pa)}
            nb = {e.name for e in os.scandir(pb)}
            for n in sorted(na - nb):
                diffs.append(f"{shown}: only in a: {n!r}")
            for n in sorted(nb - na):
                diffs.append(f"{shown}: only in b: {n!r}")
            children = (os.path.join(rel, n) if rel else n for n in sorted(na & nb, reverse=True))
            walk.push(c for c in children if c not in skip)
    return diffs


def compare_statfs(a: Path, b: Path) -> list[str]:
    """Differences between ``statvfs`` of two mounts (all numeric fields but f_fsid/f_flag)."""
    sa, sb = os.statvfs(a), os.statvfs(b)
    diffs = []
    for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                 "f_ffree", "f_favail", "f_namemax"):
        if getattr(sa, name) != getattr(sb, name):
            diffs.append(f"statfs {name}: {getattr(sa, name)} != {getattr(sb, name)}")
    return diffs
