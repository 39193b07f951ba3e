"""Extended attributes of a mounted volume: listxattr and getxattr as the kernel answers them.

``Xattrs`` gathers an inode's entries (the inode body first, then its external block, checked
against its checksum), and reads values stored in their own inode (ea_inode). The formats and
the user-visible view (hidden ``system.data``, ACLs) are ext4/xattr.py's; inodes and maps come
from the ``Volume`` this object belongs to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncfs.engine.interfaces import DeviceReader
from asyncfs.errors import CorruptionError
from asyncfs.ext4 import csum, xattr
from asyncfs.ext4 import features as F
from asyncfs.ext4.inode import EXT4_EA_INODE_FL, Inode
from asyncfs.ext4.superblock import GOOD_OLD_INODE_SIZE, Superblock

if TYPE_CHECKING:
    from asyncfs.engine.volume import Volume


def ibody_xattrs(sb: Superblock, inode: Inode) -> list[xattr.XattrEntry]:
    """The entries stored in the inode body (none in 128-byte inodes)."""
    if sb.s_inode_size <= GOOD_OLD_INODE_SIZE:
        return []
    return xattr.parse_ibody_xattrs(
        inode.raw,
        sb.s_inode_size,
        inode.i_extra_isize,
        ea_inode_feature=sb.has_incompat(F.INCOMPAT_EA_INODE),
    )


class Xattrs:
    """The xattr operations of one volume (``vol.xattrs``)."""

    def __init__(self, vol: Volume, reader: DeviceReader) -> None:
        self._vol = vol
        self._reader = reader

    async def entries(self, ino: int) -> list[xattr.XattrEntry]:
        """All xattr entries of ``ino``: the inode body first, then the external block."""
        vol = self._vol
        sb = vol.sb
        inode = await vol.inode(ino)
        entries = ibody_xattrs(sb, inode)
        blk = inode.i_file_acl
        if blk:
            if blk >= vol.blocks_count or blk <= sb.s_first_data_block:
                raise CorruptionError(f"inode {ino}: xattr block {blk} outside the filesystem")
            raw = bytes(await self._reader.read_dev(blk * vol.block_size, vol.block_size))
            if vol.verify_csum and not csum.verify_xattr_block(raw, blk, vol.csum_seed):
                raise vol.bad_csum(f"inode {ino}: xattr block {blk}")
            entries += xattr.parse_xattr_block(
                raw, blk, ea_inode_feature=sb.has_incompat(F.INCOMPAT_EA_INODE)
            )
        return entries

    async def listxattr(self, ino: int) -> list[bytes]:
        return xattr.list_names(await self.entries(ino))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        entry = xattr.find_xattr(await self.entries(ino), name)
        value = entry.value
        if entry.value_inum:
            value = await self._ea_inode_value(ino, entry)
        return xattr.xattr_value_for_user(entry, value)

    async def _ea_inode_value(self, ino: int, entry: xattr.XattrEntry) -> bytes:
        """A large value stored in its own inode (ea_inode feature)."""
        vol = self._vol
        ea = await vol.inode(entry.value_inum)
        if not ea.has_flag(EXT4_EA_INODE_FL) or not ea.is_reg:
            raise CorruptionError(f"inode {ino}: xattr value inode {ea.ino} is not an EA inode")
        if ea.i_size != entry.value_size:
            raise CorruptionError(f"inode {ino}: xattr value inode {ea.ino} has the wrong size")
        fmap = await vol.fmap(ea)
        data = bytes(await self._reader.read_file(fmap, None, 0, entry.value_size))
        if len(data) != entry.value_size:
            raise CorruptionError(f"inode {ino}: xattr value inode {ea.ino} is short")
        return data
