"""The Volume against the kernel: every preset image, every entry, every field.

For each preset of tests/imagegen.py an image is built by ``mke2fs -d`` from a generated tree;
the whole tree is then walked through the Volume (over a pread-based DeviceReader) and compared
with the kernel's own loop mount of the same image (``ro,noload``): lstat fields including
st_ino, st_nlink, st_blocks, st_rdev and ns times, content, link targets, listings, xattrs, and
statfs. The Volume is also compared with the source tree for what an image preserves.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from asyncfs.engine import volume as volume_mod
from asyncfs.engine.dirops import Directories
from asyncfs.engine.volume import Volume
from asyncfs.ext4 import inode as inode_mod
from asyncfs.testing.imagegen import PRESETS, SMALL_INODE_PRESETS, make_image, make_tree
from tests.imagegen import kernel_mount, kernel_mount_unavailable
from tests.mutants import breaks
from tests.unit.volume_reader import PreadReader
from tests.unit.volume_walk import diff_snapshots, os_snapshot, volume_snapshot

pytestmark = pytest.mark.root

KERNEL_FIELDS = frozenset(
    {
        "mode", "nlink", "uid", "gid", "size", "rdev", "blocks", "ino", "atime", "mtime",
        "ctime", "blksize", "content", "link", "names", "order", "xattrs",
    }
)
SOURCE_FIELDS = frozenset(
    {"mode", "nlink", "uid", "gid", "size", "rdev", "mtime", "content", "link", "names", "xattrs"}
)


class Corpus:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.src = base / "src"
        make_tree(self.src, "small", seed=4)
        self.images: dict[str, Path] = {}

    def image(self, preset: str) -> Path:
        if preset not in self.images:
            self.images[preset] = make_image(self.src, self.base / f"{preset}.img", preset)
        return self.images[preset]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    why = kernel_mount_unavailable()
    if why is not None:
        pytest.skip(why)
    yield Corpus(tmp_path_factory.mktemp("ext4corpus"))


async def _open(img: Path) -> tuple[Volume, PreadReader]:
    reader = PreadReader(img)
    vol = await Volume.mount(reader, device_size=reader.size)
    return vol, reader


@pytest.mark.parametrize("preset", sorted(PRESETS))
async def test_volume_equals_kernel_mount(corpus: Corpus, preset: str) -> None:
    """Every entry, every field, as the kernel's own mount shows them (the broken
    code this catches is built in test_broken_variants_fail_the_comparisons)."""
    img = corpus.image(preset)
    vol, reader = await _open(img)
    try:
        snap = await volume_snapshot(vol)
        fs = vol.statfs()
    finally:
        reader.close()
    with kernel_mount(img) as mnt:
        ref = os_snapshot(mnt)
        st = os.statvfs(mnt)
    diffs = diff_snapshots(snap, ref, KERNEL_FIELDS)
    assert diffs == [], "\n".join(diffs[:40])
    got = (fs.bsize, fs.frsize, fs.blocks, fs.bfree, fs.bavail, fs.files, fs.ffree, fs.namemax)
    want = (st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
            st.f_ffree, st.f_namemax)
    assert got == want


@pytest.mark.parametrize("preset", ["ext2-1k", "ext4", "inline_data", "ext4-128inode"])
async def test_volume_equals_source_tree(corpus: Corpus, preset: str) -> None:
    """What the image preserves of the source tree (the broken code this
    catches is built in test_broken_variants_fail_the_comparisons)."""
    img = corpus.image(preset)
    vol, reader = await _open(img)
    try:
        snap = await volume_snapshot(vol)
    finally:
        reader.close()
    src = os_snapshot(corpus.src)
    fields = set(SOURCE_FIELDS)
    if preset in SMALL_INODE_PRESETS:
        # 128-byte inodes keep signed 32-bit seconds only: compare those
        for s in (snap, src):
            for rec in s.values():
                sec = rec["mtime"] // 10**9
                rec["mtime"] = ((sec + 2**31) % 2**32 - 2**31) * 10**9
    # lost+found and directory link counts differ between the source fs and the image
    diffs = [
        d
        for d in diff_snapshots(snap, src, fields, skip_dirs={"nlink", "size"})
        if not d.startswith("b'lost+found'")
    ]
    assert diffs == [], "\n".join(diffs[:40])


Comparison = Callable[[Corpus, str], Awaitable[None]]

# variant -> (comparison that must fail, preset, field named in the failure, mutant)
_BROKEN: dict[str, tuple[Comparison, str, str, tuple[object, str, str, str]]] = {
    # i_uid without l_i_uid_high (16-bit owners): owners/ differs
    "uid-16bit": (test_volume_equals_kernel_mount, "ext4", "uid", (
        volume_mod, "parse_inode", "i_uid=uid_lo | (uid_hi << 16),", "i_uid=uid_lo,")),
    # st_blocks without the inline-data sectors: inline_data files differ
    "inline-blocks": (test_volume_equals_kernel_mount, "inline_data", "blocks", (
        volume_mod, "inode_attr", "blocks += (inode.i_size + 511) >> 9", "pass")),
    # readdir in disk order instead of ext4_dx_readdir's hash order
    "disk-order": (test_volume_equals_kernel_mount, "ext4", "order", (
        Directories, "_hash_listing", "if not self._is_dx_dir(inode, info):", "if True:")),
    # the epoch bits of i_mtime_extra ignored: times/y2100 and y2286 show 1964/2017
    "no-epoch": (test_volume_equals_source_tree, "ext4", "mtime", (
        inode_mod, "decode_time_ns", "if extra & _EPOCH_MASK:", "if False:")),
    # new-style rdev decoded as old: special/ differs
    "old-rdev": (test_volume_equals_source_tree, "ext4", "rdev", (
        inode_mod, "inode_rdev",
        "return _makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))",
        "return _makedev((new >> 8) & 0xFF, new & 0xFF)")),
}


@pytest.mark.parametrize("variant", sorted(_BROKEN))
async def test_broken_variants_fail_the_comparisons(
    corpus: Corpus, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each broken variant of the decoder or the volume makes the comparison that guards it
    fail, naming the field it gets wrong."""
    compare, preset, field, (owner, name, old, new) = _BROKEN[variant]
    breaks(variant, monkeypatch, owner, name, old, new)
    with pytest.raises(AssertionError, match=f": {field} "):
        await compare(corpus, preset)
