"""Extended attributes: in-inode and external-block xattr parsing, names, and POSIX ACLs.

Owns the on-disk xattr formats of fs/ext4/xattr.h and the user-visible view of them that
fs/ext4/xattr.c, fs/ext4/acl.c and the VFS give:

* ``parse_ibody_xattrs`` reads the area after ``128 + i_extra_isize`` of a raw inode (magic
  0xEA020000, then entries; value offsets are relative to the first entry);
* ``parse_xattr_block`` reads an external xattr block (32-byte header: h_magic, h_refcount,
  h_blocks, h_hash, h_checksum; value offsets relative to the block start). Its checksum is
  ``csum.verify_xattr_block``'s job;
* both validate exactly what the kernel's ``check_xattrs`` validates and raise
  CorruptionError for anything it would call corrupt (the kernel answers EFSCORRUPTED/EIO);
* ``xattr_name``/``visible`` give the names listxattr shows: the kernel lists only indexes
  with a handler (user 1, POSIX ACLs 2/3, trusted 4, security 6, gnu/Hurd 10); ``system.data``
  (index 7, inline data) and anything else is never listed;
* ``resolve_name``/``find_xattr`` answer getxattr: names no handler claims (``system.data``,
  ``system.richacl``, ``foo.bar``) give NotSupportedError (EOPNOTSUPP, what the kernel
  answers, measured), a claimed but absent name NoAttrError (ENODATA);
* ``xattr_value_for_user`` converts the ext4 ACL format (version 1, short and long entries)
  to the Linux xattr format (version 2, 8-byte entries) as ext4_acl_from_disk +
  posix_acl_to_xattr do. An EA-inode value (``value_inum != 0``) is not read here: the entry
  carries the inode number and the caller fetches ``value_size`` bytes from that inode, then
  checks them with ``verify_ea_inode_value`` (the EA inode's stored hash is its i_atime);
* ``system_data`` finds the inline-data continuation (``system.data``, inode body only).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CorruptionError, InvalidError, NoAttrError, NotSupportedError
from .csum import ext4_chksum
from .inode import EXT4_ROOT_INO
from .superblock import GOOD_OLD_INODE_SIZE

EXT4_XATTR_MAGIC = 0xEA020000
EXT4_XATTR_BLOCK_HEADER_SIZE = 32
EXT4_XATTR_ENTRY_SIZE = 16  # fixed part of struct ext4_xattr_entry, before e_name
EXT4_XATTR_SIZE_MAX = 1 << 24

EXT4_XATTR_INDEX_USER = 1
EXT4_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EXT4_XATTR_INDEX_TRUSTED = 4
EXT4_XATTR_INDEX_LUSTRE = 5
EXT4_XATTR_INDEX_SECURITY = 6
EXT4_XATTR_INDEX_SYSTEM = 7
EXT4_XATTR_INDEX_RICHACL = 8
EXT4_XATTR_INDEX_ENCRYPTION = 9
EXT4_XATTR_INDEX_HURD = 10

XATTR_NAME_POSIX_ACL_ACCESS = b"system.posix_acl_access"
XATTR_NAME_POSIX_ACL_DEFAULT = b"system.posix_acl_default"

# Every index with a name, as debugfs and e2fsprogs spell them.
NAME_PREFIXES: dict[int, bytes] = {
    EXT4_XATTR_INDEX_USER: b"user.",
    EXT4_XATTR_INDEX_POSIX_ACL_ACCESS: XATTR_NAME_POSIX_ACL_ACCESS,
    EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT: XATTR_NAME_POSIX_ACL_DEFAULT,
    EXT4_XATTR_INDEX_TRUSTED: b"trusted.",
    EXT4_XATTR_INDEX_LUSTRE: b"lustre.",
    EXT4_XATTR_INDEX_SECURITY: b"security.",
    EXT4_XATTR_INDEX_SYSTEM: b"system.",
    EXT4_XATTR_INDEX_RICHACL: b"system.richacl",
    EXT4_XATTR_INDEX_ENCRYPTION: b"c",
    EXT4_XATTR_INDEX_HURD: b"gnu.",
}

# Indexes the kernel has an xattr handler for; only these are listed or can be read.
_HANDLED = frozenset(
    {
        EXT4_XATTR_INDEX_USER,
        EXT4_XATTR_INDEX_POSIX_ACL_ACCESS,
        EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT,
        EXT4_XATTR_INDEX_TRUSTED,
        EXT4_XATTR_INDEX_SECURITY,
        EXT4_XATTR_INDEX_HURD,
    }
)
_PREFIX_HANDLERS = (
    (b"user.", EXT4_XATTR_INDEX_USER),
    (b"trusted.", EXT4_XATTR_INDEX_TRUSTED),
    (b"security.", EXT4_XATTR_INDEX_SECURITY),
    (b"gnu.", EXT4_XATTR_INDEX_HURD),
)

_ENTRY = struct.Struct("<BBHIII")  # e_name_len e_name_index e_value_offs e_value_inum ...
_BLOCK_HEADER = struct.Struct("<IIIII")  # h_magic h_refcount h_blocks h_hash h_checksum


@dataclass(frozen=True, slots=True)
class XattrEntry:
    """One ``struct ext4_xattr_entry`` and, unless it lives in an EA inode, its value."""

    name_index: int  # e_name_index
    name: bytes  # e_name (the part after the prefix)
    value_offs: int  # e_value_offs
    value_inum: int  # e_value_inum: the EA inode holding the value, or 0
    value_size: int  # e_value_size
    hash: int  # e_hash
    value: bytes  # the value when value_inum == 0, else b"" (caller reads the EA inode)
    in_inode: bool  # True: from the inode body, False: from the external block


@dataclass(frozen=True, slots=True)
class XattrBlockHeader:
    """``struct ext4_xattr_header`` of an external block."""

    refcount: int
    blocks: int
    hash: int
    checksum: int


def _round4(n: int) -> int:
    return (n + 3) & ~3


def _check_entries(
    buf: bytes, first: int, end: int, value_start: int, in_inode: bool, ea_inode_feature: bool,
    where: str,
) -> list[XattrEntry]:
    """Walk and validate an entry table like the kernel's check_xattrs()."""
    raw: list[tuple[int, int, int, int, int, int, bytes]] = []
    off = first
    while True:
        # IS_LAST_ENTRY: the first 4 bytes of an entry are zero
        if off + 4 > end:
            raise CorruptionError(f"{where}: xattr entries run past the end")
        if buf[off : off + 4] == b"\0\0\0\0":
            break
        if off + EXT4_XATTR_ENTRY_SIZE > end:
            raise CorruptionError(f"{where}: xattr entry out of bounds")
        name_len, index, value_offs, inum, size, e_hash = _ENTRY.unpack_from(buf, off)
        nxt = off + _round4(EXT4_XATTR_ENTRY_SIZE + name_len)
        if nxt >= end:
            raise CorruptionError(f"{where}: xattr e_name out of bounds")
        name = buf[off + EXT4_XATTR_ENTRY_SIZE : off + EXT4_XATTR_ENTRY_SIZE + name_len]
        if b"\0" in name:
            raise CorruptionError(f"{where}: bad xattr e_name length")
        raw.append((index, value_offs, inum, size, e_hash, off, name))
        off = nxt
    names_end = off + 4  # values may not overlap the names or their terminator
    entries: list[XattrEntry] = []
    for index, value_offs, inum, size, e_hash, _eoff, name in raw:
        if inum and not ea_inode_feature:
            raise CorruptionError(f"{where}: xattr in an EA inode without the ea_inode feature")
        if inum == EXT4_ROOT_INO:
            raise CorruptionError(f"{where}: xattr e_value_inum {inum} is invalid")
        if size > EXT4_XATTR_SIZE_MAX:
            raise CorruptionError(f"{where}: xattr e_value_size {size} too large")
        value = b""
        if size and not inum:
            if value_offs > end - value_start:
                raise CorruptionError(f"{where}: xattr e_value out of bounds")
            vstart = value_start + value_offs
            if vstart < names_end or size > end - vstart or _round4(size) > end - vstart:
                raise CorruptionError(f"{where}: overlapping xattr e_value")
            value = bytes(buf[vstart : vstart + size])
        entries.append(
            XattrEntry(index, bytes(name), value_offs, inum, size, e_hash, value, in_inode)
        )
    return entries


def parse_ibody_xattrs(
    raw_inode: bytes, inode_size: int, extra_isize: int, *, ea_inode_feature: bool = True
) -> list[XattrEntry]:
    """Xattrs stored in the inode body (``raw_inode`` is the whole on-disk inode).

    No room for the magic, or no magic, means no in-inode xattrs (the kernel's
    EXT4_STATE_XATTR stays clear): []. ``ea_inode_feature`` is the superblock's ea_inode
    incompat flag; without it an entry pointing at an EA inode is corrupt.
    """
    if len(raw_inode) < inode_size:
        raise CorruptionError(f"inode buffer of {len(raw_inode)} bytes, inode size {inode_size}")
    if extra_isize < 0 or GOOD_OLD_INODE_SIZE + extra_isize > inode_size:
        raise CorruptionError(f"i_extra_isize {extra_isize} does not fit inode size {inode_size}")
    header = GOOD_OLD_INODE_SIZE + extra_isize
    if header + 4 > inode_size:
        return []
    (magic,) = struct.unpack_from("<I", raw_inode, header)
    if magic != EXT4_XATTR_MAGIC:
        return []
    first = header + 4
    return _check_entries(
        raw_inode, first, inode_size, first, True, ea_inode_feature, "in-inode xattrs"
    )


def parse_xattr_block_header(block: bytes, block_nr: int) -> XattrBlockHeader:
    """The header of external xattr block ``block_nr``; checks h_magic and h_blocks == 1."""
    if len(block) < EXT4_XATTR_BLOCK_HEADER_SIZE + 4:
        raise CorruptionError(f"xattr block {block_nr}: too short ({len(block)} bytes)")
    magic, refcount, blocks, h_hash, checksum = _BLOCK_HEADER.unpack_from(block, 0)
    if magic != EXT4_XATTR_MAGIC or blocks != 1:
        raise CorruptionError(f"xattr block {block_nr}: bad header (magic {magic:#x})")
    return XattrBlockHeader(refcount, blocks, h_hash, checksum)


def parse_xattr_block(
    block: bytes, block_nr: int, *, ea_inode_feature: bool = True
) -> list[XattrEntry]:
    """Xattrs of external xattr block ``block_nr`` (``block`` is the whole block)."""
    parse_xattr_block_header(block, block_nr)
    end = len(block) & ~3
    return _check_entries(
        block, EXT4_XATTR_BLOCK_HEADER_SIZE, end, 0, False, ea_inode_feature,
        f"xattr block {block_nr}",
    )


_NAME_HASH_SHIFT = 5
_VALUE_HASH_SHIFT = 16
_M32 = 0xFFFFFFFF


def xattr_entry_hash(name: bytes, value_words: Iterable[int], *, signed: bool = False) -> int:
    """ext4_xattr_hash_entry: e_hash over the name bytes then le32 value words.

    ``signed`` is the variant kernels before 6.2 computed on signed-char machines (bytes >= 0x80
    sign-extended); the kernel accepts either for EA inode entries."""
    h = 0
    for b in name:
        c = (b - 256) & _M32 if signed and b >= 0x80 else b
        h = ((h << _NAME_HASH_SHIFT) & _M32) ^ (h >> (32 - _NAME_HASH_SHIFT)) ^ c
    for w in value_words:
        h = ((h << _VALUE_HASH_SHIFT) & _M32) ^ (h >> (32 - _VALUE_HASH_SHIFT)) ^ (w & _M32)
    return h


def verify_ea_inode_value(
    entry: XattrEntry, value: bytes, ea_inode_hash: int, fs_seed: int
) -> bool:
    """The checks ext4_xattr_inode_verify_hashes makes on a value read from an EA inode:
    crc32c(fs seed, value) equals the hash the EA inode stores (in its i_atime field), and the
    entry's e_hash is the entry hash of the name plus that value hash (either signedness)."""
    if len(value) != entry.value_size:
        return False
    value_hash = ext4_chksum(fs_seed, value)
    if value_hash != ea_inode_hash:
        return False
    return entry.hash in (
        xattr_entry_hash(entry.name, [value_hash]),
        xattr_entry_hash(entry.name, [value_hash], signed=True),
    )


def xattr_name(entry: XattrEntry) -> bytes:
    """The full name (prefix + e_name) listxattr shows, or b"" for an index the kernel has
    no handler for (never listed)."""
    if entry.name_index not in _HANDLED:
        return b""
    return NAME_PREFIXES[entry.name_index] + entry.name


def visible(name: bytes) -> bool:
    """Whether the kernel would list (and let getxattr read) an xattr of this full name.

    ``system.data`` (inline data), ``system.richacl``, ``lustre.*`` and other names without a
    kernel handler are hidden."""
    if name in (XATTR_NAME_POSIX_ACL_ACCESS, XATTR_NAME_POSIX_ACL_DEFAULT):
        return True
    return any(name.startswith(p) for p, _ in _PREFIX_HANDLERS)


def list_names(entries: Iterable[XattrEntry]) -> list[bytes]:
    """The names listxattr returns, in the kernel's order (inode body first, then block)."""
    out = []
    for e in entries:
        n = xattr_name(e)
        if n:
            out.append(n)
    return out


def system_data(entries: Iterable[XattrEntry]) -> XattrEntry | None:
    """The inline-data continuation ``system.data``: looked for in the inode body only, as
    ext4_find_inline_data_nolock does (a copy in an external block does not count)."""
    for e in entries:
        if e.in_inode and e.name_index == EXT4_XATTR_INDEX_SYSTEM and e.name == b"data":
            return e
    return None


def resolve_name(name: bytes) -> tuple[int, bytes]:
    """Map a getxattr name to (e_name_index, e_name) as the VFS handlers do.

    NotSupportedError (EOPNOTSUPP) when no handler claims the name (``system.data``,
    ``system.richacl``, ``os2.x``), InvalidError (EINVAL) for a bare prefix such as ``user.``.
    """
    if name == XATTR_NAME_POSIX_ACL_ACCESS:
        return EXT4_XATTR_INDEX_POSIX_ACL_ACCESS, b""
    if name == XATTR_NAME_POSIX_ACL_DEFAULT:
        return EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT, b""
    for prefix, index in _PREFIX_HANDLERS:
        if name.startswith(prefix):
            if len(name) == len(prefix):
                raise InvalidError(f"xattr name {name!r} has nothing after its prefix")
            return index, name[len(prefix) :]
    raise NotSupportedError(f"xattr namespace of {name!r} not supported")


def find_xattr(entries: Iterable[XattrEntry], name: bytes) -> XattrEntry:
    """The entry getxattr(``name``) reads: the first match, inode body before block."""
    index, suffix = resolve_name(name)
    for e in entries:
        if e.name_index == index and e.name == suffix:
            return e
    raise NoAttrError(f"no xattr {name!r}")


# ext4 on-disk ACL (fs/ext4/acl.h) and the Linux xattr ACL (include/uapi/linux/posix_acl*.h)
EXT4_ACL_VERSION = 0x0001
POSIX_ACL_XATTR_VERSION = 0x0002
ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
_SHORT, _LONG, _HEADER = 4, 8, 4


def _ext4_acl_count(size: int) -> int:
    """Number of entries in an on-disk ACL of ``size`` bytes, or -1 if no count fits."""
    size -= _HEADER
    rest = size - 4 * _SHORT
    if rest < 0:
        return -1 if size % _SHORT else size // _SHORT
    return -1 if rest % _LONG else rest // _LONG + 4


def acl_from_disk(value: bytes) -> list[tuple[int, int, int]]:
    """``(tag, perm, id)`` entries of an ext4 on-disk ACL (id ACL_UNDEFINED_ID for short
    entries). [] means "no ACL" (a header alone). Malformed: CorruptionError (the kernel's
    EINVAL)."""
    if len(value) < _HEADER:
        raise CorruptionError(f"ACL of {len(value)} bytes is shorter than its header")
    (version,) = struct.unpack_from("<I", value, 0)
    if version != EXT4_ACL_VERSION:
        raise CorruptionError(f"ACL version {version} is not {EXT4_ACL_VERSION}")
    count = _ext4_acl_count(len(value))
    if count < 0:
        raise CorruptionError(f"ACL size {len(value)} fits no entry count")
    out: list[tuple[int, int, int]] = []
    off = _HEADER
    for _ in range(count):
        if off + _SHORT > len(value):
            raise CorruptionError("ACL entries run past the value")
        tag, perm = struct.unpack_from("<HH", value, off)
        if tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER):
            out.append((tag, perm, ACL_UNDEFINED_ID))
            off += _SHORT
        elif tag in (ACL_USER, ACL_GROUP):
            if off + _LONG > len(value):
                raise CorruptionError("ACL entries run past the value")
            (ident,) = struct.unpack_from("<I", value, off + 4)
            out.append((tag, perm, ident))
            off += _LONG
        else:
            raise CorruptionError(f"ACL entry tag {tag:#x} is invalid")
    if off != len(value):
        # the count came from the size assuming 4 short entries; other mixes do not add up
        raise CorruptionError("ACL entries do not fill the value exactly")
    return out


def acl_to_xattr(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """The Linux ``system.posix_acl_*`` value: version 2 header, 8-byte entries."""
    out = bytearray(struct.pack("<I", POSIX_ACL_XATTR_VERSION))
    for tag, perm, ident in entries:
        out += struct.pack("<HHI", tag, perm, ident if tag in (ACL_USER, ACL_GROUP) else
                           ACL_UNDEFINED_ID)
    return bytes(out)


def xattr_value_for_user(entry: XattrEntry, value: bytes) -> bytes:
    """The bytes getxattr returns for ``entry`` whose stored value is ``value``.

    POSIX ACL entries are converted to the Linux xattr format; an empty value or an ACL with
    no entries means "no ACL" to the kernel: NoAttrError (ENODATA). Other values as stored.
    """
    if entry.name_index not in (EXT4_XATTR_INDEX_POSIX_ACL_ACCESS,
                                EXT4_XATTR_INDEX_POSIX_ACL_DEFAULT):
        return value
    if not value:
        raise NoAttrError("empty POSIX ACL")
    acl = acl_from_disk(value)
    if not acl:
        raise NoAttrError("POSIX ACL with no entries")
    return acl_to_xattr(acl)
