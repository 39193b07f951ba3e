"""On-disk inodes: decoding and the exact ``stat`` values the kernel derives from them.

``parse_inode`` turns the ``s_inode_size`` raw bytes into a frozen :class:`Inode`;
``inode_attr`` computes the :class:`asyncfs.types.Attr` the way fs/ext4/inode.c (__ext4_iget,
ext4_getattr, ext4_file_getattr) does: 32-bit ids, extra-epoch timestamps with nanoseconds,
``i_blocks`` with huge_file, old/new device encodings.
"""

from __future__ import annotations

import stat
import struct
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

EXT4_ROOT_INO = 2
EXT4_BOOT_LOADER_INO = 5

EXT4_N_BLOCKS = 15
I_BLOCK_OFF = 0x28
I_BLOCK_SIZE = 60

_EPOCH_MASK = 0x3
_NSEC_SHIFT = 2

# offsets of fields past the 128-byte base inode, with their sizes
I_EXTRA_ISIZE_OFF = 0x80
I_CHECKSUM_HI_OFF = 0x82
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


def decode_time_ns(base: int, extra: int | None) -> int:
    """Seconds (signed 32-bit) plus epoch bits and nanoseconds from ``*_extra``, in ns."""
    sec = base
    nsec = 0
    if extra is not None:
        if extra & _EPOCH_MASK:
            sec += (extra & _EPOCH_MASK) << 32
        nsec = (extra & 0xFFFFFFFF) >> _NSEC_SHIFT
    return sec * 1_000_000_000 + nsec


# the 128-byte base inode in one unpack (struct ext4_inode up to l_i_reserved): parsing is on
# the path of every readdirplus entry, and field-by-field reads cost most of its time
_BASE = struct.Struct("<HHIiiiIHHII4x60sIII4xHHHH4x")
# the extra fields (i_extra_isize .. i_crtime_extra), when the inode is large enough for all
_EXTRA = struct.Struct("<HHIIIiI")
_EXTRA_END = _OFF_CRTIME_EXTRA + 4


def parse_inode(raw: bytes, ino: int, sb: Superblock) -> Inode:
    """Decode inode ``ino`` from its ``sb.s_inode_size`` raw bytes."""
    isz = sb.s_inode_size
    if len(raw) < isz or isz < GOOD_OLD_INODE_SIZE:
        raise CorruptionError(f"inode {ino}: truncated")
    b = bytes(raw[:isz])
    (mode, uid_lo, size, atime, ctime, mtime, dtime, gid_lo, links, blocks_lo, flags, i_block,
     generation, file_acl, size_hi, blocks_hi, acl_hi, uid_hi, gid_hi) = _BASE.unpack_from(b)
    ctime_x = mtime_x = atime_x = crtime_x = None
    crtime = None
    if isz > GOOD_OLD_INODE_SIZE:
        if isz >= _EXTRA_END:
            extra_isize, _, c_x, m_x, a_x, cr, cr_x = _EXTRA.unpack_from(b, I_EXTRA_ISIZE_OFF)
        else:
            extra_isize = _u16(b, I_EXTRA_ISIZE_OFF)
        if GOOD_OLD_INODE_SIZE + extra_isize > isz or extra_isize & 3:
            raise CorruptionError(
                f"inode {ino}: bad extra_isize ({extra_isize}, inode size {isz})"
            )
        # EXT4_FITS_IN_INODE: a field counts only within the used extra space (which the
        # check above keeps inside the inode, so the short-inode reads below are in bounds)
        used = GOOD_OLD_INODE_SIZE + extra_isize
        if isz >= _EXTRA_END:
            ctime_x = c_x if used >= _OFF_CTIME_EXTRA + 4 else None
            mtime_x = m_x if used >= _OFF_MTIME_EXTRA + 4 else None
            atime_x = a_x if used >= _OFF_ATIME_EXTRA + 4 else None
            crtime = cr if used >= _OFF_CRTIME + 4 else None
            crtime_x = cr_x if used >= _OFF_CRTIME_EXTRA + 4 else None
        else:
            ctime_x = _u32(b, _OFF_CTIME_EXTRA) if used >= _OFF_CTIME_EXTRA + 4 else None
            mtime_x = _u32(b, _OFF_MTIME_EXTRA) if used >= _OFF_MTIME_EXTRA + 4 else None
            atime_x = _u32(b, _OFF_ATIME_EXTRA) if used >= _OFF_ATIME_EXTRA + 4 else None
            crtime = _s32(b, _OFF_CRTIME) if used >= _OFF_CRTIME + 4 else None
            crtime_x = _u32(b, _OFF_CRTIME_EXTRA) if used >= _OFF_CRTIME_EXTRA + 4 else None
    else:
        extra_isize = 0
    if sb.has_incompat(F.INCOMPAT_LARGEDIR) or stat.S_ISREG(mode):
        size |= size_hi << 32
    if sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE):
        blocks = blocks_lo | (blocks_hi << 32)
        if flags & EXT4_HUGE_FILE_FL:
            blocks <<= sb.s_log_block_size + 1
    else:
        blocks = blocks_lo
    if sb.has_incompat(F.INCOMPAT_64BIT):
        file_acl |= acl_hi << 32
    return Inode(
        ino=ino,
        i_mode=mode,
        i_uid=uid_lo | (uid_hi << 16),
        i_gid=gid_lo | (gid_hi << 16),
        i_size=size,
        i_links_count=links,
        i_blocks=blocks,
        i_flags=flags,
        i_block=i_block,
        i_generation=generation,
        i_file_acl=file_acl,
        i_extra_isize=extra_isize,
        i_dtime=dtime,
        atime_ns=decode_time_ns(atime, atime_x),
        mtime_ns=decode_time_ns(mtime, mtime_x),
        ctime_ns=decode_time_ns(ctime, ctime_x),
        crtime_ns=0 if crtime is None else decode_time_ns(crtime, crtime_x),
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
