"""On-disk inodes: decoding and the exact ``stat`` values the kernel derives from them.

``parse_inode`` turns the ``s_inode_size`` raw bytes into a frozen :class:`Inode`;
``inode_attr`` computes the :class:`asyncfs.types.Attr` the way fs/ext4/inode.c (__ext4_iget,
ext4_getattr, ext4_file_getattr) does: 32-bit ids, extra-epoch timestamps with nanoseconds,
``i_blocks`` with huge_file, old/new device encodings.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from asyncfs.errors import CorruptionError
from asyncfs.ext4 import features as F
from asyncfs.ext4.le import u16 as _u16
from asyncfs.ext4.le import u32 as _u32
from asyncfs.ext4.superblock import GOOD_OLD_INODE_SIZE, Superblock
from asyncfs.types import Attr

# i_flags
EXT4_SECRM_FL = 0x1
EXT4_COMPR_FL = 0x4
EXT4_SYNC_FL = 0x8
EXT4_IMMUTABLE_FL = 0x10
EXT4_APPEND_FL = 0x20
EXT4_NOATIME_FL = 0x80
EXT4_ENCRYPT_FL = 0x800
EXT4_INDEX_FL = 0x1000
EXT4_HUGE_FILE_FL = 0x40000
EXT4_EXTENTS_FL = 0x80000
EXT4_VERITY_FL = 0x100000
EXT4_EA_INODE_FL = 0x200000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_CASEFOLD_FL = 0x40000000

EXT4_N_BLOCKS = 15
I_BLOCK_OFF = 0x28
I_BLOCK_SIZE = 60

_EPOCH_MASK = 0x3
_NSEC_SHIFT = 2

# offsets of fields past the 128-byte base inode, with their sizes
_OFF_EXTRA_ISIZE = 0x80
_OFF_CHECKSUM_HI = 0x82
_OFF_CTIME_EXTRA = 0x84
_OFF_MTIME_EXTRA = 0x88
_OFF_ATIME_EXTRA = 0x8C
_OFF_CRTIME = 0x90
_OFF_CRTIME_EXTRA = 0x94


@dataclass(frozen=True, slots=True)
class Inode:
    """The decoded fields of one inode; ``raw`` keeps the bytes for checksums and xattrs."""

    ino: int
    i_mode: int
    i_uid: int
    i_gid: int
    i_size: int
    i_links_count: int
    i_blocks: int  # in 512-byte units (huge_file applied)
    i_flags: int
    i_block: bytes  # the 60-byte i_block area
    i_generation: int
    i_file_acl: int
    i_extra_isize: int
    i_dtime: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int
    raw: bytes

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.i_mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.i_mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.i_mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.i_mode)

    def has_flag(self, flag: int) -> bool:
        return bool(self.i_flags & flag)

    @property
    def uses_extents(self) -> bool:
        return self.has_flag(EXT4_EXTENTS_FL)

    @property
    def has_inline_data(self) -> bool:
        return self.has_flag(EXT4_INLINE_DATA_FL)

    @property
    def is_encrypted(self) -> bool:
        return self.has_flag(EXT4_ENCRYPT_FL)




def _s32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "little", signed=True)


def _fits(extra_isize: int, off: int, size: int) -> bool:
    """EXT4_FITS_IN_INODE: the field lies within the inode's used extra space."""
    return GOOD_OLD_INODE_SIZE + extra_isize >= off + size


def decode_time_ns(base: int, extra: int | None) -> int:
    """Seconds (signed 32-bit) plus epoch bits and nanoseconds from ``*_extra``, in ns."""
    sec = base
    nsec = 0
    if extra is not None:
        if extra & _EPOCH_MASK:
            sec += (extra & _EPOCH_MASK) << 32
        nsec = (extra & 0xFFFFFFFF) >> _NSEC_SHIFT
    return sec * 1_000_000_000 + nsec


def parse_inode(raw: bytes, ino: int, sb: Superblock) -> Inode:
    """Decode inode ``ino`` from its ``sb.s_inode_size`` raw bytes."""
    isz = sb.s_inode_size
    if len(raw) < isz or isz < GOOD_OLD_INODE_SIZE:
        raise CorruptionError(f"inode {ino}: truncated")
    b = bytes(raw[:isz])
    if isz > GOOD_OLD_INODE_SIZE:
        extra_isize = _u16(b, _OFF_EXTRA_ISIZE)
        if GOOD_OLD_INODE_SIZE + extra_isize > isz or extra_isize & 3:
            raise CorruptionError(
                f"inode {ino}: bad extra_isize ({extra_isize}, inode size {isz})"
            )
    else:
        extra_isize = 0
    mode = _u16(b, 0x0)
    uid = _u16(b, 0x2) | (_u16(b, 0x78) << 16)
    gid = _u16(b, 0x18) | (_u16(b, 0x7A) << 16)
    size = _u32(b, 0x4)
    if sb.has_incompat(F.INCOMPAT_LARGEDIR) or stat.S_ISREG(mode):
        size |= _u32(b, 0x6C) << 32
    flags = _u32(b, 0x20)
    if sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE):
        blocks = _u32(b, 0x1C) | (_u16(b, 0x74) << 32)
        if flags & EXT4_HUGE_FILE_FL:
            blocks <<= sb.s_log_block_size + 1
    else:
        blocks = _u32(b, 0x1C)
    file_acl = _u32(b, 0x68)
    if sb.has_incompat(F.INCOMPAT_64BIT):
        file_acl |= _u16(b, 0x76) << 32

    def extra(off: int) -> int | None:
        return _u32(b, off) if _fits(extra_isize, off, 4) else None

    crtime_ns = 0
    if _fits(extra_isize, _OFF_CRTIME, 4):
        crtime_ns = decode_time_ns(_s32(b, _OFF_CRTIME), extra(_OFF_CRTIME_EXTRA))
    return Inode(
        ino=ino,
        i_mode=mode,
        i_uid=uid,
        i_gid=gid,
        i_size=size,
        i_links_count=_u16(b, 0x1A),
        i_blocks=blocks,
        i_flags=flags,
        i_block=b[I_BLOCK_OFF : I_BLOCK_OFF + I_BLOCK_SIZE],
        i_generation=_u32(b, 0x64),
        i_file_acl=file_acl,
        i_extra_isize=extra_isize,
        i_dtime=_u32(b, 0x14),
        atime_ns=decode_time_ns(_s32(b, 0x8), extra(_OFF_ATIME_EXTRA)),
        mtime_ns=decode_time_ns(_s32(b, 0x10), extra(_OFF_MTIME_EXTRA)),
        ctime_ns=decode_time_ns(_s32(b, 0xC), extra(_OFF_CTIME_EXTRA)),
        crtime_ns=crtime_ns,
        raw=b,
    )


def _makedev(major: int, minor: int) -> int:
    """glibc's makedev: the dev_t userspace sees in st_rdev."""
    return (
        ((major & 0xFFFFF000) << 32)
        | ((major & 0xFFF) << 8)
        | ((minor & 0xFFFFFF00) << 12)
        | (minor & 0xFF)
    )


def inode_rdev(inode: Inode) -> int:
    """st_rdev: device nodes only; i_block[0] holds the old encoding, else i_block[1] the new."""
    if not (stat.S_ISCHR(inode.i_mode) or stat.S_ISBLK(inode.i_mode)):
        return 0
    old = _u32(inode.i_block, 0)
    if old:
        return _makedev((old >> 8) & 0xFF, old & 0xFF)
    new = _u32(inode.i_block, 4)
    return _makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def inode_attr(inode: Inode, sb: Superblock, *, has_inline_data: bool | None = None) -> Attr:
    """The Attr the kernel reports for ``inode``.

    ``has_inline_data`` is the kernel's ext4_has_inline_data() (flag set *and* the system.data
    xattr found); regular files with inline data report at least the sectors their size needs.
    """
    blocks = inode.i_blocks
    inline = inode.has_inline_data if has_inline_data is None else has_inline_data
    if inline and inode.is_reg:
        blocks += (inode.i_size + 511) >> 9
    return Attr(
        ino=inode.ino,
        mode=inode.i_mode,
        nlink=inode.i_links_count,
        uid=inode.i_uid,
        gid=inode.i_gid,
        rdev=inode_rdev(inode),
        size=inode.i_size,
        blocks=blocks,
        atime_ns=inode.atime_ns,
        mtime_ns=inode.mtime_ns,
        ctime_ns=inode.ctime_ns,
        crtime_ns=inode.crtime_ns,
        blksize=sb.block_size,
        generation=inode.i_generation,
    )
