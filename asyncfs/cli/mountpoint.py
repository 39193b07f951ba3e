"""Mount-point checks before mounting, and the FUSE connection behind a mount (for aborts)."""

from __future__ import annotations

import errno
import os
from collections.abc import Collection
from pathlib import Path

from asyncfs.errors import MountPointError, UsageError

FUSE_CONF = "/etc/fuse.conf"
FUSE_DEVICE = "/dev/fuse"


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount point, major:minor, fstype, source) of every mount, from mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and len(rfields) >= 2:
            out.append((_unescape(fields[4]), fields[2], rfields[0], _unescape(rfields[1])))
    return out


def mount_device(path: str) -> str | None:
    """``major:minor`` of the mount at ``path`` (the top one), never touching the mount."""
    found = [dev for mnt, dev, _, _ in _mounts() if mnt == path]
    return found[-1] if found else None


def tune_fuse_connection(mountpoint: str, *, readahead_kb: int, max_background: int) -> list[str]:
    """Raise the kernel's readahead for this FUSE mount (bigger, fewer READs for sequential
    reads) and how many of them it keeps in flight. Root only; returns what could not be set.

    Reads /proc/self/mountinfo for the device number instead of stat()ing the mount point:
    the daemon calls this before it serves, and a stat would be a request to itself.
    """
    dev = mount_device(mountpoint)
    if dev is None:
        return ["mount not found in /proc/self/mountinfo"]
    minor = dev.split(":")[1]
    settings = [
        (Path("/sys/class/bdi") / dev / "read_ahead_kb", readahead_kb),
        (Path("/sys/fs/fuse/connections") / minor / "max_background", max_background),
        (Path("/sys/fs/fuse/connections") / minor / "congestion_threshold",
         max(1, max_background * 3 // 4)),
    ]
    failed = []
    for path, value in settings:
        try:
            path.write_text(f"{value}\n")
        except OSError as e:
            failed.append(f"{path}: {e.strerror}")
    return failed


def mount_entry(path: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount whose mount point is exactly ``path`` (the top one)."""
    found = [(fstype, source) for mnt, _, fstype, source in _mounts() if mnt == path]
    return found[-1] if found else None


def _stale(mountpoint: str, path: str) -> MountPointError:
    return MountPointError(
        f"mount point {mountpoint} is a stale FUSE mount (Transport endpoint is not "
        f"connected): its daemon died; clear it with: fusermount3 -u {path}"
    )


_DEAD_CONNECTION = (errno.ENOTCONN, errno.ECONNABORTED)


def check_mountpoint(mountpoint: str) -> str:
    """Return the canonical mount point, or raise MountPointError with a one-line reason."""
    path = os.path.realpath(mountpoint)
    entry = mount_entry(path)
    if entry is not None:
        if entry[0].startswith("fuse"):
            # statfs is never answered from the kernel's attribute cache, so it reaches the
            # daemon, and a dead daemon's connection answers ENOTCONN (or ECONNABORTED while
            # the kernel is still tearing the connection down).
            try:
                os.statvfs(path)
            except OSError as e:
                if e.errno in _DEAD_CONNECTION:
                    raise _stale(mountpoint, path) from None
        raise MountPointError(
            f"mount point {mountpoint} is busy: {entry[1]} ({entry[0]}) is already mounted there"
        )
    try:
        os.stat(path)
    except FileNotFoundError:
        raise MountPointError(f"mount point {mountpoint} does not exist") from None
    except OSError as e:
        if e.errno in _DEAD_CONNECTION:
            raise _stale(mountpoint, path) from None
        raise MountPointError(f"mount point {mountpoint}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise MountPointError(f"mount point {mountpoint} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK) and os.geteuid() != 0:
        raise MountPointError(f"mount point {mountpoint} is not writable by you")
    return path


def fuse_connection(mountpoint: str) -> Path | None:
    """The /sys/fs/fuse/connections/N directory of the FUSE mount at ``mountpoint``."""
    try:
        dev = os.stat(mountpoint).st_dev
    except OSError:
        return None
    conn = Path("/sys/fs/fuse/connections") / str(os.minor(dev))
    return conn if conn.is_dir() else None


def fuse_conf_allows_other(path: str = FUSE_CONF) -> bool | None:
    """Whether fusermount3 lets ordinary users mount with allow_other/allow_root: a line that is
    exactly ``user_allow_other`` once a ``#`` comment and the surrounding white space are cut
    off. Read as fusermount3 reads it, so the answer is its answer: a last line without its
    newline is not looked at, and a missing file allows nothing. None when the file cannot be
    read here (fusermount3, being setuid, still can: let it decide)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    for raw in text.split(b"\n")[:-1]:
        if raw.split(b"#", 1)[0].strip() == b"user_allow_other":
            return True
    return False


def check_unprivileged_mount(fuse_flags: Collection[str], *, conf: str = FUSE_CONF,
                             device: str = FUSE_DEVICE) -> None:
    """Refuse, before anything is forked, what fusermount3 would refuse an ordinary user:
    its own message would land in the daemon's log, behind a bare "fuse_session_mount
    failed"."""
    if os.geteuid() == 0:
        return
    for flag in ("allow_other", "allow_root"):
        if flag in fuse_flags and fuse_conf_allows_other(conf) is False:
            raise UsageError(f"{flag} needs 'user_allow_other' in {conf} (or mount as root)")
    if os.path.exists(device) and not os.access(device, os.R_OK | os.W_OK):
        mode = os.stat(device).st_mode & 0o777
        raise MountPointError(
            f"{device} is not read-writable by you (mode {mode:04o}); mounting as an ordinary "
            f"user needs it so (Debian makes it 0666), or mount as root"
        )
