"""Volume operations on small real images (mke2fs -d): readdir cookies, htree lookups, errors,
checksums (EIO per object, -o nocsum), feature refusal, journal-needs-recovery, mapping."""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from asyncfs.engine import dirops
from asyncfs.engine import volume as volume_mod
from asyncfs.engine.dirops import Directories
from asyncfs.engine.volume import Volume
from asyncfs.engine.xattrs import Xattrs
from asyncfs.errors import (
    ChecksumError,
    ImageError,
    InvalidError,
    IsADirError,
    NoAttrError,
    NoEntryError,
    NotADirError,
    UnsupportedFeatureError,
)
from asyncfs.ext4 import features
from asyncfs.testing.imagegen import make_image
from tests.mutants import breaks
from tests.unit.volume_reader import PreadReader
from tests.unit.volume_walk import fails_unless_kernel, listing, read_all

BIGDIR = 600


def _tree(root: Path) -> None:
    root.mkdir()
    big = root / "bigdir"
    big.mkdir()
    for i in range(BIGDIR):
        # bytes >= 0x80 make the signed and unsigned hash variants differ
        tail = ("é" if i % 2 else "x") * (i % 40)
        (big / (f"entry-{i:04d}-" + tail)).write_bytes(b"")
    (root / "file").write_bytes(bytes(range(256)) * 64)
    (root / "contig").write_bytes(os.urandom(3 << 20))
    with open(root / "frag", "wb") as f:
        for i in range(400):
            f.seek(i * 8192)
            f.write(os.urandom(4096))
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"inner\n")
    os.symlink("file", root / "link")
    (root / "xa").write_bytes(b"x")
    os.setxattr(root / "xa", "user.big", b"v" * 700)
    os.setxattr(root / "xa", "user.small", b"s")
    (root / "small").mkdir()
    for n in ("a", "bb", "ccc"):
        (root / "small" / n).write_bytes(n.encode())


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("opsrc") / "src"
    _tree(root)
    return root


_IMAGES: dict[tuple[str, str], Path] = {}


def image(src: Path, tmp: Path, preset: str) -> Path:
    key = (str(src), preset)
    if key not in _IMAGES:
        _IMAGES[key] = make_image(src, tmp / f"{preset}.img", preset)
    return _IMAGES[key]


@pytest.fixture(scope="module")
def imgdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("opimg")


async def _vol(img: Path, **kw: bool) -> tuple[Volume, PreadReader]:
    r = PreadReader(img)
    return await Volume.mount(r, device_size=r.size, **kw), r


def _debugfs(img: Path, cmd: str, write: bool = False) -> str:
    args = ["debugfs", *(["-w"] if write else []), "-R", cmd, str(img)]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _inode_offset(img: Path, path: str, block_size: int) -> int:
    out = _debugfs(img, f"imap {path}")
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out)
    assert m, out
    return int(m.group(1)) * block_size + int(m.group(2), 16)


def _first_block(img: Path, path: str) -> int:
    return int(_debugfs(img, f"bmap {path} 0").split()[0])


def _flip(img: Path, off: int) -> None:
    with open(img, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["ext4-1k", "ext2-1k", "no_dir_index"])
async def test_readdir_in_pieces_never_repeats_or_skips(
    src: Path, imgdir: Path, preset: str
) -> None:
    """Resuming from every entry's next_off yields exactly the rest of the listing (the
    broken cookie of a linear directory: test_readdir_cookie_points_past_its_entry)."""
    vol, r = await _vol(image(src, imgdir, preset))
    try:
        big = (await vol.lookup(vol.root_ino, b"bigdir")).ino
        full = await listing(vol, big)
        names = [n for n, _, _ in full]
        assert sorted(names) == sorted([b".", b"..", *os.listdir(os.fsencode(src / "bigdir"))])
        assert len(names) == len(set(names))
        # one entry at a time, resuming from each cookie
        one_by_one: list[bytes] = []
        off = 0
        while True:
            batch = await vol.readdir(big, off)
            if not batch:
                break
            one_by_one.append(batch[0].name)
            off = batch[0].next_off
        assert one_by_one == names
        # resuming from any cookie gives the suffix
        off = 0
        offs = []
        for _ in range(len(names)):
            e = (await vol.readdir(big, off))[0]
            offs.append(e.next_off)
            off = e.next_off
        assert offs == sorted(offs) and len(set(offs)) == len(offs)
    finally:
        r.close()


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_readdir_cookie_points_past_its_entry(
    src: Path, imgdir: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming a linear directory's listing from an entry's cookie starts after the entry.

    Broken variant: next_off = the entry's own offset (not + rec_len) -> resuming repeats the
    entry and this fails."""
    breaks(variant, monkeypatch, Directories, "readdir",
           "nxt = lblk * bs + e.offset + e.rec_len", "nxt = lblk * bs + e.offset")
    vol, r = await _vol(image(src, imgdir, "no_dir_index"))
    try:
        big = (await vol.lookup(vol.root_ino, b"bigdir")).ino
        want = sorted([b".", b"..", *os.listdir(os.fsencode(src / "bigdir"))])
        one_by_one: list[bytes] = []
        off = 0
        for _ in range(len(want) + 1):  # bounded: the broken cookie never gets past one entry
            batch = await vol.readdir(big, off)
            if not batch:
                break
            one_by_one.append(batch[0].name)
            off = batch[0].next_off
        assert (sorted(one_by_one) == want) == (variant == "kernel")
    finally:
        r.close()


_HTREE_CASES = [
    *((p, "kernel") for p in ("ext4-1k", "hash-tea", "hash-legacy-unsigned",
                               "hash-half_md4-unsigned")),
    ("hash-legacy-unsigned", "signed-hash"),
]


@pytest.mark.parametrize(("preset", "variant"), _HTREE_CASES)
async def test_htree_lookup_uses_index(
    src: Path, imgdir: Path, preset: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every name is found through the hash index reading few blocks.

    Broken variant "signed-hash": ignoring s_hash_unsigned (always the signed hash) -> on
    unsigned volumes names with bytes >= 0x80 hash differently, the dx probe lands in the
    wrong leaf, and a dx miss is final (as in the kernel), so NoEntryError fails this. (A
    linear search would pass the read bound too: the listing has parsed every block into the
    volume's cache, and the linear name table reads none again.)"""
    breaks(variant, monkeypatch, dirops, "dx_lookup", "version += sb.hash_unsigned", "pass")
    vol, r = await _vol(image(src, imgdir, preset))
    try:
        with fails_unless_kernel(variant):
            big = (await vol.lookup(vol.root_ino, b"bigdir")).ino
            inode = await vol.inode(big)
            assert vol.dirs.is_dx(inode), "the test directory must be indexed"
            assert inode.i_size // vol.block_size > 8
            names = [n for n, _, _ in await listing(vol, big) if n not in (b".", b"..")]
            worst = 0
            for name in names:
                before = r.dev_reads
                attr = await vol.lookup(big, name)
                worst = max(worst, r.dev_reads - before)
                assert attr.ino > 0
            assert worst <= 4
            with pytest.raises(NoEntryError):
                await vol.lookup(big, b"entry-9999-absent")
    finally:
        r.close()


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_errors_for_wrong_kinds(
    src: Path, imgdir: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: lookup not checking the parent's type -> a file is parsed as a
    directory (garbage or CorruptionError) instead of NotADirError."""
    breaks(variant, monkeypatch, Directories, "_dir_inode", "if not inode.is_dir:", "if False:")
    vol, r = await _vol(image(src, imgdir, "ext4"))
    try:
        with fails_unless_kernel(variant):
            root = vol.root_ino
            f = (await vol.lookup(root, b"file")).ino
            d = (await vol.lookup(root, b"sub")).ino
            with pytest.raises(NotADirError):
                await vol.lookup(f, b"x")
            with pytest.raises(NotADirError):
                await vol.readdir(f, 0)
            with pytest.raises(NoEntryError):
                await vol.lookup(root, b"missing")
            with pytest.raises(InvalidError):
                await vol.readlink(f)
            with pytest.raises(IsADirError):
                await vol.open(d)
            with pytest.raises(NoAttrError):
                await vol.getxattr(f, b"user.nope")
            with pytest.raises(NoEntryError):
                await vol.getattr(0)
            with pytest.raises(NoEntryError):
                await vol.getattr(10**9)
            assert await vol.readlink((await vol.lookup(root, b"link")).ino) == b"file"
            assert (await vol.lookup(root, b".")).ino == root
            assert (await vol.lookup(d, b"..")).ino == root
            xa = (await vol.lookup(root, b"xa")).ino
            assert sorted(await vol.listxattr(xa)) == [b"user.big", b"user.small"]
            assert await vol.getxattr(xa, b"user.big") == b"v" * 700
    finally:
        r.close()


async def test_map_contiguous_is_one_run(src: Path, imgdir: Path) -> None:
    """A file in one extent maps to one Run, from any offset; a fragmented file maps to data
    and hole Runs in turn and reads back as written. (Merging adjacent Runs, ``_append``,
    makes no difference here: each piece is one extent or one gap.)"""
    vol, r = await _vol(image(src, imgdir, "ext4"))
    try:
        ino = (await vol.lookup(vol.root_ino, b"contig")).ino
        fmap = await vol.file_map(ino)
        runs = await fmap.map(0, 3 << 20)
        assert len(runs) == 1 and runs[0].dev_off is not None and runs[0].length == 3 << 20
        runs = await fmap.map(5000, 128 * 1024)
        assert len(runs) == 1 and runs[0].file_off == 5000
        frag = await vol.file_map((await vol.lookup(vol.root_ino, b"frag")).ino)
        pieces = await frag.map(0, 65536)
        assert [(p.dev_off is None) for p in pieces] == [False, True] * 8
        assert sum(p.length for p in pieces) == 65536
        data = await read_all(vol, (await vol.lookup(vol.root_ino, b"frag")).ino, frag.size)
        assert data == (src / "frag").read_bytes()
    finally:
        r.close()


async def test_per_call_overhead(src: Path, imgdir: Path) -> None:
    """getattr on a cached inode and map() of a 128 KiB extent range stay in microseconds."""
    vol, r = await _vol(image(src, imgdir, "ext4"))
    try:
        ino = (await vol.lookup(vol.root_ino, b"contig")).ino
        fmap = await vol.file_map(ino)
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            await vol.getattr(ino)
        getattr_us = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        for i in range(n):
            await fmap.map((i * 131072) % (3 << 20), 131072)
        map_us = (time.perf_counter() - t) / n * 1e6
        print(f"getattr {getattr_us:.1f} us, map(128 KiB) {map_us:.1f} us")
        assert getattr_us < 100 and map_us < 100
    finally:
        r.close()


# ------------------------------------------------------------------------------------------
# checksums


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_inode_checksum_mismatch_is_eio_for_that_inode(
    src: Path, imgdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broken variant: _verify_inode a no-op -> the damaged inode is served and this fails."""
    breaks(variant, monkeypatch, Volume, "_verify_inode",
           "if not self.verify_csum or self.sb.s_creator_os != EXT4_OS_LINUX:", "if True:")
    img = tmp_path / "c.img"
    img.write_bytes(image(src, imgdir, "ext4").read_bytes())
    _flip(img, _inode_offset(img, "/sub/inner", 4096) + 0x10)  # i_mtime
    vol, r = await _vol(img)
    try:
        with fails_unless_kernel(variant):
            sub = (await vol.lookup(vol.root_ino, b"sub")).ino
            with caplog.at_level(logging.ERROR, logger="asyncfs.ext4"), pytest.raises(
                ChecksumError
            ):
                await vol.lookup(sub, b"inner")
            assert any("checksum" in m for m in caplog.messages)
            assert (await vol.lookup(vol.root_ino, b"file")).size == 256 * 64  # others fine
    finally:
        r.close()
    vol, r = await _vol(img, verify_csum=False)
    try:
        sub = (await vol.lookup(vol.root_ino, b"sub")).ino
        assert (await vol.lookup(sub, b"inner")).size == 6
    finally:
        r.close()


_UNCHECKED = {
    "no-dir-csum": (Directories, "_leaf_entries", "if self._vol.verify_csum and not csum."),
    "no-extent-csum": (Volume, "extent_block", "if self.verify_csum and not csum."),
    "no-xattr-csum": (Xattrs, "entries", "if vol.verify_csum and not csum."),
}


@pytest.mark.parametrize("variant", ["kernel", *_UNCHECKED])
async def test_dir_extent_xattr_block_checksums(
    src: Path, imgdir: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variants: skipping verify_dir_block / verify_extent_block / verify_xattr_block
    -> the damaged block is served and the matching raises-check fails."""
    if variant != "kernel":
        owner, name, check = _UNCHECKED[variant]
        breaks(variant, monkeypatch, owner, name, check, "if False and not csum.")
    img = tmp_path / "c.img"
    img.write_bytes(image(src, imgdir, "ext4").read_bytes())
    bs = 4096
    _flip(img, _first_block(img, "/small") * bs + 20)  # inside an entry name
    _flip(img, int(_debugfs(img, "stat /xa").split("File ACL: ")[1].split()[0]) * bs + bs - 100)
    m = re.search(r"\(ETB0\):(\d+)", _debugfs(img, "ex /frag") + _debugfs(img, "stat /frag"))
    assert m, "frag must have an extent index block"
    _flip(img, int(m.group(1)) * bs + 20)
    vol, r = await _vol(img)
    try:
        with fails_unless_kernel(variant):
            small = (await vol.lookup(vol.root_ino, b"small")).ino
            with pytest.raises(ChecksumError):
                await vol.lookup(small, b"a")
            # a one-block directory is a dx dir to readdir (is_dx_dir), and htree_dirblock_to_tree
            # fails the whole listing on a bad block (the linear path would skip it)
            with pytest.raises(ChecksumError):
                await vol.readdir(small, 0)
            xa = (await vol.lookup(vol.root_ino, b"xa")).ino
            with pytest.raises(ChecksumError):
                await vol.listxattr(xa)
            fr = (await vol.lookup(vol.root_ino, b"frag")).ino
            with pytest.raises(ChecksumError):
                await read_all(vol, fr, 400 * 8192)
    finally:
        r.close()
    vol, r = await _vol(img, verify_csum=False)
    try:
        xa = (await vol.lookup(vol.root_ino, b"xa")).ino
        await vol.listxattr(xa)
    finally:
        r.close()


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_superblock_checksum(
    src: Path, imgdir: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: not verifying s_checksum -> the damaged superblock mounts."""
    breaks(variant, monkeypatch, Volume, "_init_csum",
           "if self.verify_csum and not csum.verify_superblock(raw_sb):", "if False:")
    img = tmp_path / "c.img"
    img.write_bytes(image(src, imgdir, "ext4").read_bytes())
    _flip(img, 1024 + 0x78)  # s_volume_name
    with fails_unless_kernel(variant), pytest.raises(ImageError, match="checksum"):
        _, mounted = await _vol(img)
        mounted.close()
    vol, r = await _vol(img, verify_csum=False)
    r.close()
    assert vol.describe()["verify_csum"] is False


# ------------------------------------------------------------------------------------------
# refusal and warnings


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_unsupported_feature_refused(
    src: Path, imgdir: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: accepting every incompat bit -> the compression image mounts."""
    if variant != "kernel":
        monkeypatch.setattr(features, "INCOMPAT_SUPPORTED", ~0)
    img = tmp_path / "c.img"
    img.write_bytes(image(src, imgdir, "ext2-1k").read_bytes())
    with open(img, "r+b") as f:
        f.seek(1024 + 0x60)
        inc = struct.unpack("<I", f.read(4))[0]
        f.seek(1024 + 0x60)
        f.write(struct.pack("<I", inc | 0x1))
    with fails_unless_kernel(variant), pytest.raises(UnsupportedFeatureError, match="compression"):
        _, mounted = await _vol(img)
        mounted.close()


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_not_ext_and_truncated(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: no device-size check -> a truncated image mounts and reads fail later."""
    breaks(variant, monkeypatch, Volume, "mount",
           "if sb.s_blocks_count * sb.block_size > device_size:", "if False:")
    z = tmp_path / "zero.img"
    z.write_bytes(bytes(1 << 20))
    with pytest.raises(ImageError, match="not an ext"):
        await _vol(z)
    t = tmp_path / "trunc.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(t), "8M"], check=True)
    os.truncate(t, 4 << 20)
    with fails_unless_kernel(variant), pytest.raises(ImageError, match="holds only"):
        _, mounted = await _vol(t)
        mounted.close()


@pytest.mark.parametrize("variant", ["kernel", "recovery-refused", "no-warning"])
async def test_journal_needs_recovery_warns(
    src: Path, imgdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broken variants: treating needs_recovery as unsupported -> open raises and this fails;
    no warning -> the caplog check fails."""
    if variant == "recovery-refused":
        monkeypatch.setattr(features, "INCOMPAT_SUPPORTED",
                            features.INCOMPAT_SUPPORTED & ~features.INCOMPAT_RECOVER)
    elif variant == "no-warning":
        breaks(variant, monkeypatch, Volume, "mount", "if sb.needs_recovery:", "if False:")
    img = tmp_path / "j.img"
    img.write_bytes(image(src, imgdir, "ext3").read_bytes())
    _debugfs(img, "feature needs_recovery", write=True)
    before = img.read_bytes()
    with fails_unless_kernel(variant):
        with caplog.at_level(logging.WARNING, logger="asyncfs.ext4"):
            vol, r = await _vol(img)
        try:
            assert vol.describe()["needs_recovery"] is True
            assert any("recovery" in m for m in caplog.messages)
            assert (await vol.lookup(vol.root_ino, b"file")).size == 256 * 64
        finally:
            r.close()
    assert img.read_bytes() == before  # never written


@pytest.mark.parametrize(("fs_type", "bs", "variant"), [
    ("ext4", 8192, "kernel"), ("ext4", 65536, "kernel"), ("ext2", 65536, "kernel"),
    ("ext4", 8192, "broken"),
])
async def test_large_block_sizes_match_source(
    src: Path, tmp_path: Path, fs_type: str, bs: int, variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Block sizes above the page size (the kernel here cannot mount them): the Volume still
    shows the source tree. Broken variant: capping s_log_block_size at 2 (4 KiB, the page
    size) -> these images are refused and this fails. (The 64 KiB rec_len encoding has its
    own test in test_ext4_decoders.py.)"""
    breaks(variant, monkeypatch, volume_mod, "parse_superblock", "if log_bs > 6:",
           "if log_bs > 2:")
    from tests.unit.volume_walk import diff_snapshots, os_snapshot, volume_snapshot

    img = tmp_path / "big.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", fs_type, "-b", str(bs), "-d", str(src), str(img),
                    "128M"], check=True, capture_output=True)
    with fails_unless_kernel(variant):
        vol, r = await _vol(img)
        try:
            assert vol.block_size == bs
            snap = await volume_snapshot(vol)
        finally:
            r.close()
        ref = os_snapshot(src)
        for rec in [*snap.values(), *ref.values()]:
            rec["mtime"] //= 10**9  # mke2fs -d copies whole seconds
        fields = {"mode", "size", "content", "link", "names", "mtime"}
        diffs = [d for d in diff_snapshots(snap, ref, fields, skip_dirs={"size"})
                 if not d.startswith("b''") and "lost+found" not in d]
        assert diffs == [], "\n".join(diffs[:20])


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_inline_dir_cookies_and_lookup(
    src: Path, imgdir: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline_data directory: synthesized "." and "..", stable cookies, lookups, and
    inline file content. Broken variant: parsing the inline area from byte 0 (the parent
    inode taken as a record) -> the records are rejected and the listing is empty."""
    breaks(variant, monkeypatch, Directories, "_inline_dirents",
           "INLINE_DOTDOT_SIZE, min(I_BLOCK_SIZE", "0, min(I_BLOCK_SIZE")
    vol, r = await _vol(image(src, imgdir, "inline_data"))
    try:
        with fails_unless_kernel(variant):
            small = (await vol.lookup(vol.root_ino, b"small")).ino
            info = await vol.inode_info(await vol.inode(small))
            assert info.inline is not None, "small/ must be an inline directory"
            full = await vol.readdir(small, 0)
            # hash order, as the kernel lists inline directories (checked in the corpus test)
            assert sorted(e.name for e in full) == [b".", b"..", b"a", b"bb", b"ccc"]
            assert {e.name: e.ino for e in full}[b".."] == vol.root_ino
            for i, e in enumerate(full):
                assert [x.name for x in await vol.readdir(small, e.next_off)] == [
                    x.name for x in full[i + 1 :]]
            a = await vol.lookup(small, b"bb")
            assert a.size == 2 and a.blocks == 1  # the kernel counts the inline sector
            assert await read_all(vol, a.ino, a.size) == b"bb"
    finally:
        r.close()


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_htree_leaf_with_one_block_spanning_entry(
    src: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without metadata_csum, a leaf left with one entry has rec_len == block size, like a dx
    node's fake record. Broken variant: classifying blocks by rec_len alone (the kernel's
    checksum rule) -> that entry is dropped from readdir and this fails."""
    breaks(variant, monkeypatch, Directories, "_leaf_entries",
           'lblk == 0 or int.from_bytes(raw[0:4], "little") == 0', "True")
    img = tmp_path / "one.img"
    make_image(src, img, "ext4-old")
    vol, r = await _vol(img)
    try:
        big = (await vol.lookup(vol.root_ino, b"bigdir")).ino
        inode = await vol.inode(big)
        assert vol.dirs.is_dx(inode)
        leaf = await vol.dirs.block_entries(inode, await vol.file_map(big), 1)
        assert leaf is not None
        names = [e.name for e in leaf if e.inode]
    finally:
        r.close()
    keep, drop = names[0], names[1:]
    script = tmp_path / "unlink.debugfs"
    script.write_bytes(b"".join(b"unlink /bigdir/" + n + b"\n" for n in drop))
    subprocess.run(["debugfs", "-w", "-f", str(script), str(img)], check=True,
                   capture_output=True)
    vol, r = await _vol(img)
    try:
        with fails_unless_kernel(variant):
            big = (await vol.lookup(vol.root_ino, b"bigdir")).ino
            raw = await vol.dirs.dir_block_raw(await vol.inode(big), 1)
            assert raw is not None and int.from_bytes(raw[4:6], "little") == vol.block_size
            listed = {n for n, _, _ in await listing(vol, big)}
            assert keep in listed and not (set(drop) & listed)
            assert (await vol.lookup(big, keep)).ino > 0
    finally:
        r.close()
