"""The project's exception types (bottom layer).

Every error a user can see is one of these; ``str(err)`` is a one-line message fit to print as
is. The FUSE adapter owns the single table that turns them into errnos (``fuse/errnos.py``); the
CLI prints them and exits non-zero. Nothing here imports anything from the project.
"""


class AsyncfsError(Exception):
    """Base class. The message is one line, meant for a user."""


class UsageError(AsyncfsError):
    """A bad command line: unknown or malformed option, wrong argument count."""


class ImageError(AsyncfsError):
    """The image cannot be mounted at all: not ext2/3/4, bad partition choice, truncated."""


class UnsupportedFeatureError(ImageError):
    """An incompatible ext4 feature this implementation does not read."""


class MountPointError(AsyncfsError):
    """The mount point is missing, not a directory, busy, or a stale FUSE mount."""


class CorruptionError(AsyncfsError):
    """One on-disk object is damaged (bad magic, out-of-range pointer, loop). Reads of it: EIO."""


class ChecksumError(CorruptionError):
    """A metadata_csum checksum did not match."""


class DeviceIOError(AsyncfsError):
    """The backing image returned an I/O error (or vanished) for a byte range."""


class WouldBlockError(AsyncfsError):
    """IOCB_NOWAIT: the step needs I/O (or a page lock) and the caller asked not to wait."""


class NoEntryError(AsyncfsError):
    """No such file, directory entry or inode (ENOENT)."""


class NotADirError(AsyncfsError):
    """A directory operation on something that is not a directory (ENOTDIR)."""


class IsADirError(AsyncfsError):
    """A file operation on a directory (EISDIR)."""


class NoAttrError(AsyncfsError):
    """No such extended attribute (ENODATA)."""


class NotSupportedError(AsyncfsError):
    """The object exists but its content cannot be served, e.g. encrypted data (EOPNOTSUPP)."""


class InvalidError(AsyncfsError):
    """A request that makes no sense for the object, e.g. readlink of a regular file (EINVAL)."""


class NoKeyError(AsyncfsError):
    """Encrypted content (or a name) that needs a key asyncfs does not have (ENOKEY)."""
