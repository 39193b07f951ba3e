"""Hashed directory index (htree / dx) blocks: the root in block 0 and interior nodes.

Each parser validates the block the way the kernel's dx_probe does (hash version, levels,
count/limit against the block size) and returns the (hash, block) entries; :func:`dx_search`
picks the child for a hash. Walking the levels (reading blocks) is the engine's job.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TypeVar

from asyncfs.errors import CorruptionError
from asyncfs.ext4.dirent import dir_rec_len
from asyncfs.ext4.dx_hash import DX_HASH_HALF_MD4, DX_HASH_LEGACY, DX_HASH_SIPHASH, DX_HASH_TEA

DX_ENTRY_SIZE = 8
DX_TAIL_SIZE = 8
_ROOT_INFO_OFF = 24  # after the "." (12 bytes) and ".." records
DX_ROOT_HASH_VERSION_OFF = _ROOT_INFO_OFF + 4  # dx_root_info.hash_version

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DxBlock:
    """Entries of one dx root or node: ``hashes[0]`` is 0 (the first entry has no hash)."""

    hashes: tuple[int, ...]
    blocks: tuple[int, ...]
    limit: int
    count: int
    entries_offset: int  # where the count/limit header sits in the block


@dataclass(frozen=True, slots=True)
class DxRoot:
    hash_version: int
    indirect_levels: int
    info_length: int
    node: DxBlock


def _entries(b: bytes, off: int, want_limit: int, what: str) -> DxBlock:
    if off + DX_ENTRY_SIZE > len(b):
        raise CorruptionError(f"{what}: truncated")
    limit = int.from_bytes(b[off : off + 2], "little")
    count = int.from_bytes(b[off + 2 : off + 4], "little")
    if limit != want_limit:
        raise CorruptionError(f"{what}: dx limit {limit}, expected {want_limit}")
    if count == 0 or count > limit:
        raise CorruptionError(f"{what}: dx count {count} (limit {limit})")
    if off + count * DX_ENTRY_SIZE > len(b):
        raise CorruptionError(f"{what}: dx entries run past the block")
    hashes: list[int] = []
    blocks: list[int] = []
    for i in range(count):
        p = off + i * DX_ENTRY_SIZE
        h = 0 if i == 0 else int.from_bytes(b[p : p + 4], "little")
        hashes.append(h)
        blocks.append(int.from_bytes(b[p + 4 : p + 8], "little") & 0x0FFFFFFF)
    return DxBlock(tuple(hashes), tuple(blocks), limit, count, off)


def dx_root_limit(block_size: int, info_length: int, csum: bool) -> int:
    entry_space = block_size - dir_rec_len(1) - dir_rec_len(2) - info_length
    return entry_space // DX_ENTRY_SIZE - (1 if csum else 0)


def dx_node_limit(block_size: int, csum: bool) -> int:
    return (block_size - dir_rec_len(0)) // DX_ENTRY_SIZE - (1 if csum else 0)


def parse_dx_root(raw: bytes, *, block_size: int, csum: bool, largedir: bool) -> DxRoot:
    """Decode directory block 0 of an indexed directory."""
    b = bytes(raw)
    if len(b) < block_size or block_size < 64:
        raise CorruptionError("dx root: truncated")
    off = _ROOT_INFO_OFF
    reserved_zero = int.from_bytes(b[off : off + 4], "little")
    hash_version = b[DX_ROOT_HASH_VERSION_OFF]
    info_length, levels, unused_flags = b[off + 5], b[off + 6], b[off + 7]
    if reserved_zero:
        raise CorruptionError("dx root: reserved field not zero")
    if hash_version not in (DX_HASH_LEGACY, DX_HASH_HALF_MD4, DX_HASH_TEA, DX_HASH_SIPHASH):
        raise CorruptionError(f"dx root: unrecognised hash version {hash_version}")
    if unused_flags & 1:
        raise CorruptionError("dx root: unimplemented flags")
    max_levels = 3 if largedir else 2
    if levels >= max_levels:
        raise CorruptionError(f"dx root: htree depth {levels + 1} exceeds {max_levels}")
    if info_length < 8:
        raise CorruptionError(f"dx root: bad info length {info_length}")
    node = _entries(
        b, off + info_length, dx_root_limit(block_size, info_length, csum), "dx root"
    )
    return DxRoot(hash_version, levels, info_length, node)


def parse_dx_node(raw: bytes, *, block_size: int, csum: bool) -> DxBlock:
    """Decode an interior dx node (a block that looks like one empty directory record)."""
    b = bytes(raw)
    if len(b) < block_size:
        raise CorruptionError("dx node: truncated")
    return _entries(b, dir_rec_len(0), dx_node_limit(block_size, csum), "dx node")


def dx_search(node: DxBlock, hash_: int) -> int:
    """Index of the entry whose range holds ``hash_`` (the last with hash <= target)."""
    return max(bisect.bisect_right(node.hashes, hash_, lo=1) - 1, 0)


def readdir_hash_order(keyed: list[tuple[int, int, T]]) -> list[T]:
    """Order ``(major, minor, item)`` as ext4_dx_readdir emits them (fs/ext4/dir.c).

    The kernel stores each entry in an rbtree keyed by (major, minor) hash; an exact collision
    is chained *right after the first* entry with that key (``ext4_htree_store_dirent``), so a
    key seen as a, b, c comes out a, c, b. ``keyed`` is in traversal order (leaf by leaf, each
    block front to back).
    """
    groups: dict[tuple[int, int], list[T]] = {}
    for major, minor, item in keyed:
        groups.setdefault((major, minor), []).append(item)
    out: list[T] = []
    for key in sorted(groups):
        chain = groups[key]
        out.append(chain[0])
        out.extend(reversed(chain[1:]))
    return out
