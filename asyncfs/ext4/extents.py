"""Extent tree nodes: decoding one node (in i_block or in a block) and searching it.

The walk over several levels needs I/O, so it lives in the engine; this module answers "which
child block covers logical block L" (:func:`find_index`) and "which extent covers or follows L"
(:func:`find_extent`) for one already-read node. Depth and counts are validated against the
node's own capacity, so a forged header cannot make a walk loop or allocate without bound.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from dataclasses import dataclass

from asyncfs.errors import CorruptionError

EXT4_EXT_MAGIC = 0xF30A
EXT4_MAX_EXTENT_DEPTH = 5
EXT_INIT_MAX_LEN = 1 << 15
HEADER_SIZE = 12
ENTRY_SIZE = 12
TAIL_SIZE = 4  # ext4_extent_tail.et_checksum after eh_max entries

_HDR = struct.Struct("<HHHHI")


@dataclass(frozen=True, slots=True)
class Extent:
    """A leaf entry: ``ee_len`` blocks from logical ``ee_block`` at physical ``ee_start``."""

    ee_block: int
    ee_len: int
    ee_start: int
    uninit: bool


@dataclass(frozen=True, slots=True)
class ExtentNode:
    """One node. Leaves carry ``extents``, index nodes ``index`` as (ei_block, ei_leaf)."""

    depth: int
    max_entries: int
    extents: tuple[Extent, ...]
    index: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]  # logical starts, for bisect


def parse_extent_node(raw: bytes, *, expect_depth: int | None = None) -> ExtentNode:
    """Decode the node in ``raw`` (60 bytes of i_block, or a whole block).

    ``expect_depth`` is the depth the parent says this node has; a mismatch is corruption
    (it is what makes a loop in the tree impossible to follow).
    """
    if len(raw) < HEADER_SIZE:
        raise CorruptionError("extent node truncated")
    magic, entries, max_entries, depth, _gen = _HDR.unpack_from(raw, 0)
    if magic != EXT4_EXT_MAGIC:
        raise CorruptionError(f"bad extent header magic {magic:#06x}")
    capacity = (len(raw) - HEADER_SIZE) // ENTRY_SIZE
    if max_entries > capacity or entries > max_entries:
        raise CorruptionError(
            f"bad extent header: {entries} entries, max {max_entries}, room for {capacity}"
        )
    if depth > EXT4_MAX_EXTENT_DEPTH:
        raise CorruptionError(f"extent tree too deep ({depth})")
    if expect_depth is not None and depth != expect_depth:
        raise CorruptionError(f"extent node depth {depth}, expected {expect_depth}")
    starts: list[int] = []
    extents: list[Extent] = []
    index: list[tuple[int, int]] = []
    prev = -1
    for i in range(entries):
        off = HEADER_SIZE + i * ENTRY_SIZE
        lblk, a, b, c = struct.unpack_from("<IHHI", raw, off)
        if lblk <= prev:
            raise CorruptionError("extent entries out of order")
        prev = lblk
        starts.append(lblk)
        if depth == 0:
            ee_len, start_hi, start_lo = a, b, c
            uninit = ee_len > EXT_INIT_MAX_LEN
            length = ee_len - EXT_INIT_MAX_LEN if uninit else ee_len
            if length == 0:
                raise CorruptionError("zero-length extent")
            if lblk + length > 1 << 32:
                raise CorruptionError("extent past the maximum file block")
            extents.append(Extent(lblk, length, (start_hi << 32) | start_lo, uninit))
        else:
            # ext4_extent_idx: ei_block, ei_leaf_lo (u32), ei_leaf_hi (u16), ei_unused
            leaf_lo = a | (b << 16)
            leaf_hi = c & 0xFFFF
            index.append((lblk, (leaf_hi << 32) | leaf_lo))
    # overlapping leaf extents make the mapping ambiguous: the kernel's ext4_valid_extent_entries
    for e1, e2 in itertools.pairwise(extents):
        if e1.ee_block + e1.ee_len > e2.ee_block:
            raise CorruptionError("overlapping extents")
    return ExtentNode(depth, max_entries, tuple(extents), tuple(index), tuple(starts))


def find_index(node: ExtentNode, lblk: int) -> int:
    """Child block for ``lblk``: the last index entry starting at or before it (or the first)."""
    if not node.index:
        raise CorruptionError("empty extent index node")
    i = bisect.bisect_right(node.starts, lblk) - 1
    return node.index[max(i, 0)][1]


def find_extent(node: ExtentNode, lblk: int) -> tuple[Extent | None, int | None]:
    """In a leaf: (extent covering ``lblk`` or None, logical start of the next extent or None)."""
    i = bisect.bisect_right(node.starts, lblk) - 1
    if i >= 0:
        ext = node.extents[i]
        if lblk < ext.ee_block + ext.ee_len:
            return ext, None
    nxt = i + 1
    return None, (node.extents[nxt].ee_block if nxt < len(node.extents) else None)


def next_index_start(node: ExtentNode, lblk: int) -> int | None:
    """Logical start of the index entry after the one covering ``lblk`` (None if last)."""
    i = bisect.bisect_right(node.starts, lblk)
    return node.starts[i] if i < len(node.starts) else None


def extent_tail_offset(node: ExtentNode) -> int:
    """Offset of the extent block checksum tail (after eh_max entries)."""
    return HEADER_SIZE + node.max_entries * ENTRY_SIZE
