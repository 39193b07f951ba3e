"""ext2/ext3 block maps: 12 direct pointers, then single, double and triple indirect blocks.

:func:`indirect_path` turns a logical block into the chain of slots to follow (the kernel's
ext4_block_to_path); the engine reads each pointer block and :func:`parse_pointer_block`
decodes it. A zero pointer anywhere on the chain is a hole.
"""

from __future__ import annotations

import struct
import sys
from array import array

from asyncfs.errors import CorruptionError

EXT4_NDIR_BLOCKS = 12
EXT4_IND_BLOCK = 12
EXT4_DIND_BLOCK = 13
EXT4_TIND_BLOCK = 14


def i_block_pointers(i_block: bytes) -> tuple[int, ...]:
    """The 15 block pointers of an indirect-mapped inode's i_block."""
    if len(i_block) < 60:
        raise CorruptionError("i_block truncated")
    return struct.unpack_from("<15I", i_block, 0)


def parse_pointer_block(raw: bytes) -> array[int]:
    """All u32 pointers of one indirect block (block size / 4 of them)."""
    n = len(raw) // 4
    ptrs = array("I")
    ptrs.frombytes(bytes(raw[: n * 4]))
    if sys.byteorder == "big":  # pragma: no cover - on-disk pointers are little-endian
        ptrs.byteswap()
    return ptrs


def indirect_path(lblk: int, ptrs_per_block: int) -> tuple[int, ...]:
    """Slots from i_block down to the data pointer for logical block ``lblk``.

    The first element indexes i_block (0..14), each further one a pointer block.
    """
    if lblk < 0:
        raise CorruptionError(f"negative logical block {lblk}")
    p = ptrs_per_block
    if lblk < EXT4_NDIR_BLOCKS:
        return (lblk,)
    lblk -= EXT4_NDIR_BLOCKS
    if lblk < p:
        return (EXT4_IND_BLOCK, lblk)
    lblk -= p
    if lblk < p * p:
        return (EXT4_DIND_BLOCK, lblk // p, lblk % p)
    lblk -= p * p
    if lblk < p * p * p:
        return (EXT4_TIND_BLOCK, lblk // (p * p), (lblk // p) % p, lblk % p)
    raise CorruptionError("logical block beyond the triple-indirect range")


def max_indirect_blocks(ptrs_per_block: int) -> int:
    """Number of logical blocks an indirect-mapped file can address."""
    p = ptrs_per_block
    return EXT4_NDIR_BLOCKS + p + p * p + p * p * p
