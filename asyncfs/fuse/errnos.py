"""The one table from asyncfs errors to errnos; every FUSE reply for a failure goes through it."""

from __future__ import annotations

import errno

from asyncfs import errors

# Order matters: subclasses before their bases (ChecksumError before CorruptionError).
ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (errors.NoEntryError, errno.ENOENT),
    (errors.NotADirError, errno.ENOTDIR),
    (errors.IsADirError, errno.EISDIR),
    (errors.NoAttrError, errno.ENODATA),
    (errors.NotSupportedError, errno.EOPNOTSUPP),
    (errors.NoKeyError, errno.ENOKEY),
    (errors.InvalidError, errno.EINVAL),
    (errors.WouldBlockError, errno.EAGAIN),
    (errors.ChecksumError, errno.EIO),
    (errors.CorruptionError, errno.EIO),
    (errors.DeviceIOError, errno.EIO),
)


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE reply carries for ``exc``; anything unexpected is EIO."""
    for cls, code in ERRNO_TABLE:
        if isinstance(exc, cls):
            return code
    return errno.EIO
