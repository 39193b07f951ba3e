"""The Volume against the kernel: every preset image, every entry, every field.

For each preset of tests/imagegen.py an image is built by ``mke2fs -d`` from a generated tree;
the whole tree is then walked through the Volume (over a pread-based DeviceReader) and compared
with the kernel's own loop mount of the same image (``ro,noload``): lstat fields including
st_ino, st_nlink, st_blocks, st_rdev and ns times, content, link targets, listings, xattrs, and
statfs. The Volume is also compared with the source tree for what an image preserves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.engine.volume import Volume
from tests.imagegen import (
    PRESETS,
    SMALL_INODE_PRESETS,
    kernel_mount,
    kernel_mount_unavailable,
    make_image,
    make_tree,
)
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
    vol = await Volume.open(reader, device_size=reader.size)
    return vol, reader


@pytest.mark.parametrize("preset", sorted(PRESETS))
async def test_volume_equals_kernel_mount(corpus: Corpus, preset: str) -> None:
    """Broken variant: decoding i_uid without l_i_uid_high (16-bit owners) -> owners/ differs;
    ignoring i_size_high -> sparse/far (past 4 GiB) differs; st_blocks without the inline-data
    sectors -> inline_data files differ; readdir in disk order instead of ext4_dx_readdir's hash
    order (or sorting without the collision-chain rule) -> "order" differs on every dir_index
    preset. Each fails this."""
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
    """Broken variant: ignoring the epoch bits of i_mtime_extra -> times/y2100 and y2286 show
    1964/2017 mtimes and this fails; decoding new-style rdev as old -> special/ fails."""
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
