"""Volume operations on an ext2/3/4 image: the pure ext4/ decoder driven through the page cache.

``Volume.open`` reads and validates the superblock and group descriptors; the methods answer
what the FUSE layer asks (getattr, lookup, readdir, readlink, open/read, xattrs, statfs) with the
values the kernel's ext4 driver shows for the same image. Every metadata byte comes through
``reader.read_dev`` and every file byte through ``reader.read_file``: nothing here opens a file.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol, overload

import trio

from asyncfs.engine.interfaces import DeviceReader, FileMap
from asyncfs.engine.seen import RecentlySeen
from asyncfs.engine.volume_htree import dx_lookup
from asyncfs.engine.volume_maps import (
    EmptyFileMap,
    ExtentFileMap,
    IndirectFileMap,
    InlineFileMap,
)
from asyncfs.engine.volume_ra import EXT4_DEF_INODE_READAHEAD_BLKS, DeviceReadahead
from asyncfs.errors import (
    ChecksumError,
    CorruptionError,
    ImageError,
    InvalidError,
    IsADirError,
    NoEntryError,
    NoKeyError,
    NotADirError,
    NotSupportedError,
)
from asyncfs.ext4 import casefold, csum, fscrypt, xattr
from asyncfs.ext4 import features as F
from asyncfs.ext4.blockmap import parse_pointer_block
from asyncfs.ext4.dirent import (
    FT_DIR,
    INLINE_DOTDOT_SIZE,
    Dirent,
    parse_dirents,
    rec_len_from_disk,
)
from asyncfs.ext4.dx_hash import DX_HASH_TEA, ext4fs_dirhash
from asyncfs.ext4.extents import ExtentNode, parse_extent_node
from asyncfs.ext4.group import (
    GroupDesc,
    check_group_desc,
    descriptor_block,
    inode_location,
    inode_table_readahead,
    parse_group_desc,
)
from asyncfs.ext4.htree import (
    DxBlock,
    DxRoot,
    parse_dx_node,
    parse_dx_root,
    readdir_hash_order,
)
from asyncfs.ext4.inode import (
    EXT4_CASEFOLD_FL,
    EXT4_EA_INODE_FL,
    EXT4_INDEX_FL,
    Inode,
    inode_attr,
    parse_inode,
)
from asyncfs.ext4.statfs import calculate_overhead, compute_statfs
from asyncfs.ext4.superblock import (
    CHECKSUM_TYPE_CRC32C,
    EXT4_OS_LINUX,
    GOOD_OLD_INODE_SIZE,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    Superblock,
    parse_superblock,
)
from asyncfs.types import Attr, DirEntry, StatFs

log = logging.getLogger("asyncfs.ext4")

EXT4_ROOT_INO = 2
_INODE_CACHE = 8192
_INFO_CACHE = 2048
_READDIR_BATCH = 1000
_NOKEY_DIRS = 32
_EXT4_BOOT_LOADER_INO = 5
_SORTED_DIRS = 64  # hash-ordered listings kept ...
_SORTED_ENTRIES = 500_000  # ... and their entries in all (the newest is always kept)
_MAP_BLOCKS = 1024  # parsed extent / indirect blocks, volume-wide
_DIR_BLOCKS = 1024  # parsed directory blocks (and as many dx blocks / leaf name tables)
_LINEAR_DIRS = 32
_LINEAR_TABLE_MAX = 200_000  # entries; larger directories are scanned per lookup
_MAX_SYMLINK = 4096  # the kernel reads at most one page of a slow symlink

_LOGGED_MAX = 4096  # damaged objects remembered as already reported
_HOLE_WINDOW = 1 << 20  # directory blocks mapped per step when skipping a hole
_MAX_LBLK = 1 << 32  # ext4 logical block numbers are 32 bits
_SCAN_YIELD = 64  # directory blocks parsed between two event-loop checkpoints


@dataclass(slots=True)
class OpenFile:
    """An open regular file: its map and readahead state (``Volume.read`` takes it)."""

    ino: int
    fmap: FileMap
    ra: object | None
    unread: bool = True  # no read yet: the first one may read around a small file


@dataclass(slots=True)
class _InodeInfo:
    """Per-inode things derived with I/O (kept in a bounded cache beside the parsed inode)."""

    inline: bytes | None  # inline data (i_block + system.data) when the inode has it
    fmap: FileMap | None


class _MountCall(Protocol):
    async def __call__(
        self,
        reader: DeviceReader,
        *,
        verify_csum: bool = True,
        device_size: int,
        readahead: bool = True,
    ) -> Volume: ...


class _OpenDispatch:
    """``Volume.open(reader, ...)`` mounts; ``volume.open(ino)`` opens a file.

    The two calls share a name in the interface the FUSE layer and the CLI were written
    against, so the attribute dispatches on class versus instance access.
    """

    @overload
    def __get__(self, obj: None, owner: type[Volume]) -> _MountCall: ...

    @overload
    def __get__(
        self, obj: Volume, owner: type[Volume] | None = None
    ) -> Callable[[int], Coroutine[Any, Any, OpenFile]]: ...

    def __get__(
        self, obj: Volume | None, owner: type[Volume] | None = None
    ) -> _MountCall | Callable[[int], Coroutine[Any, Any, OpenFile]]:
        if obj is None:
            return Volume.mount
        return obj.open_file


class Volume:
    """One mounted ext2/3/4 filesystem, read-only."""

    root_ino = EXT4_ROOT_INO

    def __init__(
        self,
        reader: DeviceReader,
        sb: Superblock,
        gds: list[GroupDesc],
        *,
        verify_csum: bool,
        device_size: int,
        readahead: bool = True,
    ) -> None:
        self._reader = reader
        self.sb = sb
        self._gds = gds
        self._nocsum = not verify_csum
        self.verify_csum = verify_csum and sb.has_metadata_csum
        self.device_size = device_size
        self.block_size = sb.block_size
        self.blocks_count = sb.s_blocks_count
        self._inodes: OrderedDict[int, Inode] = OrderedDict()
        self._attrs: OrderedDict[int, Attr] = OrderedDict()  # FIFO: getattr is the hot path
        self._nokey_dirs: OrderedDict[int, dict[bytes, int]] = OrderedDict()
        self._sorted_dirs: OrderedDict[int, list[DirEntry]] = OrderedDict()
        self._sorted_entries = 0
        self._extent_nodes: OrderedDict[tuple[int, int], ExtentNode] = OrderedDict()
        self._pointer_blocks: OrderedDict[int, array[int]] = OrderedDict()
        self._dir_blocks: OrderedDict[tuple[int, int], list[Dirent]] = OrderedDict()
        self._leaf_names: OrderedDict[tuple[int, int], dict[bytes, int]] = OrderedDict()
        self._dx_blocks: OrderedDict[tuple[int, int], DxRoot | DxBlock] = OrderedDict()
        self._linear_dirs: OrderedDict[int, tuple[dict[bytes, int], tuple[int, ...]]] = (
            OrderedDict()
        )
        self._info: OrderedDict[int, _InodeInfo] = OrderedDict()
        self._ra = DeviceReadahead(reader, device_size, enabled=readahead)
        self._logged = RecentlySeen(_LOGGED_MAX)
        self._parsed_blocks = 0
        self._overhead = 0
        self._filetype = sb.has_incompat(F.INCOMPAT_FILETYPE)
        self._csum_seed = 0
        self._casefold_fs = sb.has_incompat(F.INCOMPAT_CASEFOLD)
        if self._casefold_fs:
            casefold.check_encoding(sb.s_encoding)

    @property
    def device_readahead(self) -> DeviceReadahead:
        """The volume's device readahead state (its counters are read by tests)."""
        return self._ra

    # ---------------------------------------------------------------------------------------
    # mount

    open = _OpenDispatch()

    @classmethod
    async def mount(
        cls,
        reader: DeviceReader,
        *,
        verify_csum: bool = True,
        device_size: int,
        readahead: bool = True,
    ) -> Volume:
        """Read and check the superblock and group descriptors; ImageError if unusable.

        Also reachable as ``Volume.open(reader, ...)`` (see :class:`_OpenDispatch`).
        ``readahead=False`` turns off the device readahead of volume_ra.py (tests compare)."""
        if device_size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
            raise ImageError("image too small to hold an ext2/3/4 superblock")
        raw = await reader.read_dev(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE)
        sb = parse_superblock(raw)
        if sb.s_blocks_count * sb.block_size > device_size:
            raise ImageError(
                f"filesystem is {sb.s_blocks_count * sb.block_size} bytes but the device "
                f"holds only {device_size}"
            )
        vol = cls(
            reader, sb, [], verify_csum=verify_csum, device_size=device_size,
            readahead=readahead,
        )
        vol._init_csum(bytes(raw))
        vol._gds = await vol._read_group_descs()
        if sb.needs_recovery:
            log.warning(
                "filesystem journal needs recovery; mounting read-only without replaying it "
                "(recent changes may be missing)"
            )
        if sb.s_state & 0x2:
            log.warning("filesystem has errors recorded (run e2fsck)")
        journal_blocks = 0
        if sb.has_compat(F.COMPAT_HAS_JOURNAL) and sb.s_journal_inum:
            try:
                jinode = await vol._inode(sb.s_journal_inum)
                journal_blocks = jinode.i_size // sb.block_size
            except (CorruptionError, NoEntryError) as e:
                log.error("can't get journal size: %s", e)
        vol._overhead = calculate_overhead(sb, vol._gds, journal_blocks)
        return vol

    def _init_csum(self, raw_sb: bytes) -> None:
        """Checksum seed; with metadata_csum, the superblock's own checksum and type."""
        sb = self.sb
        self._csum_seed = csum.csum_seed_from_superblock(raw_sb)
        if not sb.has_metadata_csum:
            return
        if sb.s_checksum_type != CHECKSUM_TYPE_CRC32C:
            raise ImageError(f"unknown metadata checksum type {sb.s_checksum_type}")
        if self.verify_csum and not csum.verify_superblock(raw_sb):
            raise ImageError(
                "superblock checksum does not match (run e2fsck, or mount with -o nocsum)"
            )

    async def _read_group_descs(self) -> list[GroupDesc]:
        sb = self.sb
        gds: list[GroupDesc] = []
        for nr in range(sb.gdb_count):
            blk = descriptor_block(sb, nr)
            if blk >= sb.s_blocks_count:
                raise ImageError(f"group descriptor block {blk} outside the filesystem")
            raw = await self._reader.read_dev(blk * sb.block_size, sb.block_size)
            for i in range(sb.desc_per_block):
                group = nr * sb.desc_per_block + i
                if group >= sb.groups_count:
                    break
                d = raw[i * sb.desc_size : (i + 1) * sb.desc_size]
                self._verify_group_desc(group, bytes(d))
                gd = parse_group_desc(bytes(d), sb)
                try:
                    check_group_desc(sb, group, gd)
                except CorruptionError as e:
                    raise ImageError(f"bad group descriptor: {e}") from None
                gds.append(gd)
        return gds

    def _verify_group_desc(self, group: int, raw: bytes) -> None:
        """Group descriptor checksum: a read-only mount only warns, as the kernel does."""
        sb = self.sb
        has_gd_csum = sb.has_metadata_csum or sb.has_ro_compat(F.RO_COMPAT_GDT_CSUM)
        if not has_gd_csum or self._nocsum:
            return
        ok = csum.verify_group_desc(
            raw,
            group,
            fs_seed=self._csum_seed,
            uuid=sb.s_uuid,
            metadata_csum=sb.has_metadata_csum,
            is_64bit=sb.has_incompat(F.INCOMPAT_64BIT),
        )
        if not ok:
            log.warning("checksum for group %d failed", group)

    # ---------------------------------------------------------------------------------------
    # inodes

    async def _inode(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is not None:
            self._inodes.move_to_end(ino)
            return inode
        sb = self.sb
        if not 1 <= ino <= sb.s_inodes_count:
            raise NoEntryError(f"inode {ino} out of range")
        gd = self._gds[(ino - 1) // sb.s_inodes_per_group]
        loc = inode_location(sb, gd, ino)
        if not self._ra.cached(loc):
            # one device request for the table blocks around it, as ext4 reads ahead
            # s_inode_readahead_blks: a walk meets the neighbours next
            await self._ra.blocks(
                inode_table_readahead(sb, gd, ino, EXT4_DEF_INODE_READAHEAD_BLKS),
                sb.block_size,
            )
        raw = bytes(await self._reader.read_dev(loc, sb.s_inode_size))
        self._verify_inode(ino, raw)
        inode = parse_inode(raw, ino, sb)
        if inode.i_links_count == 0 and ino != _EXT4_BOOT_LOADER_INO:
            # __ext4_iget: a deleted or never-used inode; ext4_lookup reports a name that
            # points at one as corruption (with a log line), as we do
            self.log_once(("unused", ino), logging.ERROR,
                          "inode %d is deleted or unused (link count 0)", ino)
            raise CorruptionError(f"inode {ino} is deleted or unused (link count 0)")
        self._inodes[ino] = inode
        if len(self._inodes) > _INODE_CACHE:
            self._inodes.popitem(last=False)
        return inode

    def _inode_seed(self, ino: int, generation: int) -> int:
        return csum.inode_csum_seed(self._csum_seed, ino, generation)

    def log_once(self, key: object, level: int, msg: str, *args: object) -> None:
        """Log a damaged object once, not on every request that meets it: a loop of ``ls``
        over a damaged directory must not grow the log without bound. The set of keys is
        bounded (oldest forgotten first)."""
        if self._logged.add(key):
            log.log(level, msg, *args)

    def _bad_csum(self, what: str) -> ChecksumError:
        self.log_once(("csum", what), logging.ERROR, "%s: checksum invalid", what)
        return ChecksumError(f"{what}: checksum invalid")

    def _verify_inode(self, ino: int, raw: bytes) -> None:
        """Inode checksum (metadata_csum, Linux-created filesystems, as ext4_inode_csum_verify)."""
        if not self.verify_csum or self.sb.s_creator_os != EXT4_OS_LINUX:
            return
        seed = self._inode_seed(ino, csum.inode_generation(raw))
        if not csum.verify_inode(raw, self.sb.s_inode_size, seed):
            raise self._bad_csum(f"inode {ino}")

    async def _inode_info(self, inode: Inode) -> _InodeInfo:
        info = self._info.get(inode.ino)
        if info is not None:
            return info
        inline = await self._inline_data(inode) if inode.has_inline_data else None
        fmap: FileMap | None = None
        if inline is not None:
            fmap = InlineFileMap(inline, inode.i_size)
        elif inode.is_dir or inode.is_reg or inode.is_lnk:
            fmap = self._block_map(inode)
        info = _InodeInfo(inline, fmap)
        self._info[inode.ino] = info
        if len(self._info) > _INFO_CACHE:
            self._info.popitem(last=False)
        return info

    def _block_map(self, inode: Inode) -> FileMap:
        if inode.uses_extents:
            if not self.sb.has_incompat(F.INCOMPAT_EXTENTS):
                raise CorruptionError(f"inode {inode.ino}: extents flag without extent feature")
            return ExtentFileMap(self, inode)
        if inode.has_inline_data:
            # flag set but no system.data: the kernel treats it as having no data
            return EmptyFileMap(inode.i_size)
        return IndirectFileMap(self, inode)

    def _ibody_xattrs(self, inode: Inode) -> list[xattr.XattrEntry]:
        if self.sb.s_inode_size <= GOOD_OLD_INODE_SIZE:
            return []
        return xattr.parse_ibody_xattrs(
            inode.raw,
            self.sb.s_inode_size,
            inode.i_extra_isize,
            ea_inode_feature=self.sb.has_incompat(F.INCOMPAT_EA_INODE),
        )

    async def _inline_data(self, inode: Inode) -> bytes | None:
        """i_block plus the system.data value; None when the xattr is missing (the kernel's
        ext4_has_inline_data() is then false)."""
        for e in self._ibody_xattrs(inode):
            if e.name_index == xattr.EXT4_XATTR_INDEX_SYSTEM and e.name == b"data":
                if e.value_inum:
                    raise CorruptionError(f"inode {inode.ino}: inline data in an EA inode")
                return inode.i_block + e.value
        return None

    async def getattr(self, ino: int) -> Attr:
        attr = self._attrs.get(ino)
        if attr is not None:
            return attr
        inode = await self._inode(ino)
        if inode.has_inline_data and inode.is_reg:
            info = await self._inode_info(inode)
            attr = inode_attr(inode, self.sb, has_inline_data=info.inline is not None)
        else:
            attr = inode_attr(inode, self.sb)
        if inode.is_encrypted and inode.is_lnk:
            # fscrypt_symlink_getattr: st_size is the length of the no-key target
            attr = dataclasses.replace(attr, size=len(await self.readlink(ino)))
        self._attrs[ino] = attr
        if len(self._attrs) > _INODE_CACHE:
            self._attrs.popitem(last=False)
        return attr

    # ---------------------------------------------------------------------------------------
    # mapping blocks (MapHost)

    async def extent_block(
        self, ino: int, generation: int, pblk: int, depth: int
    ) -> ExtentNode:
        """Parsed, checked extent tree block; cached by (inode, block) with its depth."""
        key = (ino, pblk)
        hit = self._extent_nodes.get(key)
        if hit is not None:
            self._extent_nodes.move_to_end(key)
            if hit.depth != depth:
                raise CorruptionError(f"inode {ino}: extent node depth {hit.depth} != {depth}")
            return hit
        if pblk >= self.blocks_count or pblk <= self.sb.s_first_data_block:
            raise CorruptionError(f"inode {ino}: extent block {pblk} outside the filesystem")
        raw = bytes(await self._reader.read_dev(pblk * self.block_size, self.block_size))
        node = parse_extent_node(raw, expect_depth=depth)
        if self.verify_csum and not csum.verify_extent_block(
            raw, self._inode_seed(ino, generation)
        ):
            raise self._bad_csum(f"inode {ino}: extent block {pblk}")
        self._extent_nodes[key] = node
        if len(self._extent_nodes) > _MAP_BLOCKS:
            self._extent_nodes.popitem(last=False)
        return node

    async def pointer_block(self, ino: int, pblk: int) -> array[int]:
        """Parsed indirect block (u32 pointers), cached by block number."""
        hit = self._pointer_blocks.get(pblk)
        if hit is not None:
            self._pointer_blocks.move_to_end(pblk)
            return hit
        raw = await self._reader.read_dev(pblk * self.block_size, self.block_size)
        ptrs = parse_pointer_block(bytes(raw))
        self._pointer_blocks[pblk] = ptrs
        if len(self._pointer_blocks) > _MAP_BLOCKS:
            self._pointer_blocks.popitem(last=False)
        return ptrs

    async def _fmap(self, inode: Inode) -> FileMap:
        info = await self._inode_info(inode)
        if info.fmap is None:
            raise InvalidError(f"inode {inode.ino} has no data")
        return info.fmap

    async def _next_dir_block(self, fmap: FileMap, lblk: int, nblocks: int) -> int:
        """``lblk`` if it is mapped, else the next mapped block of the directory (``nblocks``
        if none): a hole is skipped whole, as ext4_readdir skips ``map.m_len`` blocks, so a
        forged i_size costs a few map walks, not a visit per block, and never holds the
        event loop (a checkpoint per window)."""
        blk_of = getattr(fmap, "block", None)
        if lblk >= nblocks or blk_of is None or await blk_of(lblk) is not None:
            return lblk
        bs = self.block_size
        end = min(nblocks, _MAX_LBLK)
        while lblk < end:
            span = min(end - lblk, _HOLE_WINDOW)
            for run in await fmap.map(lblk * bs, span * bs):
                if run.dev_off is not None:
                    return max(lblk, run.file_off // bs)
            lblk += span
            await trio.lowlevel.checkpoint()
        return nblocks

    async def _dir_ranges(self, fmap: FileMap, nblocks: int) -> list[range]:
        """The mapped blocks ``[0, nblocks)`` of a directory as ranges, holes skipped."""
        out: list[range] = []
        lblk = 0
        while (lblk := await self._next_dir_block(fmap, lblk, nblocks)) < nblocks:
            if out and out[-1].stop == lblk:
                out[-1] = range(out[-1].start, lblk + 1)
            else:
                out.append(range(lblk, lblk + 1))
            lblk += 1
            if lblk % (_SCAN_YIELD * 16) == 0:
                await trio.lowlevel.checkpoint()
        return out

    async def _dir_block(self, inode: Inode, fmap: FileMap, lblk: int) -> bytes | None:
        """Directory block ``lblk`` (None for a hole), read as metadata."""
        blk_of = getattr(fmap, "block", None)
        if blk_of is None:  # pragma: no cover - block maps always have block()
            raise CorruptionError(f"inode {inode.ino}: directory without a block map")
        pblk = await blk_of(lblk)
        if pblk is None:
            return None
        return bytes(await self._reader.read_dev(pblk * self.block_size, self.block_size))

    # ---------------------------------------------------------------------------------------
    # directories

    async def _dir_inode(self, ino: int) -> Inode:
        inode = await self._inode(ino)
        if not inode.is_dir:
            raise NotADirError(f"inode {ino} is not a directory")
        return inode

    def _parse(self, buf: bytes, start: int, end: int, ino: int) -> list[Dirent]:
        entries, bad = parse_dirents(
            buf,
            start,
            end,
            block_size=self.block_size,
            inodes_count=self.sb.s_inodes_count,
            filetype=self._filetype,
        )
        if bad is not None:
            self.log_once(("dirent", ino), logging.ERROR, "directory inode %d: %s", ino, bad)
        return entries

    def _is_dx_block(self, inode: Inode, lblk: int, raw: bytes) -> bool:
        """An htree index block (root or node), as __ext4_read_dirblock classifies blocks."""
        if not self._is_dx(inode):
            return False
        if lblk == 0:
            return True
        rec_len = rec_len_from_disk(int.from_bytes(raw[4:6], "little"), self.block_size)
        return rec_len == self.block_size

    def _leaf_entries(self, inode: Inode, lblk: int, raw: bytes) -> list[Dirent]:
        """Entries of one directory block, its checksum checked as the kernel checks it.

        dx index blocks contribute only what the kernel shows of them ("." and ".." of the
        root); a checksum mismatch raises ChecksumError (with a log line).
        """
        if self._is_dx_block(inode, lblk, raw) and (
            lblk == 0 or int.from_bytes(raw[0:4], "little") == 0
        ):
            # an index node's fake record has inode 0; a leaf holding one entry that spans
            # the whole block (no checksum tail) also has rec_len == block size, and its
            # entry must not be lost
            self.check_index_block(inode, lblk, raw)
            if lblk != 0:
                return []
            dots = self._parse(raw, 0, self.block_size, inode.ino)[:2]
            return [e for e in dots if e.name in (b".", b"..")]
        if self.verify_csum and not csum.verify_dir_block(
            raw, self._inode_seed(inode.ino, inode.i_generation)
        ):
            raise self._bad_csum(f"directory inode {inode.ino} block {lblk}")
        return self._parse(raw, 0, self.block_size, inode.ino)

    def _is_dx(self, inode: Inode) -> bool:
        return self.sb.has_compat(F.COMPAT_DIR_INDEX) and inode.has_flag(EXT4_INDEX_FL)

    async def readdir(self, ino: int, off: int) -> list[DirEntry]:
        """Entries after cookie ``off`` (0: from the start), at most about one batch, in the
        kernel's order: hash order for what ext4 treats as a dx directory, else disk order."""
        inode = await self._dir_inode(ino)
        info = await self._inode_info(inode)
        listing = await self._hash_listing(inode, info)
        if listing is not None:
            return listing[off : off + _READDIR_BATCH]
        if info.inline is not None:
            return self._readdir_inline(inode, info.inline, off)
        if info.fmap is None:  # pragma: no cover - directories always get a map
            return []
        bs = self.block_size
        out: list[DirEntry] = []
        nblocks = (inode.i_size + bs - 1) // bs
        lblk, start = divmod(off, bs)
        nokey = await self._nokey_hash_version(inode) if inode.is_encrypted else None
        while lblk < nblocks:
            nxt_lblk = await self._next_dir_block(info.fmap, lblk, nblocks)
            if nxt_lblk != lblk:  # a hole, skipped whole
                lblk, start = nxt_lblk, 0
                if lblk >= nblocks:
                    break
            try:
                entries = await self._block_entries(inode, info.fmap, lblk)
            except ChecksumError:
                # ext4_readdir logs "directory fails checksum" and skips the block
                entries = None
            if entries is not None:
                for e in entries:
                    if e.offset < start or not e.inode or not e.name:
                        continue
                    nxt = lblk * bs + e.offset + e.rec_len
                    name = e.name if nokey is None else self._nokey(e.name, nokey)
                    out.append(DirEntry(name, e.inode, e.file_type, nxt))
            lblk += 1
            start = 0
            if len(out) >= _READDIR_BATCH or (out and lblk < nblocks):
                break
        return out

    def _is_dx_dir(self, inode: Inode, info: Any) -> bool:
        """fs/ext4/dir.c is_dx_dir: readdir takes the hash-ordered path."""
        return self.sb.has_compat(F.COMPAT_DIR_INDEX) and (
            inode.has_flag(EXT4_INDEX_FL)
            or inode.i_size >> (10 + self.sb.s_log_block_size) == 1
            or info.inline is not None
        )

    async def _hash_listing(self, inode: Inode, info: Any) -> list[DirEntry] | None:
        """The whole directory in ext4_dx_readdir's order, cookies = positions; None where the
        kernel lists in disk order (not a dx dir, or an unusable index: ERR_BAD_DX_DIR).

        The order is a property of the image, so it is computed once per directory (bounded
        cache) and a listing in pieces can never repeat or skip an entry.
        """
        if not self._is_dx_dir(inode, info):
            return None
        cached = self._sorted_dirs.get(inode.ino)
        if cached is not None:
            self._sorted_dirs.move_to_end(inode.ino)
            return cached
        sb = self.sb
        seed = struct.unpack("<4I", sb.s_hash_seed)
        version = sb.s_def_hash_version
        # (major, minor, name as stored, inode, file type) in the kernel's traversal order
        keyed: list[tuple[int, int, bytes, int, int]] = []
        dots: list[tuple[bytes, int, int]] = []
        raw_items: list[tuple[bytes, int, int]] = []
        if info.inline is not None:
            parent = int.from_bytes(info.inline[:4], "little")
            raw_items = [(b".", inode.ino, FT_DIR), (b"..", parent, FT_DIR)]
            raw_items += [(e.name, e.inode, e.file_type)
                          for e in self._inline_dirents(inode, info.inline)]
        elif inode.has_flag(EXT4_INDEX_FL):
            try:
                root = await self.dx_block(inode, 0)
                leaves = await self._dx_leaves(inode, root)
            except ChecksumError:
                raise
            except CorruptionError as err:
                self.log_once(("dxlist", inode.ino), logging.WARNING,
                              "directory inode %d: bad htree (%s), listing linearly",
                              inode.ino, err)
                return None
            if not isinstance(root, DxRoot):  # pragma: no cover - block 0 is the root
                return None
            version = root.hash_version
            block0 = await self._block_entries(inode, info.fmap, 0) or []
            dots = [(e.name, e.inode, e.file_type) for e in block0[:2]]
            for lblk in leaves:
                for e in await self._block_entries(inode, info.fmap, lblk) or ():
                    raw_items.append((e.name, e.inode, e.file_type))
        else:
            for e in await self._block_entries(inode, info.fmap, 0) or ():
                raw_items.append((e.name, e.inode, e.file_type))
        if version <= DX_HASH_TEA:
            version += sb.hash_unsigned
        # the root's "." and ".." go in with the fixed hashes 0 and 2 (ext4_htree_fill_tree)
        for (name, ino, ftype), major in zip(dots, (0, 2), strict=False):
            keyed.append((major, 0, name, ino, ftype))
        try:
            for name, ino, ftype in raw_items:
                if ino and name:
                    major, minor = ext4fs_dirhash(self.hash_name(inode, name), version, seed)
                    keyed.append((major, minor, name, ino, ftype))
        except NotSupportedError:
            return None  # a hash we cannot compute (SipHash without the key): disk order
        nokey = await self._nokey_hash_version(inode) if inode.is_encrypted else None
        ordered = readdir_hash_order([(k[0], k[1], k) for k in keyed])
        listing = [
            DirEntry(name if nokey is None else self._nokey(name, nokey), ino, ftype, pos)
            for pos, (_, _, name, ino, ftype) in enumerate(ordered, start=1)
        ]
        self._sorted_dirs[inode.ino] = listing
        self._sorted_entries += len(listing)
        while len(self._sorted_dirs) > 1 and (
            len(self._sorted_dirs) > _SORTED_DIRS or self._sorted_entries > _SORTED_ENTRIES
        ):
            _, old = self._sorted_dirs.popitem(last=False)
            self._sorted_entries -= len(old)
        return listing

    async def _dx_leaves(self, inode: Inode, root: DxRoot | DxBlock) -> list[int]:
        """Leaf blocks of an htree in index order (the order ext4_htree_next_block walks)."""
        if not isinstance(root, DxRoot):  # pragma: no cover - block 0 is the root
            raise CorruptionError(f"directory inode {inode.ino}: no htree root")
        level = list(root.node.blocks[: root.node.count])
        for _ in range(root.indirect_levels):
            nxt: list[int] = []
            for lblk in level:
                node = await self.dx_block(inode, lblk)
                if isinstance(node, DxRoot):
                    raise CorruptionError(f"directory inode {inode.ino}: htree loops to root")
                nxt.extend(node.blocks[: node.count])
            level = nxt
        return level

    async def _nokey_hash_version(self, inode: Inode) -> int:
        """Hash version whose (major, minor) prefix the no-key names of ``inode`` carry, or -1
        for zeros: the kernel's readdir hashes entries whenever it takes the htree path
        (is_dx_dir: dir_index and an index, or a one-block directory)."""
        sb = self.sb
        if not sb.has_compat(F.COMPAT_DIR_INDEX):
            return -1
        if inode.has_flag(EXT4_INDEX_FL):
            raw = await self.dir_block_raw(inode, 0)
            if raw is None:
                return -1
            version = raw[24 + 4]  # dx_root_info.hash_version
        elif inode.i_size >> (10 + sb.s_log_block_size) == 1:
            version = sb.s_def_hash_version
        else:
            return -1
        return version + sb.hash_unsigned if version <= DX_HASH_TEA else version

    def _nokey(self, cipher: bytes, version: int) -> bytes:
        if fscrypt.is_dot_or_dotdot(cipher):
            return cipher
        major = minor = 0
        if version >= 0:
            seed = struct.unpack("<4I", self.sb.s_hash_seed)
            try:
                major, minor = ext4fs_dirhash(cipher, version, seed)
            except (NotSupportedError, CorruptionError):
                major = minor = 0
        return fscrypt.nokey_name(cipher, major, minor)

    async def _encrypted_lookup(self, inode: Inode, fmap: FileMap, name: bytes) -> int:
        """Lookup by no-key name: the presented names of all entries, built once per
        directory (a bounded cache), since no hash of the plaintext name is available."""
        names = self._nokey_dirs.get(inode.ino)
        if names is None:
            version = await self._nokey_hash_version(inode)
            names = {}
            bs = self.block_size
            for lblk in chain.from_iterable(
                await self._dir_ranges(fmap, (inode.i_size + bs - 1) // bs)
            ):
                for e in await self._block_entries(inode, fmap, lblk) or ():
                    if e.inode and e.name:
                        names.setdefault(self._nokey(e.name, version), e.inode)
            self._nokey_dirs[inode.ino] = names
            if len(self._nokey_dirs) > _NOKEY_DIRS:
                self._nokey_dirs.popitem(last=False)
        found = names.get(name)
        if found is None:
            raise NoEntryError(f"no entry {name!r}")
        return found

    def _inline_dirents(self, inode: Inode, data: bytes) -> list[Dirent]:
        # two regions: i_block after the 4-byte parent, then the system.data value
        first = self._parse(data, INLINE_DOTDOT_SIZE, min(60, len(data)), inode.ino)
        second = self._parse(data, 60, len(data), inode.ino) if len(data) > 60 else []
        return first + second

    def _readdir_inline(self, inode: Inode, data: bytes, off: int) -> list[DirEntry]:
        out: list[DirEntry] = []
        parent = int.from_bytes(data[:4], "little")
        if off < 1:
            out.append(DirEntry(b".", inode.ino, FT_DIR, 1))
        if off < 2:
            out.append(DirEntry(b"..", parent, FT_DIR, 2))
        start = max(off, INLINE_DOTDOT_SIZE)
        for e in self._inline_dirents(inode, data):
            if e.offset >= start and e.inode and e.name:
                out.append(DirEntry(e.name, e.inode, e.file_type, e.offset + e.rec_len))
        return out

    async def lookup(self, parent_ino: int, name: bytes) -> Attr:
        ino = await self._lookup_ino(parent_ino, name)
        return await self.getattr(ino)

    async def _lookup_ino(self, parent_ino: int, name: bytes) -> int:
        inode = await self._dir_inode(parent_ino)
        if not name or len(name) > 255 or b"/" in name:
            raise NoEntryError(f"no entry {name!r}")
        info = await self._inode_info(inode)
        if info.inline is not None:
            if name == b".":
                return inode.ino
            if name == b"..":
                return int.from_bytes(info.inline[:4], "little")
            for e in self._inline_dirents(inode, info.inline):
                if e.inode and self._name_eq(inode, e.name, name):
                    return e.inode
            raise NoEntryError(f"no entry {name!r}")
        if info.fmap is None:  # pragma: no cover
            raise NoEntryError(f"no entry {name!r}")
        if inode.is_encrypted and name not in (b".", b".."):
            return await self._encrypted_lookup(inode, info.fmap, name)
        if self._is_dx(inode) and name not in (b".", b".."):
            found = await self._dx_lookup(inode, info.fmap, name)
            if found is not None:
                return found
            # None: the index is unusable (ERR_BAD_DX_DIR), fall back to a linear scan
        bs = self.block_size
        nblocks = (inode.i_size + bs - 1) // bs
        if nblocks > 1 and not self._casefolded(inode):
            return await self._linear_table_lookup(inode, info.fmap, name, nblocks)
        if nblocks == 1 and not self._casefolded(inode):
            # the block's name table (built once, bounded) instead of comparing names one by
            # one; a hole finds nothing, as the scan below would
            if await self._block_entries(inode, info.fmap, 0) is None:
                raise NoEntryError(f"no entry {name!r}")
            found = (await self.leaf_names(inode, 0)).get(name)
            if found is None:
                raise NoEntryError(f"no entry {name!r}")
            return found
        for lblk in chain.from_iterable(await self._dir_ranges(info.fmap, nblocks)):
            for e in await self._block_entries(inode, info.fmap, lblk) or ():
                if e.inode and self._name_eq(inode, e.name, name):
                    return e.inode
        raise NoEntryError(f"no entry {name!r}")

    async def _linear_table_lookup(
        self, inode: Inode, fmap: FileMap, name: bytes, nblocks: int
    ) -> int:
        """Lookup in a multi-block linear directory through a name table built by one scan.

        Without it, ``find``/``tar`` over an ext2 directory of n entries costs n^2 record
        parses. The first record of a name wins, as in a block-order scan; a block that
        fails its checksum makes a miss an error (the kernel's scan would have hit it).
        """
        table = self._linear_dirs.get(inode.ino)
        if table is None:
            names: dict[bytes, int] = {}
            bad: list[int] = []
            for lblk in chain.from_iterable(await self._dir_ranges(fmap, nblocks)):
                try:
                    entries = await self._block_entries(inode, fmap, lblk)
                except ChecksumError:
                    bad.append(lblk)
                    continue
                for e in entries or ():
                    if e.inode and e.name:
                        names.setdefault(e.name, e.inode)
            table = (names, tuple(bad))
            if len(names) <= _LINEAR_TABLE_MAX:
                self._linear_dirs[inode.ino] = table
                if len(self._linear_dirs) > _LINEAR_DIRS:
                    self._linear_dirs.popitem(last=False)
        found = table[0].get(name)
        if found is not None:
            return found
        if table[1]:
            raise ChecksumError(
                f"directory inode {inode.ino} block {table[1][0]}: checksum invalid"
            )
        raise NoEntryError(f"no entry {name!r}")

    def _casefolded(self, inode: Inode) -> bool:
        return self._casefold_fs and inode.has_flag(EXT4_CASEFOLD_FL)

    def _name_eq(self, inode: Inode, disk: bytes, name: bytes) -> bool:
        if self._casefolded(inode):
            return casefold.names_match(disk, name)
        return disk == name

    async def _dx_lookup(self, inode: Inode, fmap: FileMap, name: bytes) -> int | None:
        """htree lookup; the inode number, NoEntryError, or None if the index is unusable."""
        return await dx_lookup(self, inode, name)

    # DxHost (volume_htree.py)

    async def dir_block_raw(self, inode: Inode, lblk: int) -> bytes | None:
        return await self._dir_block(inode, await self._fmap(inode), lblk)

    async def _block_entries(
        self, inode: Inode, fmap: FileMap, lblk: int
    ) -> list[Dirent] | None:
        """Parsed, checked records of directory block ``lblk`` (None: a hole), cached.

        Parsing a block in Python costs far more than reading it from the page cache, and
        find/tar look up every name readdir just listed, so parsed blocks are kept (bounded).
        """
        key = (inode.ino, lblk)
        entries = self._dir_blocks.get(key)
        if entries is not None:
            self._dir_blocks.move_to_end(key)
            return entries
        raw = await self._dir_block(inode, fmap, lblk)
        if raw is None:
            return None
        entries = self._leaf_entries(inode, lblk, raw)
        self._parsed_blocks += 1
        if self._parsed_blocks % _SCAN_YIELD == 0:
            # a scan over many cached blocks never awaits I/O: let other requests run
            await trio.lowlevel.checkpoint()
        self._dir_blocks[key] = entries
        if len(self._dir_blocks) > _DIR_BLOCKS:
            self._dir_blocks.popitem(last=False)
        return entries

    async def dx_block(self, inode: Inode, lblk: int) -> DxRoot | DxBlock:
        key = (inode.ino, lblk)
        node = self._dx_blocks.get(key)
        if node is not None:
            return node
        raw = await self._dir_block(inode, await self._fmap(inode), lblk)
        if raw is None:
            raise CorruptionError(f"directory inode {inode.ino}: htree block {lblk} is a hole")
        if not self._is_dx_block(inode, lblk, raw):
            raise CorruptionError(
                f"directory inode {inode.ino}: leaf block {lblk} found instead of index block"
            )
        self.check_index_block(inode, lblk, raw)
        csum_on = self.sb.has_metadata_csum
        if lblk == 0:
            node = parse_dx_root(
                raw,
                block_size=self.block_size,
                csum=csum_on,
                largedir=self.sb.has_incompat(F.INCOMPAT_LARGEDIR),
            )
        else:
            node = parse_dx_node(raw, block_size=self.block_size, csum=csum_on)
        self._dx_blocks[key] = node
        if len(self._dx_blocks) > _DIR_BLOCKS:
            self._dx_blocks.popitem(last=False)
        return node

    async def leaf_names(self, inode: Inode, lblk: int) -> dict[bytes, int]:
        key = (inode.ino, lblk)
        names = self._leaf_names.get(key)
        if names is None:
            entries = await self._block_entries(inode, await self._fmap(inode), lblk)
            if entries is None:
                raise CorruptionError(f"directory inode {inode.ino}: htree leaf is a hole")
            names = {}
            for e in entries:
                if e.inode and e.name:
                    names.setdefault(e.name, e.inode)
            self._leaf_names[key] = names
            if len(self._leaf_names) > _DIR_BLOCKS:
                self._leaf_names.popitem(last=False)
        return names

    def exact_names(self, inode: Inode) -> bool:
        return not self._casefolded(inode)

    def check_index_block(self, inode: Inode, lblk: int, raw: bytes) -> None:
        if self.verify_csum and not csum.verify_dx_node(
            raw, self._inode_seed(inode.ino, inode.i_generation)
        ):
            raise self._bad_csum(f"directory inode {inode.ino} index block {lblk}")

    def name_matches(self, inode: Inode, disk: bytes, name: bytes) -> bool:
        return self._name_eq(inode, disk, name)

    def hash_name(self, inode: Inode, name: bytes) -> bytes:
        if self._casefolded(inode):
            folded = casefold.casefold(name)
            if folded is not None:
                return folded
        return name

    # ---------------------------------------------------------------------------------------
    # symlinks, files

    async def readlink(self, ino: int) -> bytes:
        inode = await self._inode(ino)
        if not inode.is_lnk:
            raise InvalidError(f"inode {ino} is not a symlink")
        info = await self._inode_info(inode)
        if inode.is_encrypted:
            return await self._encrypted_readlink(inode, info)
        if info.inline is None and self._is_fast_symlink(inode):
            target = inode.i_block[: min(inode.i_size, 59)]
        else:
            fmap = await self._fmap(inode)
            size = min(inode.i_size, _MAX_SYMLINK - 1)
            data = await self._reader.read_file(fmap, None, 0, size)
            target = bytes(data[:size])
        return target.split(b"\0", 1)[0]

    async def _encrypted_readlink(self, inode: Inode, info: _InodeInfo) -> bytes:
        if info.inline is None and self._is_fast_symlink(inode):
            return fscrypt.symlink_target(inode.i_block, len(inode.i_block))
        fmap = await self._fmap(inode)
        size = min(inode.i_size, self.block_size)
        data = bytes(await self._reader.read_file(fmap, None, 0, size))
        return fscrypt.symlink_target(data, self.block_size)

    def _is_fast_symlink(self, inode: Inode) -> bool:
        """ext4_inode_is_fast_symlink."""
        if inode.i_flags & EXT4_EA_INODE_FL:
            return 0 < inode.i_size < 60
        ea_blocks = self.sb.cluster_size >> 9 if inode.i_file_acl else 0
        return inode.i_blocks - ea_blocks == 0

    async def open_file(self, ino: int) -> OpenFile:
        """Open a regular file (``vol.open(ino)`` is the same call)."""
        inode = await self._inode(ino)
        if inode.is_dir:
            raise IsADirError(f"inode {ino} is a directory")
        if not inode.is_reg:
            raise InvalidError(f"inode {ino} is not a regular file")
        if inode.is_encrypted:
            raise NoKeyError(f"inode {ino}: encrypted file content needs the key")
        fmap = await self._fmap(inode)
        return OpenFile(ino, fmap, self._reader.new_readahead())

    async def read(self, handle: OpenFile, off: int, size: int) -> bytes | memoryview:
        if handle.unread:
            handle.unread = False
            await self._ra.small_file(handle.fmap)
        return await self._reader.read_file(handle.fmap, handle.ra, off, size)

    async def file_map(self, ino: int) -> FileMap:
        """The FileMap of a regular file, directory or symlink (for tools and tests)."""
        return await self._fmap(await self._inode(ino))

    # ---------------------------------------------------------------------------------------
    # xattrs

    async def _xattrs(self, ino: int) -> list[xattr.XattrEntry]:
        """All xattr entries of ``ino``: the inode body first, then the external block."""
        inode = await self._inode(ino)
        entries = self._ibody_xattrs(inode)
        blk = inode.i_file_acl
        if blk:
            if blk >= self.blocks_count or blk <= self.sb.s_first_data_block:
                raise CorruptionError(f"inode {ino}: xattr block {blk} outside the filesystem")
            raw = bytes(await self._reader.read_dev(blk * self.block_size, self.block_size))
            if self.verify_csum and not csum.verify_xattr_block(raw, blk, self._csum_seed):
                raise self._bad_csum(f"inode {ino}: xattr block {blk}")
            entries += xattr.parse_xattr_block(
                raw, blk, ea_inode_feature=self.sb.has_incompat(F.INCOMPAT_EA_INODE)
            )
        return entries

    async def listxattr(self, ino: int) -> list[bytes]:
        return xattr.list_names(await self._xattrs(ino))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        entry = xattr.find_xattr(await self._xattrs(ino), name)
        value = entry.value
        if entry.value_inum:
            value = await self._ea_inode_value(ino, entry)
        return xattr.xattr_value_for_user(entry, value)

    async def _ea_inode_value(self, ino: int, entry: xattr.XattrEntry) -> bytes:
        """A large value stored in its own inode (ea_inode feature)."""
        ea = await self._inode(entry.value_inum)
        if not ea.has_flag(EXT4_EA_INODE_FL) or not ea.is_reg:
            raise CorruptionError(f"inode {ino}: xattr value inode {ea.ino} is not an EA inode")
        if ea.i_size != entry.value_size:
            raise CorruptionError(f"inode {ino}: xattr value inode {ea.ino} has the wrong size")
        fmap = await self._fmap(ea)
        data = bytes(await self._reader.read_file(fmap, None, 0, entry.value_size))
        if len(data) != entry.value_size:
            raise CorruptionError(f"inode {ino}: xattr value inode {ea.ino} is short")
        return data

    # ---------------------------------------------------------------------------------------
    # filesystem

    def statfs(self) -> StatFs:
        return compute_statfs(self.sb, self._gds, self._overhead)

    def describe(self) -> dict[str, Any]:
        sb = self.sb
        uuid = sb.s_uuid.hex()
        return {
            "block_size": sb.block_size,
            "cluster_size": sb.cluster_size,
            "inode_size": sb.s_inode_size,
            "blocks": sb.s_blocks_count,
            "inodes": sb.s_inodes_count,
            "groups": sb.groups_count,
            "free_blocks": sum(gd.bg_free_blocks_count for gd in self._gds) << sb.cluster_bits,
            "free_inodes": sum(gd.bg_free_inodes_count for gd in self._gds),
            "label": sb.s_volume_name.decode("utf-8", "replace"),
            "uuid": f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}",
            "features": sb.feature_names(),
            "revision": sb.s_rev_level,
            "needs_recovery": sb.needs_recovery,
            "metadata_csum": sb.has_metadata_csum,
            "verify_csum": self.verify_csum,
            "overhead_clusters": self._overhead,
        }

