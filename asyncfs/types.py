"""Plain values shared across layers (bottom layer, no behaviour).

``Run`` is the contract between the ext4 volume code, which maps a file's byte range onto the
image, and the engine's read path, which fetches those bytes through the page cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Run:
    """One contiguous piece of a file's byte range.

    Exactly one of three cases: ``dev_off`` is set (the bytes live at that offset of the
    filesystem device), ``data`` is set (inline data, served as is), or neither (a hole or an
    uninitialized extent: zeros).
    """

    file_off: int
    length: int
    dev_off: int | None = None
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``stat`` shows for one inode, exactly as the kernel would show it."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int
    blksize: int
    generation: int = 0


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry; ``next_off`` is the readdir cookie that resumes after it."""

    name: bytes
    ino: int
    file_type: int  # ext4 EXT4_FT_* value
    next_off: int


@dataclass(frozen=True, slots=True)
class StatFs:
    """The numbers ``statfs(2)`` returns, as the kernel computes them for the image."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int
