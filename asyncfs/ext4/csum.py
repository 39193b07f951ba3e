"""metadata_csum and gdt_csum checksums, computed exactly as fs/ext4 computes them.

Pure functions over raw on-disk bytes; each ``verify_*`` returns True when the stored checksum
matches. Deciding *whether* to verify (metadata_csum set, ``-o nocsum``, s_creator_os, which
directory blocks are dx nodes) and turning a False into EIO + a log line is the caller's job.

The primitive is the kernel's ``ext4_chksum(sbi, crc, data, len)``: CRC32C (Castagnoli) with
the given seed and no pre- or post-inversion. The ``crc32c`` package computes the standard
CRC32C (init ~0, final ~), continuing from ``value``; so ``ext4_chksum(seed, d) ==
crc32c(d, value=~seed) ^ ~0``, which :func:`ext4_chksum` wraps.

Seeds (all u32):

* ``fs seed`` = :func:`csum_seed` (``s_checksum_seed`` with INCOMPAT_CSUM_SEED, else
  ``ext4_chksum(~0, s_uuid)``): group descriptors, xattr blocks;
* ``inode seed`` = :func:`inode_csum_seed` (fs seed, then le32 inode number, then le32
  i_generation): inode, extent blocks, directory leaf blocks, dx nodes.

Signatures:

* ``verify_superblock(raw_sb: bytes) -> bool`` — ``raw_sb`` the 1024-byte superblock;
* ``verify_group_desc(raw_desc: bytes, group: int, *, fs_seed: int, uuid: bytes,
  metadata_csum: bool, is_64bit: bool) -> bool`` — ``raw_desc`` exactly s_desc_size bytes;
  crc32c low 16 bits with metadata_csum, else crc16 (gdt_csum / uninit_bg);
* ``verify_inode(raw_inode: bytes, inode_size: int, inode_seed: int) -> bool`` — the whole
  on-disk inode; 16 bits for 128-byte inodes (or i_extra_isize < 4), else 32;
* ``verify_extent_block(block: bytes, inode_seed: int) -> bool`` — tail after eh_max entries;
* ``verify_dir_block(block: bytes, inode_seed: int) -> bool`` — leaf with a dirent tail
  (False when the tail is missing: the kernel's "no space for directory leaf checksum");
* ``verify_dx_node(block: bytes, inode_seed: int) -> bool`` — dx root or dx node (count/limit
  located like get_dx_countlimit; False when it cannot be located or has no room for a tail);
* ``verify_xattr_block(block: bytes, block_nr: int, fs_seed: int) -> bool``.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

from asyncfs.ext4.dirent import DIR_TAIL_SIZE, FT_DIR_CSUM
from asyncfs.ext4.extents import ENTRY_SIZE as EXT_ENTRY_SIZE
from asyncfs.ext4.extents import HEADER_SIZE as EXT_HEADER_SIZE
from asyncfs.ext4.features import INCOMPAT_CSUM_SEED
from asyncfs.ext4.htree import DX_ENTRY_SIZE, DX_TAIL_SIZE
from asyncfs.ext4.inode import I_CHECKSUM_HI_OFF, I_EXTRA_ISIZE_OFF
from asyncfs.ext4.le import u16 as _u16
from asyncfs.ext4.le import u32 as _u32
from asyncfs.ext4.superblock import GOOD_OLD_INODE_SIZE

_M = 0xFFFFFFFF

_SB_CHECKSUM_OFF = 0x3FC
_SB_UUID_OFF = 0x68
_SB_INCOMPAT_OFF = 0x60
_SB_CHECKSUM_SEED_OFF = 0x270
_BG_CHECKSUM_OFF = 0x1E
_I_GENERATION_OFF = 0x64
_I_CHECKSUM_LO_OFF = 0x7C
_XATTR_H_CHECKSUM_OFF = 16


def ext4_chksum(seed: int, data: bytes | bytearray | memoryview) -> int:
    """The kernel's ext4_chksum: raw CRC32C of ``data`` continuing from ``seed``."""
    return _crc32c.crc32c(data, value=seed ^ _M) ^ _M  # type: ignore[no-any-return]


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16_TABLE = _crc16_table()


def crc16(crc: int, data: bytes | bytearray | memoryview) -> int:
    """lib/crc16.c: CRC-16/ANSI (poly 0x8005, reflected), no inversions, seed ``crc``."""
    crc &= 0xFFFF
    for b in bytes(data):
        crc = (crc >> 8) ^ _CRC16_TABLE[(crc ^ b) & 0xFF]
    return crc


# --------------------------------------------------------------------------------------------
# superblock and seeds


def superblock_csum(raw_sb: bytes) -> int:
    return ext4_chksum(_M, raw_sb[:_SB_CHECKSUM_OFF])


def verify_superblock(raw_sb: bytes) -> bool:
    """s_checksum == crc32c(~0, first 1020 bytes)."""
    if len(raw_sb) < 1024:
        return False
    stored = _u32(raw_sb, _SB_CHECKSUM_OFF)
    return stored == superblock_csum(raw_sb)


def csum_seed(uuid: bytes, checksum_seed: int = 0, has_csum_seed: bool = False) -> int:
    """The filesystem checksum seed (sbi->s_csum_seed)."""
    if has_csum_seed:
        return checksum_seed & _M
    return ext4_chksum(_M, uuid)


def csum_seed_from_superblock(raw_sb: bytes) -> int:
    """:func:`csum_seed` with its inputs taken from the raw superblock."""
    incompat = _u32(raw_sb, _SB_INCOMPAT_OFF)
    seed = _u32(raw_sb, _SB_CHECKSUM_SEED_OFF)
    uuid = bytes(raw_sb[_SB_UUID_OFF : _SB_UUID_OFF + 16])
    return csum_seed(uuid, seed, bool(incompat & INCOMPAT_CSUM_SEED))


def inode_csum_seed(fs_seed: int, ino: int, generation: int) -> int:
    """ei->i_csum_seed: the fs seed extended with le32 inode number and le32 generation."""
    # one CRC over both words: CRC32C continues across the two pieces exactly
    return ext4_chksum(fs_seed, struct.pack("<II", ino & _M, generation & _M))


# --------------------------------------------------------------------------------------------
# group descriptors


def group_desc_csum(
    raw_desc: bytes, group: int, *, fs_seed: int, uuid: bytes, metadata_csum: bool,
    is_64bit: bool,
) -> int:
    """bg_checksum as ext4_group_desc_csum computes it (``raw_desc`` = s_desc_size bytes)."""
    desc_size = len(raw_desc)
    le_group = struct.pack("<I", group & _M)
    head = raw_desc[:_BG_CHECKSUM_OFF]
    tail = raw_desc[_BG_CHECKSUM_OFF + 2 :]
    if metadata_csum:
        c = ext4_chksum(fs_seed, le_group)
        c = ext4_chksum(c, head)
        c = ext4_chksum(c, b"\0\0")
        if tail:
            c = ext4_chksum(c, tail)
        return c & 0xFFFF
    c = crc16(0xFFFF, uuid)
    c = crc16(c, le_group)
    c = crc16(c, head)
    if is_64bit and desc_size > _BG_CHECKSUM_OFF + 2:
        c = crc16(c, tail)
    return c


def verify_group_desc(
    raw_desc: bytes, group: int, *, fs_seed: int, uuid: bytes, metadata_csum: bool,
    is_64bit: bool,
) -> bool:
    """The stored bg_checksum matches (call only when metadata_csum or gdt_csum is set)."""
    if len(raw_desc) < _BG_CHECKSUM_OFF + 2:
        return False
    stored = _u16(raw_desc, _BG_CHECKSUM_OFF)
    return stored == group_desc_csum(
        raw_desc, group, fs_seed=fs_seed, uuid=uuid, metadata_csum=metadata_csum,
        is_64bit=is_64bit,
    )


# --------------------------------------------------------------------------------------------
# inodes


def _has_checksum_hi(raw_inode: bytes, inode_size: int) -> bool:
    if inode_size <= GOOD_OLD_INODE_SIZE:
        return False
    extra = _u16(raw_inode, I_EXTRA_ISIZE_OFF)
    # EXT4_FITS_IN_INODE(raw, ei, i_checksum_hi)
    return GOOD_OLD_INODE_SIZE + extra >= I_CHECKSUM_HI_OFF + 2


def inode_csum(raw_inode: bytes, inode_size: int, inode_seed: int) -> int:
    """ext4_inode_csum: checksum fields read as zero; full 32 bits (the caller masks)."""
    # one CRC over a copy with the checksum fields zeroed (the kernel feeds the same bytes
    # in pieces, with two zero bytes in place of each field: CRC32C chains, so it is equal)
    raw = bytearray(raw_inode[:inode_size])
    raw[_I_CHECKSUM_LO_OFF : _I_CHECKSUM_LO_OFF + 2] = b"\0\0"
    if _has_checksum_hi(raw_inode, inode_size):
        raw[I_CHECKSUM_HI_OFF : I_CHECKSUM_HI_OFF + 2] = b"\0\0"
    return ext4_chksum(inode_seed, raw)


def verify_inode(raw_inode: bytes, inode_size: int, inode_seed: int) -> bool:
    """i_checksum_lo (+ i_checksum_hi when it fits) matches. ``inode_seed`` from
    :func:`inode_csum_seed` with i_generation of this very inode (see :func:`inode_generation`).
    """
    if len(raw_inode) < inode_size or inode_size < GOOD_OLD_INODE_SIZE:
        return False
    if inode_size > GOOD_OLD_INODE_SIZE and inode_size < I_EXTRA_ISIZE_OFF + 2:
        return False
    provided = _u16(raw_inode, _I_CHECKSUM_LO_OFF)
    calculated = inode_csum(raw_inode, inode_size, inode_seed)
    if _has_checksum_hi(raw_inode, inode_size):
        provided |= _u16(raw_inode, I_CHECKSUM_HI_OFF) << 16
    else:
        calculated &= 0xFFFF
    return provided == calculated


def inode_generation(raw_inode: bytes) -> int:
    """i_generation of a raw inode (part of its checksum seed)."""
    return _u32(raw_inode, _I_GENERATION_OFF)


# --------------------------------------------------------------------------------------------
# extent blocks, directory blocks, xattr blocks


def _extent_tail_offset(block: bytes) -> int | None:
    if len(block) < EXT_HEADER_SIZE:
        return None
    eh_max = _u16(block, 4)
    off = EXT_HEADER_SIZE + EXT_ENTRY_SIZE * eh_max
    return off if off + 4 <= len(block) else None


def verify_extent_block(block: bytes, inode_seed: int) -> bool:
    """et_checksum, right after eh_max entries, == crc32c(inode seed, header + entries)."""
    off = _extent_tail_offset(block)
    if off is None:
        return False
    stored = _u32(block, off)
    return stored == ext4_chksum(inode_seed, block[:off])


def has_dirent_tail(block: bytes) -> bool:
    """The block ends in the fake 12-byte dirent that holds a leaf checksum."""
    if len(block) < DIR_TAIL_SIZE:
        return False
    t = len(block) - DIR_TAIL_SIZE
    return (
        _u32(block, t) == 0
        and _u16(block, t + 4) == DIR_TAIL_SIZE
        and block[t + 6] == 0
        and block[t + 7] == FT_DIR_CSUM
    )


def dir_block_csum(block: bytes, inode_seed: int) -> int:
    return ext4_chksum(inode_seed, block[: len(block) - DIR_TAIL_SIZE])


def verify_dir_block(block: bytes, inode_seed: int) -> bool:
    """det_checksum == crc32c(inode seed, everything before the tail)."""
    if not has_dirent_tail(block):
        return False
    stored = _u32(block, len(block) - 4)
    return stored == dir_block_csum(block, inode_seed)


def dx_count_offset(block: bytes) -> int | None:
    """Where dx_countlimit sits (8 in a dx node, 32 in a dx root), as get_dx_countlimit
    finds it, or None if the block is neither."""
    bs = len(block)
    if bs < 40:
        return None
    rlen = _u16(block, 4)
    if rlen == bs:
        off = 8
    elif rlen == 12:
        rlen2 = _u16(block, 12 + 4)
        if rlen2 != bs - 12:
            return None
        reserved_zero, _hv, info_length, _levels, _flags = struct.unpack_from(
            "<IBBBB", block, 24
        )
        if reserved_zero or info_length != 8:
            return None
        off = 32
    else:
        return None
    limit, count = struct.unpack_from("<HH", block, off)
    max_sane = (bs - off) // DX_ENTRY_SIZE
    if limit > max_sane or count > max_sane:
        return None
    return off


def dx_node_csum(block: bytes, inode_seed: int) -> int | None:
    off = dx_count_offset(block)
    if off is None:
        return None
    limit, count = struct.unpack_from("<HH", block, off)
    if off + limit * DX_ENTRY_SIZE > len(block) - DX_TAIL_SIZE:
        return None
    tail = off + limit * DX_ENTRY_SIZE
    c = ext4_chksum(inode_seed, block[: off + count * DX_ENTRY_SIZE])
    c = ext4_chksum(c, block[tail : tail + 4])  # dt_reserved
    return ext4_chksum(c, b"\0\0\0\0")


def verify_dx_node(block: bytes, inode_seed: int) -> bool:
    """dt_checksum (after ``limit`` dx entries) == crc32c over the header, the ``count``
    used entries and dt_reserved."""
    c = dx_node_csum(block, inode_seed)
    if c is None:
        return False
    off = dx_count_offset(block)
    assert off is not None
    limit = _u16(block, off)
    stored = _u32(block, off + limit * DX_ENTRY_SIZE + 4)
    return stored == c


def xattr_block_csum(block: bytes, block_nr: int, fs_seed: int) -> int:
    c = ext4_chksum(fs_seed, struct.pack("<Q", block_nr & 0xFFFFFFFFFFFFFFFF))
    c = ext4_chksum(c, block[:_XATTR_H_CHECKSUM_OFF])
    c = ext4_chksum(c, b"\0\0\0\0")
    return ext4_chksum(c, block[_XATTR_H_CHECKSUM_OFF + 4 :])


def verify_xattr_block(block: bytes, block_nr: int, fs_seed: int) -> bool:
    """h_checksum == crc32c(fs seed, le64 block number, block with h_checksum zeroed)."""
    if len(block) < 32:
        return False
    stored = _u32(block, _XATTR_H_CHECKSUM_OFF)
    return stored == xattr_block_csum(block, block_nr, fs_seed)
