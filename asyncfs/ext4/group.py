"""Block group descriptors (32- and 64-byte) and where the group metadata lives.

Covers the descriptor table's location with and without meta_bg, which groups carry a
superblock backup (sparse_super, sparse_super2), and the per-group descriptor-block count, all
as the kernel computes them (fs/ext4/balloc.c, super.c).
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncfs.errors import CorruptionError
from asyncfs.ext4 import features as F
from asyncfs.ext4.le import u16 as _u16
from asyncfs.ext4.le import u32 as _u32
from asyncfs.ext4.superblock import MIN_DESC_SIZE_64BIT, Superblock

# bg_flags
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2
BG_INODE_ZEROED = 0x4


@dataclass(frozen=True, slots=True)
class GroupDesc:
    """One decoded group descriptor (hi halves folded in when the descriptor is 64 bytes)."""

    bg_block_bitmap: int
    bg_inode_bitmap: int
    bg_inode_table: int
    bg_free_blocks_count: int
    bg_free_inodes_count: int
    bg_used_dirs_count: int
    bg_flags: int
    bg_itable_unused: int
    bg_checksum: int


def parse_group_desc(raw: bytes, sb: Superblock) -> GroupDesc:
    """Decode one descriptor of ``sb.desc_size`` bytes."""
    if len(raw) < sb.desc_size:
        raise CorruptionError("group descriptor truncated")
    b = bytes(raw[: sb.desc_size])
    big = sb.desc_size >= MIN_DESC_SIZE_64BIT
    return GroupDesc(
        bg_block_bitmap=_u32(b, 0x0) | (_u32(b, 0x20) << 32 if big else 0),
        bg_inode_bitmap=_u32(b, 0x4) | (_u32(b, 0x24) << 32 if big else 0),
        bg_inode_table=_u32(b, 0x8) | (_u32(b, 0x28) << 32 if big else 0),
        bg_free_blocks_count=_u16(b, 0xC) | (_u16(b, 0x2C) << 16 if big else 0),
        bg_free_inodes_count=_u16(b, 0xE) | (_u16(b, 0x2E) << 16 if big else 0),
        bg_used_dirs_count=_u16(b, 0x10) | (_u16(b, 0x30) << 16 if big else 0),
        bg_flags=_u16(b, 0x12),
        bg_itable_unused=_u16(b, 0x1C) | (_u16(b, 0x32) << 16 if big else 0),
        bg_checksum=_u16(b, 0x1E),
    )


def _test_root(a: int, b: int) -> bool:
    while True:
        if a < b:
            return False
        if a == b:
            return True
        if a % b:
            return False
        a //= b


def bg_has_super(sb: Superblock, group: int) -> bool:
    """Whether ``group`` starts with a superblock copy (ext4_bg_has_super)."""
    if group == 0:
        return True
    if sb.has_compat(F.COMPAT_SPARSE_SUPER2):
        return group in sb.s_backup_bgs
    if group <= 1 or not sb.has_ro_compat(F.RO_COMPAT_SPARSE_SUPER):
        return True
    if not group & 1:
        return False
    return _test_root(group, 3) or _test_root(group, 5) or _test_root(group, 7)


def bg_num_gdb(sb: Superblock, group: int) -> int:
    """Descriptor-table blocks stored in ``group`` (ext4_bg_num_gdb)."""
    metagroup = group // sb.desc_per_block
    if not sb.has_incompat(F.INCOMPAT_META_BG) or metagroup < sb.s_first_meta_bg:
        if not bg_has_super(sb, group):
            return 0
        if sb.has_incompat(F.INCOMPAT_META_BG):
            return sb.s_first_meta_bg
        return sb.gdb_count
    first = metagroup * sb.desc_per_block
    last = first + sb.desc_per_block - 1
    return 1 if group in (first, first + 1, last) else 0


def group_first_block(sb: Superblock, group: int) -> int:
    return group * sb.s_blocks_per_group + sb.s_first_data_block


def descriptor_block(sb: Superblock, nr: int) -> int:
    """Block number of descriptor-table block ``nr`` (the kernel's descriptor_loc)."""
    logical_sb_block = 1 if sb.block_size == 1024 else 0
    if not sb.has_incompat(F.INCOMPAT_META_BG) or nr < sb.s_first_meta_bg:
        return logical_sb_block + nr + 1
    bg = sb.desc_per_block * nr
    has_super = 1 if bg_has_super(sb, bg) else 0
    if sb.block_size == 1024 and nr == 0 and sb.s_first_data_block == 0:
        has_super += 1
    return has_super + group_first_block(sb, bg)


def descriptor_location(sb: Superblock, group: int) -> int:
    """Device byte offset of ``group``'s descriptor."""
    nr, idx = divmod(group, sb.desc_per_block)
    return descriptor_block(sb, nr) * sb.block_size + idx * sb.desc_size


def inode_location(sb: Superblock, gd: GroupDesc, ino: int) -> int:
    """Device byte offset of inode ``ino`` given its group's descriptor."""
    index = (ino - 1) % sb.s_inodes_per_group
    return gd.bg_inode_table * sb.block_size + index * sb.s_inode_size


def check_group_desc(sb: Superblock, group: int, gd: GroupDesc) -> None:
    """Reject descriptors whose inode table lies outside the filesystem (ext4_check_descriptors)."""
    end = gd.bg_inode_table + sb.inode_table_blocks
    if gd.bg_inode_table < sb.s_first_data_block or end > sb.s_blocks_count:
        raise CorruptionError(
            f"group {group}: inode table at block {gd.bg_inode_table} is outside the filesystem"
        )


def inode_table_readahead(sb: Superblock, gd: GroupDesc, ino: int, ra_blks: int) -> range:
    """Inode-table blocks to read ahead with ``ino``'s block (__ext4_get_inode_loc).

    The window is the ``ra_blks``-aligned run of table blocks holding the inode (``ra_blks``
    is a power of two, the kernel's inode_readahead_blks), cut at the last block in use: with
    group descriptor checksums, ``bg_itable_unused`` says how many trailing inodes were never
    used. The kernel's loop is inclusive of its end block; so is this range.
    """
    ipb = sb.block_size // sb.s_inode_size
    table = gd.bg_inode_table
    block = table + ((ino - 1) % sb.s_inodes_per_group) // ipb
    b = max(block & ~(ra_blks - 1), table)
    end = b + ra_blks
    num = sb.s_inodes_per_group
    if sb.has_metadata_csum or sb.has_ro_compat(F.RO_COMPAT_GDT_CSUM):
        num -= min(gd.bg_itable_unused, num)
    end = min(end, table + num // ipb, table + sb.inode_table_blocks - 1)
    return range(b, max(b, end + 1))
