"""htree (dx) directory lookups: dx_probe down the index, then the leaf search with the
hash-collision continuation of ext4_htree_next_block.

Driven by the Volume through a narrow host interface (read a directory block, check index and
leaf checksums, compare names), so the walk is in one place and testable alone.
"""

from __future__ import annotations

import logging
import struct
from typing import Protocol

from asyncfs.errors import CorruptionError, NoEntryError, NotSupportedError
from asyncfs.ext4.dirent import Dirent
from asyncfs.ext4.dx_hash import DX_HASH_TEA, ext4fs_dirhash
from asyncfs.ext4.features import INCOMPAT_LARGEDIR
from asyncfs.ext4.htree import DxBlock, dx_search, parse_dx_node, parse_dx_root
from asyncfs.ext4.inode import Inode
from asyncfs.ext4.superblock import Superblock

log = logging.getLogger("asyncfs.ext4")


class DxHost(Protocol):
    sb: Superblock
    block_size: int

    async def dir_block_raw(self, inode: Inode, lblk: int) -> bytes | None: ...

    def check_index_block(self, inode: Inode, lblk: int, raw: bytes) -> None: ...

    def is_index_block(self, inode: Inode, lblk: int, raw: bytes) -> bool: ...

    def leaf_block_entries(self, inode: Inode, lblk: int, raw: bytes) -> list[Dirent]: ...

    def name_matches(self, inode: Inode, disk: bytes, name: bytes) -> bool: ...

    def hash_name(self, inode: Inode, name: bytes) -> bytes: ...


async def _read(host: DxHost, inode: Inode, lblk: int, what: str) -> bytes:
    raw = await host.dir_block_raw(inode, lblk)
    if raw is None:
        raise CorruptionError(f"directory inode {inode.ino}: htree {what} block {lblk} is a hole")
    return raw


async def _index_node(host: DxHost, inode: Inode, lblk: int) -> DxBlock:
    raw = await _read(host, inode, lblk, "index")
    if not host.is_index_block(inode, lblk, raw):
        raise CorruptionError(
            f"directory inode {inode.ino}: leaf block {lblk} found instead of index block"
        )
    host.check_index_block(inode, lblk, raw)
    return parse_dx_node(raw, block_size=host.block_size, csum=host.sb.has_metadata_csum)


async def dx_lookup(host: DxHost, inode: Inode, name: bytes) -> int | None:
    """The inode number of ``name`` in indexed directory ``inode``.

    NoEntryError when absent; None when the root is unusable and the kernel would fall back to
    a linear search (ERR_BAD_DX_DIR).
    """
    sb = host.sb
    bs = host.block_size
    root_raw = await _read(host, inode, 0, "root")
    try:
        root = parse_dx_root(
            root_raw, block_size=bs, csum=sb.has_metadata_csum, largedir=_largedir(sb)
        )
    except CorruptionError as err:
        log.warning("directory inode %d: bad htree root (%s), searching linearly", inode.ino, err)
        return None
    host.check_index_block(inode, 0, root_raw)
    version = root.hash_version
    if version <= DX_HASH_TEA:
        version += sb.hash_unsigned
    seed = struct.unpack("<4I", sb.s_hash_seed)
    try:
        major, _minor = ext4fs_dirhash(host.hash_name(inode, name), version, seed)
    except NotSupportedError:
        return None
    # frames: (index block, chosen entry) from the root down; depth bounded by parse_dx_root
    frames: list[tuple[DxBlock, int]] = []
    node = root.node
    for level in range(root.indirect_levels + 1):
        at = dx_search(node, major)
        frames.append((node, at))
        if level < root.indirect_levels:
            node = await _index_node(host, inode, node.blocks[at])
    nblocks = (inode.i_size + bs - 1) // bs
    for _ in range(nblocks + 1):  # every step visits a new leaf: bounded by the directory size
        leaf_parent, at = frames[-1]
        lblk = leaf_parent.blocks[at]
        raw = await _read(host, inode, lblk, "leaf")
        for ent in host.leaf_block_entries(inode, lblk, raw):
            if ent.inode and host.name_matches(inode, ent.name, name):
                return ent.inode
        if not await _next_leaf(host, inode, frames, major):
            break
    raise NoEntryError(f"no entry {name!r}")


def _largedir(sb: Superblock) -> bool:
    return sb.has_incompat(INCOMPAT_LARGEDIR)


async def _next_leaf(
    host: DxHost, inode: Inode, frames: list[tuple[DxBlock, int]], major: int
) -> bool:
    """ext4_htree_next_block: advance to the next leaf only if it continues this hash."""
    i = len(frames) - 1
    while frames[i][1] + 1 >= frames[i][0].count:
        if i == 0:
            return False
        i -= 1
    node, at = frames[i]
    frames[i] = (node, at + 1)
    if (node.hashes[at + 1] & ~1) != major:
        return False
    for j in range(i + 1, len(frames)):
        parent, pat = frames[j - 1]
        frames[j] = (await _index_node(host, inode, parent.blocks[pat]), 0)
    return True
