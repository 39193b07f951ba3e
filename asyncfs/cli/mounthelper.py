"""`mount.fuse.asyncfs`: the helper mount(8) runs for `mount -t fuse.asyncfs` and for fstab lines
of type ``fuse.asyncfs``.

mount(8) (util-linux) calls ``/sbin/mount.fuse.asyncfs SOURCE TARGET [-s] [-f] [-n] [-v]
[-o OPTIONS] [-t TYPE] [-N NAMESPACE]``: ``-s`` sloppy (drop options asyncfs does not have),
``-f`` fake (check, do not mount), ``-n`` no mtab (asyncfs writes none anyway), ``-v`` verbose,
``-t`` the full type (given when the helper's name does not already say it), ``-N`` the mount
namespace to mount in. It adds ``rw`` when the options hold no ``ro``, passes some options that
are its own business (``nofail``, ``_netdev``, ``user``) and, for a user mount, runs the helper
as that user, without PATH, with ``noexec,nosuid,nodev`` added.

The helper drops what concerns mount(8) only and hands the rest to `asyncfs mount` itself:
the same option parser, checks and daemon, so a mount made this way is the same mount.
"""

from __future__ import annotations

import ctypes
import getopt
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from asyncfs.cli.main import mount
from asyncfs.cli.messages import one_line
from asyncfs.cli.options import concerns_mount8_only, is_known_option
from asyncfs.errors import AsyncfsError, MountPointError, UsageError

FSTYPE = "fuse.asyncfs"
PROG = "mount.fuse.asyncfs"

# mount(8)'s exit codes, which it passes on from its helper (see mount(8), "RETURN CODES").
EX_USAGE = 1  # incorrect invocation or permissions
EX_FAIL = 32  # mount failure
EX_INTERRUPT = 8

CLONE_NEWNS = 0x00020000  # <sched.h>; os.CLONE_NEWNS exists from Python 3.12 only


@dataclass
class HelperCall:
    """One call of the helper, as mount(8) made it."""

    source: str
    target: str
    options: list[str] = field(default_factory=list)
    sloppy: bool = False
    fake: bool = False
    verbose: bool = False
    fstype: str | None = None
    namespace: str | None = None


def parse_call(argv: Sequence[str]) -> HelperCall:
    """mount(8)'s calling convention; options may come before or after the two paths."""
    try:
        flags, paths = getopt.gnu_getopt(list(argv), "sfnvo:t:N:h")
    except getopt.GetoptError as e:
        raise UsageError(f"{PROG}: {e}") from None
    if any(flag == "-h" for flag, _ in flags):
        raise UsageError(f"usage: {PROG} IMAGE MOUNTPOINT [-sfnv] [-o OPTIONS] "
                         f"(mount(8) runs it for -t {FSTYPE})")
    if len(paths) != 2:
        raise UsageError(f"{PROG} takes IMAGE and MOUNTPOINT, got {len(paths)} paths")
    call = HelperCall(source=paths[0], target=paths[1])
    for flag, value in flags:
        if flag == "-s":
            call.sloppy = True
        elif flag == "-f":
            call.fake = True
        elif flag == "-v":
            call.verbose = True
        elif flag == "-o":
            call.options.append(value)
        elif flag == "-t":
            call.fstype = value
        elif flag == "-N":
            call.namespace = value
        # -n: there is no mtab to leave alone
    return call


def asyncfs_options(groups: Sequence[str], *, sloppy: bool = False) -> list[str]:
    """mount(8)'s option list, reduced to what `asyncfs mount -o` takes."""
    kept: list[str] = []
    for group in groups:
        for raw in group.split(","):
            item = raw.strip()
            if not item or concerns_mount8_only(item):
                continue
            if item == "rw":
                raise UsageError("asyncfs mounts are read-only: option rw is not supported "
                                 "(mount passes rw unless the options say ro: add ro)")
            if sloppy and not is_known_option(item):
                continue
            kept.append(item)
    return kept


def enter_mount_namespace(path: str) -> None:
    """Move into the mount namespace at ``path`` (``-N``), before any check looks at mounts:
    the mount point, /proc/self/mountinfo and the daemon all belong to that namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountPointError(f"mount namespace {path}: {e.strerror}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise MountPointError(f"cannot enter the mount namespace {path}: "
                                  f"{os.strerror(err)}")
    finally:
        os.close(fd)


def run(call: HelperCall) -> int:
    if call.fstype is not None and call.fstype != FSTYPE:
        raise UsageError(f"{PROG} mounts type {FSTYPE}, not {call.fstype}")
    options = asyncfs_options(call.options, sloppy=call.sloppy)
    # setns makes / the working directory: a relative image path means the caller's
    source = os.path.abspath(call.source)
    if call.namespace is not None:
        enter_mount_namespace(call.namespace)
    if call.verbose:
        shown = f" -o {','.join(options)}" if options else ""
        print(f"{PROG}: asyncfs mount {source} {call.target}{shown}"
              + (" (checks only: -f)" if call.fake else ""), file=sys.stderr)
    groups = [",".join(options)] if options else []
    return mount(source, call.target, groups, dry_run=call.fake)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = run(parse_call(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"asyncfs: {one_line(str(e))}", file=sys.stderr)
        return EX_USAGE
    except AsyncfsError as e:
        print(f"asyncfs: {one_line(str(e))}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_INTERRUPT
    return EX_FAIL if code else 0


if __name__ == "__main__":
    raise SystemExit(main())
