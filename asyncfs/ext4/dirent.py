"""Linear directory entries (ext4_dir_entry_2) in a directory block or an inline-data region.

:func:`parse_dirents` walks ``rec_len`` links over a byte range and returns every record
(including unused ones, inode 0, so offsets stay exact for readdir cookies). A record that
fails the kernel's ext4_check_dir_entry stops the walk and is reported, not raised, because the
kernel also keeps what it read before the bad record.
"""

from __future__ import annotations

from dataclasses import dataclass

DIRENT_HEADER = 8
EXT4_NAME_LEN = 255
EXT4_DIR_ROUND = 3

# file_type values (EXT4_FT_*)
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7
FT_MAX = 8
FT_DIR_CSUM = 0xDE  # the fake entry that holds a directory block's checksum tail

DIR_TAIL_SIZE = 12
# inline directories: the first 4 bytes of i_block hold the parent inode ("..")
INLINE_DOTDOT_SIZE = 4


@dataclass(frozen=True, slots=True)
class Dirent:
    """One record: ``offset`` is its position in the buffer given to :func:`parse_dirents`."""

    offset: int
    inode: int
    rec_len: int
    name: bytes
    file_type: int


def dir_rec_len(name_len: int) -> int:
    """Smallest record that holds a name of ``name_len`` bytes (EXT4_DIR_REC_LEN)."""
    return (name_len + DIRENT_HEADER + EXT4_DIR_ROUND) & ~EXT4_DIR_ROUND


def rec_len_from_disk(dlen: int, block_size: int) -> int:
    """ext4_rec_len_from_disk: 64 KiB blocks encode a full-block record specially."""
    if block_size < 65536:
        return dlen
    if dlen in (65535, 0):
        return block_size
    return (dlen & 65532) | ((dlen & 3) << 16)


def parse_dirents(
    buf: bytes,
    start: int,
    end: int,
    *,
    block_size: int,
    inodes_count: int,
    filetype: bool,
) -> tuple[list[Dirent], str | None]:
    """Records in ``buf[start:end]``; the second value names the first bad record, if any."""
    out: list[Dirent] = []
    off = start
    end = min(end, len(buf))
    while off < end:
        if end - off < DIRENT_HEADER:
            return out, f"directory entry header truncated at offset {off}"
        inode = int.from_bytes(buf[off : off + 4], "little")
        rec_len = rec_len_from_disk(int.from_bytes(buf[off + 4 : off + 6], "little"), block_size)
        name_len = buf[off + 6]
        ftype = buf[off + 7] if filetype else FT_UNKNOWN
        if rec_len < dir_rec_len(1):
            return out, f"rec_len {rec_len} too small at offset {off}"
        if rec_len % 4:
            return out, f"rec_len {rec_len} not a multiple of 4 at offset {off}"
        if rec_len < dir_rec_len(name_len):
            return out, f"rec_len {rec_len} too small for name_len {name_len} at offset {off}"
        if off + rec_len > end:
            return out, f"directory entry at offset {off} runs past the block"
        if inode > inodes_count:
            return out, f"inode {inode} out of range at offset {off}"
        out.append(
            Dirent(off, inode, rec_len, bytes(buf[off + 8 : off + 8 + name_len]), ftype)
        )
        off += rec_len
    return out, None


def live(entries: list[Dirent]) -> list[Dirent]:
    """Entries that name something (inode != 0, non-empty name)."""
    return [e for e in entries if e.inode and e.name]
