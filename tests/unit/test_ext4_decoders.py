"""The pure ext4 decoders: known answers on real and hand-built structures, and Hypothesis
fuzzing that arbitrary bytes only ever raise the project's own error types."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncfs.errors import AsyncfsError, CorruptionError, ImageError, UnsupportedFeatureError
from asyncfs.ext4 import blockmap, dirent, extents, group, htree, superblock
from asyncfs.ext4 import features as F
from asyncfs.ext4 import inode as inode_mod
from asyncfs.ext4.blockmap import indirect_path, max_indirect_blocks, parse_pointer_block
from asyncfs.ext4.dirent import parse_dirents, rec_len_from_disk
from asyncfs.ext4.extents import (
    EXT4_EXT_MAGIC,
    find_extent,
    find_index,
    parse_extent_node,
)
from asyncfs.ext4.group import bg_has_super, bg_num_gdb, descriptor_block, parse_group_desc
from asyncfs.ext4.htree import dx_search, parse_dx_node, parse_dx_root
from asyncfs.ext4.inode import decode_time_ns, inode_attr, inode_rdev, parse_inode
from asyncfs.ext4.superblock import Superblock, parse_superblock
from tests.mutants import breaks
from tests.unit.volume_walk import fails_unless_kernel

VARIANTS = ["kernel", "broken"]


def _broken(variant: str, monkeypatch: pytest.MonkeyPatch, module: object, name: str,
            old: str, new: str) -> None:
    """The broken variant of ``module.name`` (see mutants.breaks), also under the name this
    test module imported it by."""
    breaks(variant, monkeypatch, module, name, old, new)
    if variant != "kernel" and name in globals():
        monkeypatch.setitem(globals(), name, getattr(module, name))


def _mkfs(tmp: Path, *args: str, size: str = "4M") -> bytes:
    img = tmp / "sb.img"
    subprocess.run(["mke2fs", "-q", "-F", *args, str(img), size], check=True,
                   capture_output=True)
    with open(img, "rb") as f:
        f.seek(1024)
        return f.read(1024)


@pytest.fixture(scope="module")
def sb_raw(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _mkfs(tmp_path_factory.mktemp("sb"), "-t", "ext4", "-b", "1024")


@pytest.fixture(scope="module")
def sb(sb_raw: bytes) -> Superblock:
    return parse_superblock(sb_raw)


# ------------------------------------------------------------------------------------------
# superblock and features


@pytest.mark.parametrize("variant", VARIANTS)
def test_superblock_geometry(sb_raw: bytes, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: block size as 1024 << (s_log_block_size + 1) -> 2048 and this fails."""
    _broken(variant, monkeypatch, superblock, "parse_superblock", "block_size = 1024 << log_bs",
            "block_size = 1024 << (log_bs + 1)")
    with fails_unless_kernel(variant):
        sb = parse_superblock(sb_raw)
        assert sb.block_size == 1024
        assert sb.s_first_data_block == 1
        assert sb.s_blocks_count == 4096
        assert sb.desc_size == 64
        assert sb.groups_count == 1
        assert sb.has_metadata_csum
        assert "metadata_csum" in sb.feature_names()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_magic_is_image_error(
    sb_raw: bytes, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: no magic check -> zeros are not refused as "not an ext2/ext3/ext4" (a
    later geometry check trips instead) and this fails."""
    _broken(variant, monkeypatch, superblock, "parse_superblock",
            "if _u16(b, 0x38) != EXT4_SUPER_MAGIC:", "if False:")
    with fails_unless_kernel(variant), pytest.raises(ImageError, match="not an ext2/ext3/ext4"):
        parse_superblock(bytes(1024))
    with pytest.raises(ImageError):
        parse_superblock(sb_raw[:100])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("bit", "name"),
    [(F.INCOMPAT_COMPRESSION, "compression"), (F.INCOMPAT_DIRDATA, "dirdata"),
     (F.INCOMPAT_JOURNAL_DEV, "journal_dev"), (0x800000, "FEATURE_0x800000")],
)
def test_unsupported_incompat_named(
    sb_raw: bytes, bit: int, name: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: INCOMPAT_SUPPORTED = ~0 (accept all) -> nothing raises and this fails."""
    if variant != "kernel":
        monkeypatch.setattr(F, "INCOMPAT_SUPPORTED", ~0)
    raw = bytearray(sb_raw)
    incompat = struct.unpack_from("<I", raw, 0x60)[0] | bit
    struct.pack_into("<I", raw, 0x60, incompat)
    with fails_unless_kernel(variant):
        with pytest.raises(UnsupportedFeatureError) as ei:
            parse_superblock(bytes(raw))
        assert name in str(ei.value)
        assert "\n" not in str(ei.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unknown_ro_compat_is_fine(
    sb_raw: bytes, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: check_features also rejecting unknown ro_compat bits -> this fails."""
    _broken(variant, monkeypatch, F, "check_features", "del compat, ro_compat",
            "incompat |= ro_compat & ~0x1FFFF; del compat")
    raw = bytearray(sb_raw)
    ro = struct.unpack_from("<I", raw, 0x64)[0] | 0x40000000
    struct.pack_into("<I", raw, 0x64, ro)
    with fails_unless_kernel(variant):
        assert parse_superblock(bytes(raw)).has_ro_compat(0x40000000)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sparse_super_backups(
    sb: Superblock, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: _test_root returning True for any odd group -> group 11 differs."""
    _broken(variant, monkeypatch, group, "_test_root", "while True:",
            "return a % 2 == 1\n    while True:")
    groups = [g for g in range(100) if bg_has_super(sb, g)]
    with fails_unless_kernel(variant):
        assert groups == [0, 1, 3, 5, 7, 9, 25, 27, 49, 81]


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_bg_descriptor_location(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: descriptor_block ignoring meta_bg -> meta group 1's block is wrong."""
    _broken(variant, monkeypatch, group, "descriptor_block",
            "if not sb.has_incompat(F.INCOMPAT_META_BG) or nr < sb.s_first_meta_bg:", "if True:")
    raw = _mkfs(tmp_path, "-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode",
                size="40M")
    sb = parse_superblock(raw)
    assert sb.has_incompat(F.INCOMPAT_META_BG)
    per = sb.desc_per_block
    assert descriptor_block(sb, 0) == 2  # 1 KiB blocks: after the superblock in block 1
    # meta group 1 starts at group `per`, which has a backup superblock only if sparse says so
    first = per * sb.s_blocks_per_group + sb.s_first_data_block
    with fails_unless_kernel(variant):
        assert descriptor_block(sb, 1) == first + (1 if bg_has_super(sb, per) else 0)
    assert bg_num_gdb(sb, per) == 1 and bg_num_gdb(sb, per + 2) == 0


# ------------------------------------------------------------------------------------------
# inodes


def _raw_inode(size: int = 256, **fields: int) -> bytearray:
    b = bytearray(size)
    struct.pack_into("<H", b, 0x0, fields.get("mode", 0o100644))
    struct.pack_into("<H", b, 0x2, fields.get("uid", 0) & 0xFFFF)
    struct.pack_into("<H", b, 0x78, fields.get("uid", 0) >> 16)
    struct.pack_into("<I", b, 0x4, fields.get("size", 0))
    struct.pack_into("<I", b, 0x10, fields.get("mtime", 0) & 0xFFFFFFFF)
    struct.pack_into("<I", b, 0x1C, fields.get("blocks", 0))
    struct.pack_into("<H", b, 0x74, fields.get("blocks_hi", 0))
    struct.pack_into("<I", b, 0x20, fields.get("flags", 0))
    struct.pack_into("<I", b, 0x28, fields.get("block0", 0))
    struct.pack_into("<I", b, 0x2C, fields.get("block1", 0))
    if size > 128:
        struct.pack_into("<H", b, 0x80, 32)
        struct.pack_into("<I", b, 0x88, fields.get("mtime_extra", 0))
    return b


@pytest.mark.parametrize("variant", VARIANTS)
def test_time_extra_epoch_and_ns(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: ignoring the epoch bits -> year 2100 reads as 1964 and this fails."""
    _broken(variant, monkeypatch, inode_mod, "decode_time_ns", "if extra & _EPOCH_MASK:",
            "if False:")
    # 2100-01-01: seconds 4102444800 = 0xF4865700 -> stored as signed -192522496 + epoch 1
    sec = 4_102_444_800
    lo = (sec + 2**31) % 2**32 - 2**31
    epoch = (sec - lo) >> 32
    with fails_unless_kernel(variant):
        assert decode_time_ns(lo, (123 << 2) | epoch) == sec * 10**9 + 123
    assert decode_time_ns(-1, None) == -(10**9)  # before 1970, 128-byte inode


@pytest.mark.parametrize("variant", VARIANTS)
def test_uid32_huge_file_and_time(
    sb: Superblock, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: dropping l_i_uid_high -> uid 2**31+5 reads as 5 and this fails."""
    _broken(variant, monkeypatch, inode_mod, "parse_inode", "i_uid=uid_lo | (uid_hi << 16),",
            "i_uid=uid_lo,")
    raw = _raw_inode(uid=2**31 + 5, blocks=8, blocks_hi=1, mtime=-5, mtime_extra=(7 << 2))
    inode = parse_inode(bytes(raw), 12, sb)
    with fails_unless_kernel(variant):
        assert inode.i_uid == 2**31 + 5
    if variant != "kernel":
        return
    assert inode.i_blocks == (1 << 32) | 8  # huge_file: 48-bit count in 512-byte units
    assert inode.mtime_ns == -5 * 10**9 + 7
    raw = _raw_inode(blocks=8, flags=0x40000)  # EXT4_HUGE_FILE_FL: units of fs blocks
    assert parse_inode(bytes(raw), 12, sb).i_blocks == 8 * 2
    assert inode_attr(inode, sb).blksize == 1024


@pytest.mark.parametrize("variant", VARIANTS)
def test_rdev_old_and_new_encoding(
    sb: Superblock, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: decoding i_block[1] with the old 8:8 split -> major 300 fails."""
    _broken(variant, monkeypatch, inode_mod, "inode_rdev",
            "return _makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))",
            "return _makedev((new >> 8) & 0xFF, new & 0xFF)")
    old = parse_inode(bytes(_raw_inode(mode=0o20644, block0=(8 << 8) | 1)), 12, sb)
    assert inode_rdev(old) == os.makedev(8, 1)
    major, minor = 300, 70000
    new_enc = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    new = parse_inode(bytes(_raw_inode(mode=0o60644, block1=new_enc)), 12, sb)
    with fails_unless_kernel(variant):
        assert inode_rdev(new) == os.makedev(major, minor)
    fifo = parse_inode(bytes(_raw_inode(mode=0o10644, block0=5)), 12, sb)
    assert inode_rdev(fifo) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_extra_isize(sb: Superblock, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: no extra_isize bound -> the parser reads past the inode silently."""
    _broken(variant, monkeypatch, inode_mod, "parse_inode",
            "if GOOD_OLD_INODE_SIZE + extra_isize > isz or extra_isize & 3:", "if False:")
    raw = _raw_inode()
    struct.pack_into("<H", raw, 0x80, 200)
    with fails_unless_kernel(variant), pytest.raises(CorruptionError):
        parse_inode(bytes(raw), 12, sb)


# ------------------------------------------------------------------------------------------
# extents, indirect blocks


def _node(depth: int, entries: list[tuple[int, int, int]], max_entries: int = 4) -> bytes:
    b = bytearray(12 + 12 * max_entries)
    struct.pack_into("<HHHHI", b, 0, EXT4_EXT_MAGIC, len(entries), max_entries, depth, 0)
    for i, (lblk, n, pblk) in enumerate(entries):
        if depth == 0:
            struct.pack_into("<IHHI", b, 12 + 12 * i, lblk, n, pblk >> 32, pblk & 0xFFFFFFFF)
        else:
            struct.pack_into("<IIHH", b, 12 + 12 * i, lblk, pblk & 0xFFFFFFFF, pblk >> 32, 0)
    return bytes(b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_extent_leaf_uninit_and_search(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: treating ee_len > 32768 as initialized length -> uninit flag lost."""
    _broken(variant, monkeypatch, extents, "parse_extent_node",
            "uninit = ee_len > EXT_INIT_MAX_LEN", "uninit = False")
    node = parse_extent_node(_node(0, [(0, 4, 100), (10, 32768 + 5, (1 << 33) + 7)]))
    ext, _ = find_extent(node, 2)
    assert ext is not None and ext.ee_start == 100 and not ext.uninit
    ext, _ = find_extent(node, 12)
    with fails_unless_kernel(variant):
        assert ext is not None and ext.uninit and ext.ee_len == 5
        assert ext.ee_start == (1 << 33) + 7
    if variant != "kernel":
        return
    assert find_extent(node, 5) == (None, 10)
    assert find_extent(node, 99) == (None, None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_extent_index_and_depth_check(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: no expect_depth check -> a child claiming its parent's depth (a loop)
    parses and this fails."""
    _broken(variant, monkeypatch, extents, "parse_extent_node",
            "if expect_depth is not None and depth != expect_depth:", "if False:")
    idx = parse_extent_node(_node(1, [(0, 0, 500), (1000, 0, 600)]))
    assert find_index(idx, 999) == 500 and find_index(idx, 1000) == 600
    with fails_unless_kernel(variant), pytest.raises(CorruptionError):
        parse_extent_node(_node(1, [(0, 0, 500)]), expect_depth=0)


_BAD_NODES = {
    "overlapping": (_node(0, [(0, 4, 100), (2, 4, 200)]),
                    "if e1.ee_block + e1.ee_len > e2.ee_block:"),
    "out-of-order": (_node(0, [(5, 1, 100), (5, 1, 200)]), None),  # overlapping too
    "zero-length": (_node(0, [(0, 0, 100)]), "if length == 0:"),
    "too-deep": (_node(9, []), None),
    "eh_max-past-buffer": (_node(0, [], max_entries=4)[:12] + b"",
                           "if max_entries > capacity or entries > max_entries:"),
}


@pytest.mark.parametrize(("case", "variant"), [
    *((case, "kernel") for case in sorted(_BAD_NODES)),
    *((case, "broken") for case, (_, check) in sorted(_BAD_NODES.items()) if check),
])
def test_extent_node_corruption(case: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variants: no capacity check (eh_max larger than the buffer) -> struct.error
    escapes for that case; no overlap or length check -> that case parses. (The out-of-order
    pair overlaps as well, so either check refuses it.)"""
    bad, check = _BAD_NODES[case]
    if check is not None:
        new = "if entries > max_entries:" if case == "eh_max-past-buffer" else "if False:"
        _broken(variant, monkeypatch, extents, "parse_extent_node", check, new)
    if variant == "kernel":
        with pytest.raises(CorruptionError):
            parse_extent_node(bad)
        return
    with pytest.raises((pytest.fail.Exception, struct.error)), pytest.raises(CorruptionError):
        parse_extent_node(bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_indirect_path(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: double-indirect slots computed without subtracting the single range."""
    _broken(variant, monkeypatch, blockmap, "indirect_path", "lblk -= p\n", "pass\n")
    ppb = 256
    assert indirect_path(11, ppb) == (11,)
    assert indirect_path(12, ppb) == (12, 0)
    with fails_unless_kernel(variant):
        assert indirect_path(12 + 256, ppb) == (13, 0, 0)
    if variant != "kernel":
        return
    assert indirect_path(12 + 256 + 256 * 256, ppb) == (14, 0, 0, 0)
    assert indirect_path(max_indirect_blocks(ppb) - 1, ppb) == (14, 255, 255, 255)
    with pytest.raises(CorruptionError):
        indirect_path(max_indirect_blocks(ppb), ppb)
    assert list(parse_pointer_block(struct.pack("<3I", 1, 2, 0xFFFFFFFF))) == [1, 2, 0xFFFFFFFF]


# ------------------------------------------------------------------------------------------
# directories


def _dirent(ino: int, name: bytes, rec_len: int, ft: int = 1) -> bytes:
    return struct.pack("<IHBB", ino, rec_len, len(name), ft) + name.ljust(rec_len - 8, b"\0")


@pytest.mark.parametrize("variant", VARIANTS)
def test_dirents_and_bad_record(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: no rec_len bound -> the record running past the block is returned."""
    _broken(variant, monkeypatch, dirent, "parse_dirents", "if off + rec_len > end:",
            "if False:")
    blk = _dirent(2, b".", 12, 2) + _dirent(2, b"..", 12, 2) + _dirent(12, b"file", 1000)
    ents, bad = parse_dirents(blk, 0, 1024, block_size=1024, inodes_count=100, filetype=True)
    assert [e.name for e in ents] == [b".", b"..", b"file"] and bad is None
    past = _dirent(2, b".", 12, 2) + _dirent(2, b"..", 12, 2) + _dirent(12, b"file", 1004)
    ents, bad = parse_dirents(past[:1024], 0, 1024, block_size=1024, inodes_count=100,
                              filetype=True)
    with fails_unless_kernel(variant):
        assert [e.name for e in ents] == [b".", b".."] and bad is not None
    if variant != "kernel":
        return
    blk2 = _dirent(12, b"x", 1012) + _dirent(500, b"y", 12)
    ents, bad = parse_dirents(blk2, 0, 1024, block_size=1024, inodes_count=100, filetype=True)
    assert [e.name for e in ents] == [b"x"] and bad is not None and "inode 500" in bad


@pytest.mark.parametrize("variant", VARIANTS)
def test_rec_len_64k(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: taking rec_len literally for 64 KiB blocks -> 0 stays 0."""
    _broken(variant, monkeypatch, dirent, "rec_len_from_disk", "if block_size < 65536:",
            "if True:")
    with fails_unless_kernel(variant):
        assert rec_len_from_disk(0, 65536) == 65536
        assert rec_len_from_disk(65535, 65536) == 65536
    assert rec_len_from_disk(12, 65536) == 12
    assert rec_len_from_disk(12, 4096) == 12


def _dx_root(bs: int, entries: list[tuple[int, int]], *, levels: int = 0, hv: int = 1,
             csum: bool = False) -> bytes:
    b = bytearray(bs)
    b[0:12] = _dirent(2, b".", 12, 2)
    b[12:24] = _dirent(2, b"..", bs - 12, 2)[:12]
    struct.pack_into("<IBBBB", b, 24, 0, hv, 8, levels, 0)
    limit = (bs - 32) // 8 - (1 if csum else 0)
    struct.pack_into("<HHI", b, 32, limit, len(entries), entries[0][1])
    for i, (h, blk) in enumerate(entries[1:], 1):
        struct.pack_into("<II", b, 32 + 8 * i, h, blk)
    return bytes(b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dx_root_and_search(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: dx_search picking the first entry with hash >= target -> wrong child."""
    _broken(variant, monkeypatch, htree, "dx_search",
            "return max(bisect.bisect_right(node.hashes, hash_, lo=1) - 1, 0)",
            "return min(bisect.bisect_left(node.hashes, hash_, lo=1), len(node.hashes) - 1)")
    root = parse_dx_root(_dx_root(1024, [(0, 1), (0x1000, 2), (0x8000, 3)]), block_size=1024,
                         csum=False, largedir=False)
    assert root.hash_version == 1 and root.indirect_levels == 0
    with fails_unless_kernel(variant):
        assert [root.node.blocks[dx_search(root.node, h)]
                for h in (0, 0xFFF, 0x1000, 0x9000)] == [1, 1, 2, 3]
    with pytest.raises(CorruptionError):  # wrong limit for a csum volume
        parse_dx_root(_dx_root(1024, [(0, 1)]), block_size=1024, csum=True, largedir=False)
    with pytest.raises(CorruptionError):  # three levels without large_dir
        parse_dx_root(_dx_root(1024, [(0, 1)], levels=2), block_size=1024, csum=False,
                      largedir=False)
    with pytest.raises(CorruptionError):
        parse_dx_root(_dx_root(1024, [(0, 1)], hv=9), block_size=1024, csum=False,
                      largedir=False)


# ------------------------------------------------------------------------------------------
# Hypothesis: arbitrary bytes raise only the project's own errors


def _only_ours(fn: object, *args: object, **kw: object) -> None:
    with contextlib.suppress(AsyncfsError):
        fn(*args, **kw)  # type: ignore[operator]


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=1100))
def test_fuzz_superblock(data: bytes) -> None:
    """Arbitrary bytes: ImageError (bad magic, short) and nothing else."""
    _only_ours(parse_superblock, data)


_FIELD_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 7, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)


@settings(max_examples=400)
@given(st.data())
def test_fuzz_superblock_mutations(sb_raw: bytes, data: st.DataObject) -> None:
    """Mutate u32 fields of a valid superblock: geometry checks must catch what would divide
    by zero or overflow (a ``blocks_per_group`` of 0, for one)."""
    raw = bytearray(sb_raw)
    for _ in range(data.draw(st.integers(1, 3))):
        off = data.draw(st.integers(0, 0x170 // 4)) * 4
        struct.pack_into("<I", raw, off, data.draw(_FIELD_VALUES))
    try:
        sb = parse_superblock(bytes(raw))
    except AsyncfsError:
        return
    assert sb.groups_count >= 1 and sb.block_size >= 1024 and sb.desc_per_block >= 1
    for g in (0, 1, sb.groups_count - 1):
        bg_has_super(sb, g)
        bg_num_gdb(sb, g)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_inode_and_group(sb: Superblock, data: bytes) -> None:
    _only_ours(parse_inode, data, 12, sb)
    _only_ours(parse_group_desc, data, sb)
    if len(data) >= 256:
        inode = parse_inode(data, 12, sb)
        inode_attr(inode, sb)


@settings(max_examples=300)
@given(st.binary(max_size=1100), st.one_of(st.none(), st.integers(0, 6)))
def test_fuzz_extent_node(data: bytes, depth: int | None) -> None:
    try:
        node = parse_extent_node(data, expect_depth=depth)
    except AsyncfsError:
        return
    if node.depth == 0:
        find_extent(node, 7)
    else:
        find_index(node, 7)


@settings(max_examples=300)
@given(st.binary(max_size=1100), st.sampled_from([1024, 4096, 65536]))
def test_fuzz_dirents_and_dx(data: bytes, bs: int) -> None:
    """Arbitrary bytes: records within the buffer, and only the project's errors (a record
    header cut by the end of the buffer is reported, not indexed past)."""
    ents, _bad = parse_dirents(data, 0, len(data), block_size=bs, inodes_count=1000,
                               filetype=True)
    assert sum(e.rec_len for e in ents) <= len(data)
    padded = data.ljust(1024, b"\0")
    _only_ours(parse_dx_root, padded, block_size=1024, csum=False, largedir=True)
    _only_ours(parse_dx_node, padded, block_size=1024, csum=True)


@settings(max_examples=200)
@given(st.integers(-5, 2**40), st.sampled_from([256, 1024]))
def test_fuzz_indirect_path(lblk: int, ppb: int) -> None:
    try:
        path = indirect_path(lblk, ppb)
    except AsyncfsError:
        return
    assert 1 <= len(path) <= 4 and all(0 <= s < max(ppb, 15) for s in path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_readdir_hash_order_sorts_and_chains_collisions_like_the_kernel(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext4_htree_store_dirent chains an exact (major, minor) collision right after the first
    entry, so a, b, c with one key come out a, c, b. Broken variant: a plain stable sort
    (a, b, c) fails this."""
    _broken(variant, monkeypatch, htree, "readdir_hash_order",
            "out.extend(reversed(chain[1:]))", "out.extend(chain[1:])")
    from asyncfs.ext4.htree import readdir_hash_order

    keyed = [(8, 1, "x"), (4, 0, "a"), (4, 0, "b"), (2, 0, ".."), (4, 0, "c"), (4, 1, "d")]
    with fails_unless_kernel(variant):
        assert readdir_hash_order(keyed) == ["..", "a", "c", "b", "d", "x"]
