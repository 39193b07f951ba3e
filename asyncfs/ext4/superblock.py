"""The ext2/3/4 superblock: decoding, validation and the geometry derived from it.

``parse_superblock`` takes the 1024 bytes at device offset 1024 and returns a frozen
:class:`Superblock`, or raises ImageError (not ext, or geometry that cannot be right) /
UnsupportedFeatureError (an incompatible feature this reader does not implement).
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncfs.errors import ImageError
from asyncfs.ext4 import features as F
from asyncfs.ext4.le import u16 as _u16
from asyncfs.ext4.le import u32 as _u32

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_SUPER_MAGIC = 0xEF53
GOOD_OLD_REV = 0
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11
MIN_DESC_SIZE = 32
MIN_DESC_SIZE_64BIT = 64
MAX_DESC_SIZE = 1024

# s_flags
FLAGS_SIGNED_HASH = 0x1
FLAGS_UNSIGNED_HASH = 0x2

EXT4_OS_LINUX = 0
CHECKSUM_TYPE_CRC32C = 1

# s_state
STATE_VALID_FS = 0x1
STATE_ERROR_FS = 0x2


@dataclass(frozen=True, slots=True)
class Superblock:
    """The decoded fields asyncfs uses, plus derived geometry (``block_size`` etc.)."""

    s_inodes_count: int
    s_blocks_count: int
    s_r_blocks_count: int
    s_free_blocks_count: int
    s_free_inodes_count: int
    s_first_data_block: int
    s_log_block_size: int
    s_log_cluster_size: int
    s_blocks_per_group: int
    s_clusters_per_group: int
    s_inodes_per_group: int
    s_mtime: int
    s_wtime: int
    s_state: int
    s_creator_os: int
    s_rev_level: int
    s_first_ino: int
    s_inode_size: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_volume_name: bytes
    s_last_mounted: bytes
    s_reserved_gdt_blocks: int
    s_journal_inum: int
    s_hash_seed: bytes
    s_def_hash_version: int
    s_desc_size: int
    s_first_meta_bg: int
    s_mkfs_time: int
    s_min_extra_isize: int
    s_want_extra_isize: int
    s_flags: int
    s_log_groups_per_flex: int
    s_checksum_type: int
    s_overhead_clusters: int
    s_backup_bgs: tuple[int, int]
    s_checksum_seed: int
    s_encoding: int
    s_encoding_flags: int
    s_checksum: int
    # derived
    block_size: int
    cluster_size: int
    cluster_bits: int  # log2(blocks per cluster)
    desc_size: int
    groups_count: int
    desc_per_block: int
    gdb_count: int
    inode_table_blocks: int  # per group (s_itb_per_group)

    def has_compat(self, bit: int) -> bool:
        return bool(self.s_feature_compat & bit)

    def has_incompat(self, bit: int) -> bool:
        return bool(self.s_feature_incompat & bit)

    def has_ro_compat(self, bit: int) -> bool:
        return bool(self.s_feature_ro_compat & bit)

    @property
    def hash_unsigned(self) -> int:
        """3 when directory hashes are the unsigned variants (the kernel's s_hash_unsigned)."""
        return 3 if self.s_flags & FLAGS_UNSIGNED_HASH else 0

    @property
    def has_metadata_csum(self) -> bool:
        return self.has_ro_compat(F.RO_COMPAT_METADATA_CSUM)

    @property
    def needs_recovery(self) -> bool:
        return self.has_incompat(F.INCOMPAT_RECOVER) and self.has_compat(
            F.COMPAT_HAS_JOURNAL
        )

    def feature_names(self) -> list[str]:
        return (
            F.flag_names(self.s_feature_compat, F.COMPAT_NAMES)
            + F.flag_names(self.s_feature_incompat, F.INCOMPAT_NAMES)
            + F.flag_names(self.s_feature_ro_compat, F.RO_COMPAT_NAMES)
        )


def parse_superblock(raw: bytes) -> Superblock:
    """Decode and validate the superblock; ImageError/UnsupportedFeatureError if unusable."""
    if len(raw) < SUPERBLOCK_SIZE:
        raise ImageError("image too small to hold an ext2/3/4 superblock")
    b = bytes(raw[:SUPERBLOCK_SIZE])
    if _u16(b, 0x38) != EXT4_SUPER_MAGIC:
        raise ImageError("not an ext2/ext3/ext4 filesystem (bad superblock magic)")
    compat, incompat, ro_compat = _u32(b, 0x5C), _u32(b, 0x60), _u32(b, 0x64)
    rev = _u32(b, 0x4C)
    if rev == GOOD_OLD_REV:
        compat = incompat = ro_compat = 0
    F.check_features(compat, incompat, ro_compat)

    log_bs = _u32(b, 0x18)
    if log_bs > 6:
        raise ImageError(f"invalid block size (s_log_block_size={log_bs})")
    block_size = 1024 << log_bs
    log_cs = _u32(b, 0x1C)
    if ro_compat & F.RO_COMPAT_BIGALLOC:
        if log_cs < log_bs or log_cs > 30:
            raise ImageError(f"invalid cluster size (s_log_cluster_size={log_cs})")
        cluster_bits = log_cs - log_bs
    else:
        cluster_bits = 0
    cluster_size = block_size << cluster_bits

    blocks_count = _u32(b, 0x4)
    r_blocks = _u32(b, 0x8)
    free_blocks = _u32(b, 0xC)
    is64 = bool(incompat & F.INCOMPAT_64BIT)
    if is64:
        blocks_count |= _u32(b, 0x150) << 32
        r_blocks |= _u32(b, 0x154) << 32
        free_blocks |= _u32(b, 0x158) << 32

    inodes_count = _u32(b, 0x0)
    first_data_block = _u32(b, 0x14)
    blocks_per_group = _u32(b, 0x20)
    clusters_per_group = _u32(b, 0x24) if cluster_bits else blocks_per_group
    inodes_per_group = _u32(b, 0x28)

    if rev == GOOD_OLD_REV:
        inode_size, first_ino = GOOD_OLD_INODE_SIZE, GOOD_OLD_FIRST_INO
    else:
        inode_size, first_ino = _u16(b, 0x58), _u32(b, 0x54)
    if (
        inode_size < GOOD_OLD_INODE_SIZE
        or inode_size > block_size
        or inode_size & (inode_size - 1)
    ):
        raise ImageError(f"invalid inode size {inode_size}")
    if first_ino < GOOD_OLD_FIRST_INO and rev != GOOD_OLD_REV:
        raise ImageError(f"invalid first inode {first_ino}")

    if is64:
        desc_size = _u16(b, 0xFE)
        if desc_size < MIN_DESC_SIZE_64BIT or desc_size > MAX_DESC_SIZE or desc_size & (
            desc_size - 1
        ):
            raise ImageError(f"invalid group descriptor size {desc_size}")
    else:
        desc_size = MIN_DESC_SIZE

    if blocks_count == 0 or blocks_per_group == 0 or inodes_per_group == 0:
        raise ImageError("superblock has zero blocks or groups")
    if blocks_per_group > block_size * 8 << cluster_bits or blocks_per_group < 8:
        raise ImageError(f"invalid blocks per group {blocks_per_group}")
    if cluster_bits and clusters_per_group != blocks_per_group >> cluster_bits:
        raise ImageError(f"invalid clusters per group {clusters_per_group}")
    if inodes_per_group > block_size * 8 or inodes_per_group > inodes_count:
        raise ImageError(f"invalid inodes per group {inodes_per_group}")
    if block_size == 1024 and first_data_block != 1 and not cluster_bits:
        raise ImageError(f"invalid first data block {first_data_block}")
    if block_size > 1024 and first_data_block != 0:
        raise ImageError(f"invalid first data block {first_data_block}")
    if first_data_block >= blocks_count:
        raise ImageError("first data block beyond the end of the filesystem")

    groups_count = (blocks_count - first_data_block + blocks_per_group - 1) // blocks_per_group
    if groups_count * inodes_per_group != inodes_count:
        raise ImageError(
            f"inode count {inodes_count} != {groups_count} groups x {inodes_per_group}"
        )
    desc_per_block = block_size // desc_size
    gdb_count = (groups_count + desc_per_block - 1) // desc_per_block
    inode_table_blocks = (inodes_per_group * inode_size + block_size - 1) // block_size

    return Superblock(
        s_inodes_count=inodes_count,
        s_blocks_count=blocks_count,
        s_r_blocks_count=r_blocks,
        s_free_blocks_count=free_blocks,
        s_free_inodes_count=_u32(b, 0x10),
        s_first_data_block=first_data_block,
        s_log_block_size=log_bs,
        s_log_cluster_size=log_cs,
        s_blocks_per_group=blocks_per_group,
        s_clusters_per_group=clusters_per_group,
        s_inodes_per_group=inodes_per_group,
        s_mtime=_u32(b, 0x2C),
        s_wtime=_u32(b, 0x30),
        s_state=_u16(b, 0x3A),
        s_creator_os=_u32(b, 0x48),
        s_rev_level=rev,
        s_first_ino=first_ino,
        s_inode_size=inode_size,
        s_feature_compat=compat,
        s_feature_incompat=incompat,
        s_feature_ro_compat=ro_compat,
        s_uuid=b[0x68:0x78],
        s_volume_name=b[0x78:0x88].split(b"\0", 1)[0],
        s_last_mounted=b[0x88:0xC8].split(b"\0", 1)[0],
        s_reserved_gdt_blocks=_u16(b, 0xCE),
        s_journal_inum=_u32(b, 0xE0),
        s_hash_seed=b[0xEC:0xFC],
        s_def_hash_version=b[0xFC],
        s_desc_size=_u16(b, 0xFE),
        s_first_meta_bg=_u32(b, 0x104),
        s_mkfs_time=_u32(b, 0x108),
        s_min_extra_isize=_u16(b, 0x15C),
        s_want_extra_isize=_u16(b, 0x15E),
        s_flags=_u32(b, 0x160),
        s_log_groups_per_flex=b[0x174],
        s_checksum_type=b[0x175],
        s_overhead_clusters=_u32(b, 0x248),
        s_backup_bgs=(_u32(b, 0x24C), _u32(b, 0x250)),
        s_checksum_seed=_u32(b, 0x270),
        s_encoding=_u16(b, 0x27C),
        s_encoding_flags=_u16(b, 0x27E),
        s_checksum=_u32(b, 0x3FC),
        block_size=block_size,
        cluster_size=cluster_size,
        cluster_bits=cluster_bits,
        desc_size=desc_size,
        groups_count=groups_count,
        desc_per_block=desc_per_block,
        gdb_count=gdb_count,
        inode_table_blocks=inode_table_blocks,
    )
