"""ext2/3/4 feature flags: their names, and which incompatible ones this reader implements.

The kernel refuses a mount when an incompatible feature it does not know is set, and allows a
read-only mount with unknown read-only-compatible features; :func:`check_features` applies the
same rule to what asyncfs implements.
"""

from __future__ import annotations

from asyncfs.errors import UnsupportedFeatureError

# s_feature_compat
COMPAT_DIR_PREALLOC = 0x1
COMPAT_IMAGIC_INODES = 0x2
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_LAZY_BG = 0x40
COMPAT_EXCLUDE_BITMAP = 0x100
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_FAST_COMMIT = 0x400
COMPAT_STABLE_INODES = 0x800
COMPAT_ORPHAN_FILE = 0x1000

# s_feature_incompat
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_HAS_SNAPSHOT = 0x80
RO_COMPAT_QUOTA = 0x100
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_REPLICA = 0x800
RO_COMPAT_READONLY = 0x1000
RO_COMPAT_PROJECT = 0x2000
RO_COMPAT_SHARED_BLOCKS = 0x4000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

COMPAT_NAMES: dict[int, str] = {
    COMPAT_DIR_PREALLOC: "dir_prealloc",
    COMPAT_IMAGIC_INODES: "imagic_inodes",
    COMPAT_HAS_JOURNAL: "has_journal",
    COMPAT_EXT_ATTR: "ext_attr",
    COMPAT_RESIZE_INODE: "resize_inode",
    COMPAT_DIR_INDEX: "dir_index",
    COMPAT_LAZY_BG: "lazy_bg",
    COMPAT_EXCLUDE_BITMAP: "snapshot_bitmap",
    COMPAT_SPARSE_SUPER2: "sparse_super2",
    COMPAT_FAST_COMMIT: "fast_commit",
    COMPAT_STABLE_INODES: "stable_inodes",
    COMPAT_ORPHAN_FILE: "orphan_file",
}

INCOMPAT_NAMES: dict[int, str] = {
    INCOMPAT_COMPRESSION: "compression",
    INCOMPAT_FILETYPE: "filetype",
    INCOMPAT_RECOVER: "needs_recovery",
    INCOMPAT_JOURNAL_DEV: "journal_dev",
    INCOMPAT_META_BG: "meta_bg",
    INCOMPAT_EXTENTS: "extent",
    INCOMPAT_64BIT: "64bit",
    INCOMPAT_MMP: "mmp",
    INCOMPAT_FLEX_BG: "flex_bg",
    INCOMPAT_EA_INODE: "ea_inode",
    INCOMPAT_DIRDATA: "dirdata",
    INCOMPAT_CSUM_SEED: "metadata_csum_seed",
    INCOMPAT_LARGEDIR: "large_dir",
    INCOMPAT_INLINE_DATA: "inline_data",
    INCOMPAT_ENCRYPT: "encrypt",
    INCOMPAT_CASEFOLD: "casefold",
}

RO_COMPAT_NAMES: dict[int, str] = {
    RO_COMPAT_SPARSE_SUPER: "sparse_super",
    RO_COMPAT_LARGE_FILE: "large_file",
    RO_COMPAT_BTREE_DIR: "btree_dir",
    RO_COMPAT_HUGE_FILE: "huge_file",
    RO_COMPAT_GDT_CSUM: "uninit_bg",
    RO_COMPAT_DIR_NLINK: "dir_nlink",
    RO_COMPAT_EXTRA_ISIZE: "extra_isize",
    RO_COMPAT_HAS_SNAPSHOT: "snapshot",
    RO_COMPAT_QUOTA: "quota",
    RO_COMPAT_BIGALLOC: "bigalloc",
    RO_COMPAT_METADATA_CSUM: "metadata_csum",
    RO_COMPAT_REPLICA: "replica",
    RO_COMPAT_READONLY: "read-only",
    RO_COMPAT_PROJECT: "project",
    RO_COMPAT_SHARED_BLOCKS: "shared_blocks",
    RO_COMPAT_VERITY: "verity",
    RO_COMPAT_ORPHAN_PRESENT: "orphan_present",
}

# Incompatible features whose on-disk format this reader decodes. RECOVER is here because a
# read-only mount ignores the journal (with a warning), as `mount -o ro,noload` does.
INCOMPAT_SUPPORTED = (
    INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD
)


def flag_names(value: int, names: dict[int, str]) -> list[str]:
    """Names of the bits set in ``value``; unknown bits as ``FEATURE_0x...``."""
    out: list[str] = []
    bit = 1
    while bit <= value:
        if value & bit:
            out.append(names.get(bit, f"FEATURE_{bit:#x}"))
        bit <<= 1
    return out


def check_features(compat: int, incompat: int, ro_compat: int) -> None:
    """Raise UnsupportedFeatureError naming the first incompatible feature not implemented."""
    del compat, ro_compat  # unknown compat / ro_compat bits are fine for a read-only mount
    missing = incompat & ~INCOMPAT_SUPPORTED
    if missing:
        names = flag_names(missing, INCOMPAT_NAMES)
        raise UnsupportedFeatureError(
            f"unsupported incompatible ext4 feature: {', '.join(names)}"
        )
