"""htree (dx) directory lookups: dx_probe down the index, then the leaf search with the
hash-collision continuation of ext4_htree_next_block.

Driven by the volume's directory operations (engine/dirops.py ``Directories``) through a narrow
host interface (parsed index blocks, leaf name tables, name comparison and hashing), so the walk
is in one place and testable alone.
"""

from __future__ import annotations

import logging
import struct
from typing import Protocol

from asyncfs.errors import ChecksumError, CorruptionError, NoEntryError, NotSupportedError
from asyncfs.ext4.dx_hash import DX_HASH_TEA, ext4fs_dirhash
from asyncfs.ext4.htree import DxBlock, DxRoot, dx_search
from asyncfs.ext4.inode import Inode
from asyncfs.ext4.superblock import Superblock

log = logging.getLogger("asyncfs.ext4")


class DxHost(Protocol):
    sb: Superblock
    block_size: int

    async def dx_block(self, inode: Inode, lblk: int) -> DxRoot | DxBlock:
        """Parsed (and checksum-checked) index block; the root for ``lblk`` 0.

        CorruptionError if it is not an index block or fails its checks."""
        ...

    async def leaf_names(self, inode: Inode, lblk: int) -> dict[bytes, int]:
        """name -> inode of the live entries of leaf block ``lblk`` (checksum-checked)."""
        ...

    def name_matches(self, inode: Inode, disk: bytes, name: bytes) -> bool: ...

    def hash_name(self, inode: Inode, name: bytes) -> bytes: ...

    def exact_names(self, inode: Inode) -> bool:
        """True when names match byte for byte (so a dict lookup is enough)."""
        ...

    def log_once(self, key: object, level: int, msg: str, *args: object) -> None:
        """Log a damaged object once (not on every lookup that meets it)."""
        ...


async def _index_node(host: DxHost, inode: Inode, lblk: int) -> DxBlock:
    node = await host.dx_block(inode, lblk)
    if isinstance(node, DxRoot):
        raise CorruptionError(f"directory inode {inode.ino}: htree points back to its root")
    return node


async def dx_lookup(host: DxHost, inode: Inode, name: bytes) -> int | None:
    """The inode number of ``name`` in indexed directory ``inode``.

    NoEntryError when absent; None when the root is unusable and the kernel would fall back to
    a linear search (ERR_BAD_DX_DIR).
    """
    sb = host.sb
    bs = host.block_size
    try:
        root = await host.dx_block(inode, 0)
    except ChecksumError:
        raise
    except CorruptionError as err:
        host.log_once(("dxroot", inode.ino), logging.WARNING,
                      "directory inode %d: bad htree root (%s), searching linearly",
                      inode.ino, err)
        return None
    if not isinstance(root, DxRoot):  # pragma: no cover - dx_block(0) always gives the root
        return None
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
    exact = host.exact_names(inode)
    nblocks = (inode.i_size + bs - 1) // bs
    for _ in range(nblocks + 1):  # every step visits a new leaf: bounded by the directory size
        leaf_parent, at = frames[-1]
        names = await host.leaf_names(inode, leaf_parent.blocks[at])
        if exact:
            found = names.get(name)
            if found is not None:
                return found
        else:
            for disk, ino in names.items():
                if host.name_matches(inode, disk, name):
                    return ino
        if not await _next_leaf(host, inode, frames, major):
            break
    raise NoEntryError(f"no entry {name!r}")


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
