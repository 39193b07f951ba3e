"""The volume's caches of parsed metadata: every bounded map the ext4 operations keep, in one
place, each with its bound and its eviction policy.

Parsing a block in Python costs far more than reading it from the page cache (which holds the
bytes), so the volume keeps what it parsed: inodes, attributes, mapping blocks, directory
blocks and the tables derived from them. Every map is a ``BoundedMap``, so memory does not grow
with the image; a miss only parses again (the bytes come from the page cache). Nothing here
awaits or reads: the volume and its directory operations fill the maps.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from asyncfs.engine.interfaces import FileMap
from asyncfs.ext4.dirent import Dirent
from asyncfs.ext4.extents import ExtentNode
from asyncfs.ext4.htree import DxBlock, DxRoot
from asyncfs.ext4.inode import Inode
from asyncfs.pagecache.boundedmap import BoundedMap
from asyncfs.types import Attr, DirEntry

INODES = 8192  # parsed inodes, and as many attributes
INODE_INFOS = 2048
MAP_BLOCKS = 1024  # parsed extent / indirect blocks, volume-wide
DIR_BLOCKS = 1024  # parsed directory blocks (and as many dx blocks / leaf name tables)
DIR_TABLES = 32  # name tables of whole directories (linear lookups, no-key names)
SORTED_DIRS = 64  # hash-ordered listings kept ...
SORTED_ENTRIES = 500_000  # ... and their entries in all (the newest is always kept)


@dataclass(slots=True)
class InodeInfo:
    """Per-inode things derived from the parsed inode (kept beside it, bounded)."""

    inline: bytes | None  # inline data (i_block + system.data) when the inode has it
    fmap: FileMap | None


class MetaCache:
    """The bounded maps of one mounted volume (see the module docstring)."""

    __slots__ = (
        "attrs",
        "dir_blocks",
        "dx_blocks",
        "extent_nodes",
        "infos",
        "inodes",
        "leaf_names",
        "linear_dirs",
        "nokey_dirs",
        "pointer_blocks",
        "sorted_dirs",
    )

    def __init__(self) -> None:
        # LRU: lookup, readdir and open each fetch their inode, so the directories and files
        # in use are met again and again and must outlive a walk's one-off inodes
        self.inodes: BoundedMap[int, Inode] = BoundedMap(INODES, "lru")
        # FIFO: getattr is the hottest call, so a hit is one plain dict lookup; a miss
        # rebuilds the attributes from the inode map without I/O
        self.attrs: BoundedMap[int, Attr] = BoundedMap(INODES, "fifo")
        # FIFO: a miss rebuilds the info from the cached inode without I/O
        self.infos: BoundedMap[int, InodeInfo] = BoundedMap(INODE_INFOS, "fifo")
        # LRU, by (inode, block): the index blocks near the root are on every map of a large
        # file and must survive the stream of leaves each map walks past
        self.extent_nodes: BoundedMap[tuple[int, int], ExtentNode] = BoundedMap(
            MAP_BLOCKS, "lru")
        # LRU, by block: the double and triple indirect blocks are on every map of the file
        self.pointer_blocks: BoundedMap[int, array[int]] = BoundedMap(MAP_BLOCKS, "lru")
        # LRU, by (inode, block): find and tar look up every name readdir just listed, so the
        # blocks of the directories being walked must stay while the walk goes on
        self.dir_blocks: BoundedMap[tuple[int, int], list[Dirent]] = BoundedMap(
            DIR_BLOCKS, "lru")
        # FIFO: a directory has few index blocks, and a miss parses a cached page again
        self.dx_blocks: BoundedMap[tuple[int, int], DxRoot | DxBlock] = BoundedMap(
            DIR_BLOCKS, "fifo")
        # FIFO: built from dir_blocks (LRU), so a miss costs a dict build, never I/O
        self.leaf_names: BoundedMap[tuple[int, int], dict[bytes, int]] = BoundedMap(
            DIR_BLOCKS, "fifo")
        # FIFO: a directory's lookups come in a burst (find, tar, ls -l) right after its
        # table is built, so insertion order is use order; (names, blocks that failed csum)
        self.linear_dirs: BoundedMap[int, tuple[dict[bytes, int], tuple[int, ...]]] = (
            BoundedMap(DIR_TABLES, "fifo"))
        # FIFO: as linear_dirs, the no-key names of an encrypted directory are looked up in a
        # burst after its listing
        self.nokey_dirs: BoundedMap[int, dict[bytes, int]] = BoundedMap(DIR_TABLES, "fifo")
        # LRU, weighed by entries: a listing is read in batches, one readdir call each, and
        # must stay while it is being read (rebuilding it hashes every name again)
        self.sorted_dirs: BoundedMap[int, list[DirEntry]] = BoundedMap(
            SORTED_DIRS, "lru", weigh=len, max_weight=SORTED_ENTRIES)
