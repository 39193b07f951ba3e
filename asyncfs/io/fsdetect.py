"""Name the filesystem in a byte range by its magic numbers (as blkid would, for a few types).

ext2/3/4 are told apart by superblock features the way blkid does it: a journal makes ext3,
any feature beyond what ext3 supports makes ext4.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes, short at end of the range

_EXT_MAGIC = 0xEF53
_COMPAT_HAS_JOURNAL = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
# What ext2/ext3 drivers understand (e2fsprogs' EXT2/EXT3_FEATURE_*_SUPP); more means ext4.
_EXT3_INCOMPAT_SUPP = 0x0002 | 0x0004 | 0x0010  # FILETYPE | RECOVER | META_BG
_EXT2_INCOMPAT_SUPP = 0x0002 | 0x0010  # FILETYPE | META_BG
_EXT23_RO_COMPAT_SUPP = 0x0001 | 0x0002 | 0x0004  # SPARSE_SUPER | LARGE_FILE | BTREE_DIR


def ext_kind(sb: bytes) -> str | None:
    """'ext2', 'ext3', 'ext4' or 'jbd' for a 1024-byte superblock, else None."""
    if len(sb) < 104:
        return None
    if struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    if incompat & _INCOMPAT_JOURNAL_DEV:
        return "jbd"
    if compat & _COMPAT_HAS_JOURNAL:
        if incompat & ~_EXT3_INCOMPAT_SUPP or ro_compat & ~_EXT23_RO_COMPAT_SUPP:
            return "ext4"
        return "ext3"
    if incompat & ~_EXT2_INCOMPAT_SUPP or ro_compat & ~_EXT23_RO_COMPAT_SUPP:
        return "ext4"
    return "ext2"


def detect_filesystem(read: Reader, size: int) -> str:
    """The filesystem type name for the range ``read`` serves (``size`` bytes), or 'unknown'."""
    head = read(0, min(size, 4096))
    sb = read(1024, 1024) if size >= 2048 else b""
    kind = ext_kind(sb)
    if kind is not None:
        return kind
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS"
    if head[:4] == b"hsqs":
        return "squashfs"
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if len(head) >= 0x220 and head[0x200:0x208] == b"LABELONE" and head[0x218:0x220] == b"LVM2 001":
        return "LVM2_member"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and (
        head[0x52:0x57] == b"FAT32" or head[0x36:0x3B] in (b"FAT12", b"FAT16", b"FAT  ")
    ):
        return "vfat"
    if size >= 0x10048 and read(0x10040, 8) == b"_BHRfS_M":
        return "btrfs"
    if size >= 0x8006 and read(0x8001, 5) == b"CD001":
        return "iso9660"
    return "unknown"
