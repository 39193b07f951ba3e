"""One mounted ext2/3/4 filesystem, read-only: the pure ext4/ decoder driven through the cache.

``await Volume.mount(reader, ...)`` reads and checks the superblock and group descriptors and
returns the volume; its methods answer what the FUSE layer asks (getattr, lookup, readdir,
readlink, open/read, xattrs, statfs) with the values the kernel's ext4 driver shows for the
same image. Every metadata byte comes through ``reader.read_dev`` and every file byte through
``reader.read_file``: nothing here opens a file.

This module owns the mount checks, inodes (read, checked, parsed, cached), their file maps and
the mapping blocks those maps ask for (``MapHost``), symlinks, files and statfs. The rest has
its own module, reached through the volume:

* ``vol.dirs`` (engine/dirops.py): readdir, lookups, directory blocks;
* ``vol.xattrs`` (engine/xattrs.py): listxattr, getxattr;
* ``vol.meta`` (engine/metacache.py): every bounded cache of parsed metadata;
* ``vol.device_readahead`` (engine/volume_ra.py): inode-table and small-file readahead.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from array import array
from dataclasses import dataclass
from typing import Any

from asyncfs.engine.dirops import Directories
from asyncfs.engine.interfaces import DeviceReader, FileMap
from asyncfs.engine.metacache import InodeInfo, MetaCache
from asyncfs.engine.seen import RecentlySeen
from asyncfs.engine.volume_maps import (
    EmptyFileMap,
    ExtentFileMap,
    IndirectFileMap,
    InlineFileMap,
)
from asyncfs.engine.volume_ra import EXT4_DEF_INODE_READAHEAD_BLKS, DeviceReadahead
from asyncfs.engine.xattrs import Xattrs, ibody_xattrs
from asyncfs.errors import (
    ChecksumError,
    CorruptionError,
    ImageError,
    InvalidError,
    IsADirError,
    NoEntryError,
    NoKeyError,
)
from asyncfs.ext4 import casefold, csum, fscrypt, xattr
from asyncfs.ext4 import features as F
from asyncfs.ext4.blockmap import parse_pointer_block
from asyncfs.ext4.extents import ExtentNode, parse_extent_node
from asyncfs.ext4.group import (
    GroupDesc,
    check_group_desc,
    descriptor_block,
    inode_location,
    inode_table_readahead,
    parse_group_desc,
)
from asyncfs.ext4.inode import (
    EXT4_BOOT_LOADER_INO,
    EXT4_EA_INODE_FL,
    EXT4_ROOT_INO,
    I_BLOCK_SIZE,
    Inode,
    inode_attr,
    parse_inode,
)
from asyncfs.ext4.statfs import calculate_overhead, compute_statfs
from asyncfs.ext4.superblock import (
    CHECKSUM_TYPE_CRC32C,
    EXT4_OS_LINUX,
    STATE_ERROR_FS,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    Superblock,
    parse_superblock,
)
from asyncfs.types import Attr, DirEntry, StatFs

log = logging.getLogger("asyncfs.ext4")

MAX_SYMLINK = 4096  # the kernel reads at most one page of a slow symlink
_LOGGED_MAX = 4096  # damaged objects remembered as already reported


@dataclass(slots=True)
class OpenFile:
    """An open regular file: its map and readahead state (``Volume.read`` takes it)."""

    ino: int
    fmap: FileMap
    ra: object | None
    unread: bool = True  # no read yet: the first one may read around a small file


class Volume:
    """One mounted ext2/3/4 filesystem, read-only (``await Volume.mount(reader, ...)``)."""

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
        self.csum_seed = 0
        self.meta = MetaCache()
        self._ra = DeviceReadahead(reader, device_size, enabled=readahead)
        self._logged = RecentlySeen(_LOGGED_MAX)
        self._overhead = 0
        if sb.has_incompat(F.INCOMPAT_CASEFOLD):
            casefold.check_encoding(sb.s_encoding)
        self.dirs = Directories(self, reader, self.meta)
        self.xattrs = Xattrs(self, reader)

    @property
    def device_readahead(self) -> DeviceReadahead:
        """The volume's device readahead state (its counters are read by tests)."""
        return self._ra

    # ---------------------------------------------------------------------------------------
    # mount

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
        if sb.s_state & STATE_ERROR_FS:
            log.warning("filesystem has errors recorded (run e2fsck)")
        journal_blocks = 0
        if sb.has_compat(F.COMPAT_HAS_JOURNAL) and sb.s_journal_inum:
            try:
                jinode = await vol.inode(sb.s_journal_inum)
                journal_blocks = jinode.i_size // sb.block_size
            except (CorruptionError, NoEntryError) as e:
                log.error("can't get journal size: %s", e)
        vol._overhead = calculate_overhead(sb, vol._gds, journal_blocks)
        return vol

    def _init_csum(self, raw_sb: bytes) -> None:
        """Checksum seed; with metadata_csum, the superblock's own checksum and type."""
        sb = self.sb
        self.csum_seed = csum.csum_seed_from_superblock(raw_sb)
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
            fs_seed=self.csum_seed,
            uuid=sb.s_uuid,
            metadata_csum=sb.has_metadata_csum,
            is_64bit=sb.has_incompat(F.INCOMPAT_64BIT),
        )
        if not ok:
            log.warning("checksum for group %d failed", group)

    # ---------------------------------------------------------------------------------------
    # damage reports, shared by the directory and xattr operations

    def log_once(self, key: object, level: int, msg: str, *args: object) -> None:
        """Log a damaged object once, not on every request that meets it: a loop of ``ls``
        over a damaged directory must not grow the log without bound. The set of keys is
        bounded (oldest forgotten first)."""
        if self._logged.add(key):
            log.log(level, msg, *args)

    def bad_csum(self, what: str) -> ChecksumError:
        """The error for a checksum mismatch of ``what`` (logged once)."""
        self.log_once(("csum", what), logging.ERROR, "%s: checksum invalid", what)
        return ChecksumError(f"{what}: checksum invalid")

    def inode_seed(self, ino: int, generation: int) -> int:
        """The checksum seed of inode ``ino``'s metadata (inode, extent and directory blocks)."""
        return csum.inode_csum_seed(self.csum_seed, ino, generation)

    # ---------------------------------------------------------------------------------------
    # inodes

    async def inode(self, ino: int) -> Inode:
        """Inode ``ino``, read, checked and parsed (cached); NoEntryError if out of range."""
        inodes = self.meta.inodes
        inode = inodes.get(ino)
        if inode is not None:
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
        if inode.i_links_count == 0 and ino != EXT4_BOOT_LOADER_INO:
            # __ext4_iget: a deleted or never-used inode; ext4_lookup reports a name that
            # points at one as corruption (with a log line), as we do
            self.log_once(("unused", ino), logging.ERROR,
                          "inode %d is deleted or unused (link count 0)", ino)
            raise CorruptionError(f"inode {ino} is deleted or unused (link count 0)")
        inodes.put(ino, inode)
        return inode

    def _verify_inode(self, ino: int, raw: bytes) -> None:
        """Inode checksum (metadata_csum, Linux-created filesystems, as ext4_inode_csum_verify)."""
        if not self.verify_csum or self.sb.s_creator_os != EXT4_OS_LINUX:
            return
        seed = self.inode_seed(ino, csum.inode_generation(raw))
        if not csum.verify_inode(raw, self.sb.s_inode_size, seed):
            raise self.bad_csum(f"inode {ino}")

    async def inode_info(self, inode: Inode) -> InodeInfo:
        """The inode's inline data and file map (cached)."""
        info = self.meta.infos.get(inode.ino)
        if info is not None:
            return info
        inline = await self._inline_data(inode) if inode.has_inline_data else None
        fmap: FileMap | None = None
        if inline is not None:
            fmap = InlineFileMap(inline, inode.i_size)
        elif inode.is_dir or inode.is_reg or inode.is_lnk:
            fmap = self._block_map(inode)
        info = InodeInfo(inline, fmap)
        self.meta.infos.put(inode.ino, info)
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

    async def _inline_data(self, inode: Inode) -> bytes | None:
        """i_block plus the system.data value; None when the xattr is missing (the kernel's
        ext4_has_inline_data() is then false)."""
        e = xattr.system_data(ibody_xattrs(self.sb, inode))
        if e is None:
            return None
        if e.value_inum:
            raise CorruptionError(f"inode {inode.ino}: inline data in an EA inode")
        return inode.i_block + e.value

    async def fmap(self, inode: Inode) -> FileMap:
        """The inode's file map; InvalidError for an inode without data (a device node)."""
        info = await self.inode_info(inode)
        if info.fmap is None:
            raise InvalidError(f"inode {inode.ino} has no data")
        return info.fmap

    async def getattr(self, ino: int) -> Attr:
        attr = self.meta.attrs.get(ino)
        if attr is not None:
            return attr
        inode = await self.inode(ino)
        if inode.has_inline_data and inode.is_reg:
            info = await self.inode_info(inode)
            attr = inode_attr(inode, self.sb, has_inline_data=info.inline is not None)
        else:
            attr = inode_attr(inode, self.sb)
        if inode.is_encrypted and inode.is_lnk:
            # fscrypt_symlink_getattr: st_size is the length of the no-key target
            attr = dataclasses.replace(attr, size=len(await self.readlink(ino)))
        self.meta.attrs.put(ino, attr)
        return attr

    # ---------------------------------------------------------------------------------------
    # mapping blocks (MapHost, for the file maps of volume_maps.py)

    async def extent_block(
        self, ino: int, generation: int, pblk: int, depth: int
    ) -> ExtentNode:
        """Parsed, checked extent tree block; cached by (inode, block) with its depth."""
        key = (ino, pblk)
        hit = self.meta.extent_nodes.get(key)
        if hit is not None:
            if hit.depth != depth:
                raise CorruptionError(f"inode {ino}: extent node depth {hit.depth} != {depth}")
            return hit
        if pblk >= self.blocks_count or pblk <= self.sb.s_first_data_block:
            raise CorruptionError(f"inode {ino}: extent block {pblk} outside the filesystem")
        raw = bytes(await self._reader.read_dev(pblk * self.block_size, self.block_size))
        node = parse_extent_node(raw, expect_depth=depth)
        if self.verify_csum and not csum.verify_extent_block(
            raw, self.inode_seed(ino, generation)
        ):
            raise self.bad_csum(f"inode {ino}: extent block {pblk}")
        self.meta.extent_nodes.put(key, node)
        return node

    async def pointer_block(self, ino: int, pblk: int) -> array[int]:
        """Parsed indirect block (u32 pointers), cached by block number."""
        hit = self.meta.pointer_blocks.get(pblk)
        if hit is not None:
            return hit
        raw = await self._reader.read_dev(pblk * self.block_size, self.block_size)
        ptrs = parse_pointer_block(bytes(raw))
        self.meta.pointer_blocks.put(pblk, ptrs)
        return ptrs

    # ---------------------------------------------------------------------------------------
    # directories and xattrs (their own modules)

    async def readdir(self, ino: int, off: int) -> list[DirEntry]:
        """Entries after cookie ``off`` (0: from the start), about one batch, in the kernel's
        order (see ``Directories.readdir``)."""
        return await self.dirs.readdir(ino, off)

    async def lookup(self, parent_ino: int, name: bytes) -> Attr:
        return await self.getattr(await self.dirs.lookup(parent_ino, name))

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self.xattrs.listxattr(ino)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return await self.xattrs.getxattr(ino, name)

    # ---------------------------------------------------------------------------------------
    # symlinks, files

    async def readlink(self, ino: int) -> bytes:
        inode = await self.inode(ino)
        if not inode.is_lnk:
            raise InvalidError(f"inode {ino} is not a symlink")
        info = await self.inode_info(inode)
        if inode.is_encrypted:
            return await self._encrypted_readlink(inode, info)
        if info.inline is None and self._is_fast_symlink(inode):
            target = inode.i_block[: min(inode.i_size, I_BLOCK_SIZE - 1)]
        else:
            fmap = await self.fmap(inode)
            size = min(inode.i_size, MAX_SYMLINK - 1)
            data = await self._reader.read_file(fmap, None, 0, size)
            target = bytes(data[:size])
        return target.split(b"\0", 1)[0]

    async def _encrypted_readlink(self, inode: Inode, info: InodeInfo) -> bytes:
        if info.inline is None and self._is_fast_symlink(inode):
            return fscrypt.symlink_target(inode.i_block, len(inode.i_block))
        fmap = await self.fmap(inode)
        size = min(inode.i_size, self.block_size)
        data = bytes(await self._reader.read_file(fmap, None, 0, size))
        return fscrypt.symlink_target(data, self.block_size)

    def _is_fast_symlink(self, inode: Inode) -> bool:
        """ext4_inode_is_fast_symlink."""
        if inode.i_flags & EXT4_EA_INODE_FL:
            return 0 < inode.i_size < I_BLOCK_SIZE
        ea_blocks = self.sb.cluster_size >> 9 if inode.i_file_acl else 0
        return inode.i_blocks - ea_blocks == 0

    async def open(self, ino: int) -> OpenFile:
        """Open regular file ``ino`` for ``read``."""
        inode = await self.inode(ino)
        if inode.is_dir:
            raise IsADirError(f"inode {ino} is a directory")
        if not inode.is_reg:
            raise InvalidError(f"inode {ino} is not a regular file")
        if inode.is_encrypted:
            raise NoKeyError(f"inode {ino}: encrypted file content needs the key")
        fmap = await self.fmap(inode)
        return OpenFile(ino, fmap, self._reader.new_readahead())

    async def read(self, handle: OpenFile, off: int, size: int) -> bytes | memoryview:
        if handle.unread:
            handle.unread = False
            await self._ra.small_file(handle.fmap)
        return await self._reader.read_file(handle.fmap, handle.ra, off, size)

    async def file_map(self, ino: int) -> FileMap:
        """The FileMap of a regular file, directory or symlink (for tools and tests)."""
        return await self.fmap(await self.inode(ino))

    # ---------------------------------------------------------------------------------------
    # filesystem

    def statfs(self) -> StatFs:
        return compute_statfs(self.sb, self._gds, self._overhead)

    def describe(self) -> dict[str, Any]:
        sb = self.sb
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
            "uuid": str(uuid.UUID(bytes=sb.s_uuid)),
            "features": sb.feature_names(),
            "revision": sb.s_rev_level,
            "needs_recovery": sb.needs_recovery,
            "metadata_csum": sb.has_metadata_csum,
            "verify_csum": self.verify_csum,
            "overhead_clusters": self._overhead,
        }
