"""Opening an image file read-only, and choosing the byte window the filesystem lives in
(``partition=N``, ``offset=/sizelimit=``, or the one ext2/3/4 partition of a whole-disk image).

Sync code: it runs before the event loop (``describe_image``) or in a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from asyncfs.errors import ImageError
from asyncfs.io.fsdetect import Reader, detect_filesystem
from asyncfs.io.partition import Partition, PartitionTableError, parse_partition_table


def open_readonly(path: str) -> tuple[int, int]:
    """(fd, size in bytes) of the image, opened O_RDONLY; ImageError with a one-line reason."""
    try:
        # O_NONBLOCK: opening a FIFO (or a tty) must not wait for a writer; it is cleared
        # again below, once fstat has shown a regular file or block device
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as err:
        raise ImageError(f"{path}: cannot open: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{path}: is a directory, not an image")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ImageError(f"{path}: not a regular file or block device")
        # io_uring and RWF_NOWAIT probes must not see O_NONBLOCK (reads could fail EAGAIN)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        size = os.lseek(fd, 0, os.SEEK_END)  # also right for block devices (st_size is 0)
        if size == 0:
            raise ImageError(f"{path}: image is empty")
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def file_reader(fd: int, limit: int, base: int = 0) -> Reader:
    """A ``read(offset, length)`` over ``[base, base + limit)`` of ``fd`` (blocking pread)."""

    def read(off: int, length: int) -> bytes:
        if off < 0 or off >= limit:
            return b""
        length = min(length, limit - off)
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(fd, length - len(out), base + off + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    return read


def mib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One entry of ``asyncfs info``: a partition (or the whole bare image, number 0)."""

    number: int
    start: int  # bytes
    size: int  # bytes
    type: str
    type_id: str
    name: str
    filesystem: str  # ext2/ext3/ext4/vfat/swap/xfs/btrfs/ntfs/... or "unknown"; "" for a container
    bootable: bool = False
    container: bool = False


@dataclass(frozen=True, slots=True)
class ImageInfo:
    path: str
    size: int
    table: Literal["none", "mbr", "gpt"]
    sector_size: int
    disk_id: str
    partitions: tuple[PartitionInfo, ...]
    warnings: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()  # the image format and its backing chain (qcow2, NBD)

    def format(self) -> str:
        """The text ``asyncfs info`` prints."""
        head = f"{self.path}: {mib(self.size)} ({self.size} bytes), "
        head += "no partition table" if self.table == "none" else (
            f"{self.table.upper()} partition table, {self.sector_size}-byte sectors, "
            f"id {self.disk_id}"
        )
        lines = [head, *self.layers] + [f"warning: {w}" for w in self.warnings]
        lines.append(f"{'#':>3} {'start':>14} {'size':>14} {'':>10}  {'type':<24} "
                     f"{'filesystem':<11} name")
        for p in self.partitions:
            lines.append(
                f"{p.number:>3} {p.start:>14} {p.size:>14} {mib(p.size):>10}  {p.type:<24} "
                f"{p.filesystem or '-':<11} {p.name}"
            )
        return "\n".join(lines)


def sub_reader(read: Reader, base: int, limit: int) -> Reader:
    """``read`` seen through the window ``[base, base + limit)``."""

    def sub(off: int, length: int) -> bytes:
        if off < 0 or off >= limit:
            return b""
        return read(base + off, min(length, limit - off))

    return sub


def _fs_of(read: Reader, disk_size: int, p: Partition) -> str:
    if p.container:
        return ""
    limit = max(0, min(p.size, disk_size - p.start))
    return detect_filesystem(sub_reader(read, p.start, limit), limit)


def table_of(read: Reader, size: int, path: str) -> tuple[str, int, str, tuple[Partition, ...],
                                                          tuple[str, ...]]:
    try:
        table = parse_partition_table(read, size)
    except PartitionTableError as err:
        raise ImageError(f"{path}: {err}") from None
    if table is None:
        return "none", 512, "", (), ()
    return table.kind, table.sector_size, table.disk_id, table.partitions, table.warnings


def describe_fd(fd: int, size: int, path: str) -> ImageInfo:
    return describe_reader(file_reader(fd, size), size, path)


def describe_reader(read: Reader, size: int, path: str) -> ImageInfo:
    """``describe_fd`` over any ``read(offset, length)`` of a ``size``-byte disk."""
    kind, ss, disk_id, parts, warnings = table_of(read, size, path)
    if kind == "none":
        whole = PartitionInfo(0, 0, size, "whole image", "", "",
                              detect_filesystem(read, size))
        return ImageInfo(path, size, "none", ss, "", (whole,), warnings)
    infos = tuple(
        PartitionInfo(p.number, p.start, p.size, p.type, p.type_id, p.name,
                      _fs_of(read, size, p), p.bootable, p.container)
        for p in parts
    )
    return ImageInfo(path, size, kind, ss, disk_id, infos, warnings)  # type: ignore[arg-type]


def describe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """The partition table and the filesystem in each partition (sync; for ``asyncfs info``)."""
    p = os.fspath(path)
    fd, size = open_readonly(p)
    try:
        return describe_fd(fd, size, p)
    finally:
        os.close(fd)


def _listing(parts: Sequence[PartitionInfo]) -> str:
    return ", ".join(f"{p.number} ({p.type}, {p.filesystem or 'container'}, {mib(p.size)})"
                     for p in parts)


_EXT = ("ext2", "ext3", "ext4")


def resolve_window(
    fd: int, size: int, path: str, *, partition: int | None, offset: int | None,
    sizelimit: int | None,
) -> tuple[int, int]:
    """(start, length) in bytes of the filesystem inside the image, per the user's choice."""
    return resolve_window_reader(file_reader(fd, size), size, path, partition=partition,
                                 offset=offset, sizelimit=sizelimit)


def resolve_window_reader(
    read: Reader, size: int, path: str, *, partition: int | None, offset: int | None,
    sizelimit: int | None,
) -> tuple[int, int]:
    """``resolve_window`` over any ``read(offset, length)`` of a ``size``-byte disk."""
    if partition is not None and (offset is not None or sizelimit is not None):
        raise ImageError("give either partition=N or offset=/sizelimit=, not both")
    if offset is not None or sizelimit is not None:
        start = offset or 0
        if start < 0:
            raise ImageError(f"offset={start} is negative")
        if start >= size:
            raise ImageError(f"offset={start} is beyond the end of {path} ({size} bytes)")
        length = size - start
        if sizelimit is not None:
            if sizelimit <= 0:
                raise ImageError(f"sizelimit={sizelimit} must be positive")
            length = min(length, sizelimit)  # as losetup: the window ends at the file's end
        return start, length
    info = describe_reader(read, size, path)
    if info.table == "none":
        if partition is not None:
            raise ImageError(f"{path} has no partition table, so partition={partition} "
                             "does not exist")
        return 0, size
    data = [p for p in info.partitions if not p.container]
    if partition is not None:
        match = [p for p in info.partitions if p.number == partition]
        if not match:
            raise ImageError(f"{path} has no partition {partition}; it has: "
                             f"{_listing(info.partitions) or 'none'}")
        chosen = match[0]
        if chosen.container:
            raise ImageError(f"partition {partition} of {path} is an extended partition "
                             "(a container of logical partitions 5 and up)")
    else:
        ext = [p for p in data if p.filesystem in _EXT]
        if len(ext) > 1:
            raise ImageError(f"{path} holds several ext2/3/4 partitions; choose one with "
                             f"partition=N: {_listing(ext)}")
        if not ext:
            raise ImageError(f"{path} has no ext2/3/4 partition; partitions: "
                             f"{_listing(info.partitions) or 'none'}")
        chosen = ext[0]
    if chosen.start >= size:
        raise ImageError(f"partition {chosen.number} of {path} starts beyond the end of the "
                         f"image ({chosen.start} >= {size} bytes)")
    return chosen.start, min(chosen.size, size - chosen.start)
