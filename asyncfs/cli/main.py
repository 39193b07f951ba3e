"""Command line: `asyncfs mount|info|stats|ls|cat`. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import trio

from asyncfs import __version__
from asyncfs.cli import control
from asyncfs.cli.messages import one_line
from asyncfs.cli.mountpoint import check_mountpoint, check_unprivileged_mount
from asyncfs.cli.options import MountOptions, options_help, parse_options, parse_size
from asyncfs.cli.wiring import open_stack
from asyncfs.engine.volume import Volume
from asyncfs.errors import AsyncfsError, ImageError, NoEntryError, UsageError
from asyncfs.io.remote import is_remote_url
from asyncfs.types import Attr


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see asyncfs {self.prog.split()[-1]} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asyncfs", description="Read-only FUSE mounts of ext2/3/4 images.")
    p.add_argument("--version", action="version", version=f"asyncfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount an image read-only", epilog=options_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("image")
    m.add_argument("mountpoint")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    m.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-d", dest="debug", action="store_true", help="foreground with debug logging")

    i = sub.add_parser("info", help="partitions and filesystems of an image")
    i.add_argument("image")

    s = sub.add_parser("stats", help="page-cache counters of a mounted image")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")

    f = sub.add_parser("fault", help="fault injection on a mount made with -o faults (tests)")
    f.add_argument("mountpoint")
    f.add_argument("action", choices=["eio", "clear", "stall", "release"])
    f.add_argument("start", nargs="?", help="eio: first byte of the failing device range")
    f.add_argument("end", nargs="?", help="eio: end (exclusive) of the failing range")

    ls = sub.add_parser("ls", help="list a directory of an image without mounting")
    ls.add_argument("image")
    ls.add_argument("path", nargs="?", default="/")
    ls.add_argument("-o", dest="options", action="append", default=[])

    c = sub.add_parser("cat", help="write a file of an image to stdout without mounting")
    c.add_argument("image")
    c.add_argument("path")
    c.add_argument("-o", dest="options", action="append", default=[])
    return p


def check_image(image: str) -> str:
    if image.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://")):
        return image  # an NBD URI: the connection is the check
    if is_remote_url(image):
        return image  # http(s):// or s3://: the first request is the check
    if not os.path.lexists(image):
        raise ImageError(f"image {image} does not exist")
    if not os.path.exists(image):
        raise ImageError(f"image {image} is a dangling symbolic link (to {os.readlink(image)})")
    if os.path.isdir(image):
        raise ImageError(f"image {image} is a directory, not an image file")
    if not os.access(image, os.R_OK):
        raise ImageError(f"image {image} is not readable")
    return os.path.abspath(image)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except AsyncfsError as e:
        print(f"asyncfs: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "mount":
        return mount(args.image, args.mountpoint, args.options,
                     foreground=args.foreground or args.debug, debug=args.debug)
    if args.cmd == "info":
        return _info(check_image(args.image))
    if args.cmd == "stats":
        return _stats(args.mountpoint, as_json=args.json)
    if args.cmd == "fault":
        return _fault(args)
    if args.cmd == "ls":
        return trio.run(_ls, check_image(args.image), args.path, parse_options(args.options))
    if args.cmd == "cat":
        return trio.run(_cat, check_image(args.image), args.path, parse_options(args.options))
    raise UsageError(f"unknown command {args.cmd}")


def mount(image: str, mountpoint: str, option_groups: list[str], *, foreground: bool = False,
          debug: bool = False, dry_run: bool = False) -> int:
    """`asyncfs mount`, also behind mount(8)'s helper: every check that needs no mount, then
    (unless ``dry_run``) the mount. Raises AsyncfsError for what is wrong before the fork."""
    from asyncfs.cli.daemon import run_mount  # pyfuse3 only where it is needed

    opts = parse_options(option_groups)
    opts.debug = opts.debug or debug
    image = check_image(image)
    mountpoint = check_mountpoint(mountpoint)
    check_unprivileged_mount(opts.fuse_flags)
    if dry_run:
        return 0
    return run_mount(image, mountpoint, opts, foreground=foreground)


def _info(image: str) -> int:
    from asyncfs.io.describe import describe_source

    print(trio.run(describe_source, image).format())
    return 0


def _stats(mountpoint: str, *, as_json: bool) -> int:
    data = control.fetch_stats(mountpoint)
    if as_json:
        print(json.dumps(data, sort_keys=True))
        return 0
    hits, misses = int(data.get("cache_hits", 0)), int(data.get("cache_misses", 0))
    ratio = hits / (hits + misses) if hits + misses else 0.0
    mib = 2**20
    limit = int(data.get("cache_limit_bytes", 0))
    ceiling = int(data.get("cache_max_bytes", limit))
    grown = int(data.get("cache_grown_pages", 0))
    grows = (
        f" (grows to {ceiling / mib:.1f} on refaults; {grown} pages grown)"
        if ceiling > limit or grown else ""
    )
    lines = [
        f"asyncfs {data.get('version', '?')} pid {data.get('pid')}: {data.get('image')} on "
        f"{data.get('mountpoint')}, up {data.get('uptime_s', 0):.0f}s, "
        f"wait={data.get('wait_mode')}",
        f"cache     {int(data.get('cache_bytes', 0)) / mib:.1f} / "
        f"{limit / mib:.1f} MiB{grows} in "
        f"{data.get('pages_cached')} pages ({data.get('frames_mapped', 0)} page frames mapped), "
        f"{hits} hits / {misses} misses ({ratio:.1%}), "
        f"{data.get('evictions')} evictions",
        f"backend   {data.get('backend', '?')}"
        f"{' (' + str(data['backend_note']) + ')' if data.get('backend_note') else ''}: "
        f"{data.get('backend_reads')} reads, "
        f"{int(data.get('backend_bytes', 0)) / mib:.1f} MiB, {data.get('inflight_io')} in flight",
        f"waiters   {data.get('parked_now')} parked now, {data.get('parked_total')} in total, "
        f"{data.get('wakeups', 0)} wakeups",
        f"readahead {data.get('readahead_pages')} pages issued "
        f"({data.get('folios_created', 0)} folios made), {data.get('readahead_used', 0)} used; "
        f"{data.get('device_readahead_windows', 0)} metadata/small-file windows, "
        f"{data.get('refault_around_pages', 0)} pages read back around refaults",
        f"kernel    {data.get('pushed_files', 0)} small files stored into the kernel's cache "
        f"at open, {data.get('backend_nowait_reads', 0)} reads served by the host's cache",
        _requests_line(data),
        *_remote_line(data.get("remote")),
        f"errors    {data.get('requests_failed', 0)} failed requests (log: {data.get('log')})",
    ]
    print("\n".join(lines))
    return 0


def _remote_line(r: dict[str, Any] | None) -> list[str]:
    """What a remote image (http(s)://, s3://) cost: bytes, requests, retries, latency."""
    if not r:
        return []
    changed = f"; CHANGED: {r['object_changed']}" if r.get("object_changed") else ""
    disk = (f", disk cache {r.get('disk_cache_hits', 0)} hits / "
            f"{r.get('disk_cache_stored', 0)} stored / {r.get('disk_cache_dropped', 0)} dropped"
            if "disk_cache_stored" in r else "")
    return [f"remote    {r.get('url')}: {int(r.get('bytes_fetched', 0)) / 2**20:.1f} MiB "
            f"fetched in {r.get('requests')} requests ({r.get('requests_inflight')} in "
            f"flight, {r.get('retries')} retries, {r.get('merged_fetches', 0)} merged), "
            f"latency p50/p90/p99 {r.get('latency_ms_p50')}/{r.get('latency_ms_p90')}/"
            f"{r.get('latency_ms_p99')} ms, {r.get('memory_hits', 0)} memory hits{disk}{changed}"]


def _requests_line(data: dict[str, Any]) -> str:
    at_once, waited = data.get("requests_taken_at_once"), data.get("requests_waited_for")
    if at_once is None or waited is None:
        return "requests  read after pyfuse3's own wait (asyncfs's could not be installed)"
    return (f"requests  {at_once} taken from a non-empty queue at once, "
            f"{waited} after waiting for one")


def _fault(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"op": "fault", "action": args.action}
    if args.action == "eio":
        if args.start is None or args.end is None:
            raise UsageError("fault eio needs START and END (device byte offsets)")
        req["start"] = parse_size(args.start, "start")
        req["end"] = parse_size(args.end, "end")
    print(json.dumps(control.request(args.mountpoint, req), sort_keys=True))
    return 0


MAXSYMLINKS = 40  # as the kernel's path walk


async def _resolve(volume: Volume, path: str, *, follow_last: bool = True) -> Attr:
    """Walk ``path`` inside the image from its root, following symlinks as the kernel would
    (absolute targets start at the image's root)."""
    parts = [p for p in os.fsencode(path).split(b"/") if p]
    stack = [volume.root_ino]  # directories walked so far, for ".."
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == b".":
            continue
        if name == b"..":
            if len(stack) > 1:
                stack.pop()
            continue
        try:
            attr = await volume.lookup(stack[-1], name)
        except NoEntryError:
            raise NoEntryError(f"{path}: no such file or directory in the image") from None
        if stat.S_ISLNK(attr.mode) and (parts or follow_last):
            hops += 1
            if hops > MAXSYMLINKS:
                raise NoEntryError(f"{path}: too many levels of symbolic links")
            target = await volume.readlink(attr.ino)
            if target.startswith(b"/"):
                stack = [volume.root_ino]
            parts = [p for p in target.split(b"/") if p] + parts
            continue
        if parts and not stat.S_ISDIR(attr.mode):
            raise NoEntryError(f"{path}: not a directory in the image")
        stack.append(attr.ino)
    return await volume.getattr(stack[-1])


def _ls_line(name: bytes, a: Attr) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(a.mtime_ns // 10**9))
    size = (f"{os.major(a.rdev)}, {os.minor(a.rdev)}"
            if stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode) else str(a.size))
    return (f"{stat.filemode(a.mode)} {a.nlink:>3} {a.uid:>5} {a.gid:>5} {size:>10} {when} "
            f"{os.fsdecode(name)}")


def _emit(line: str) -> None:
    """One line of output, written like ``cat``'s data (see ``_write_all``)."""
    _write_all(sys.stdout.fileno(), os.fsencode(line + "\n"))


async def _ls(image: str, path: str, opts: MountOptions) -> int:
    sys.stdout.flush()
    async with open_stack(image, opts) as stack:
        vol = stack.volume
        attr = await _resolve(vol, path, follow_last=path.endswith("/"))
        if not stat.S_ISDIR(attr.mode):
            line = _ls_line(os.fsencode(path.rstrip("/").rsplit("/", 1)[-1]), attr)
            if stat.S_ISLNK(attr.mode):
                line += " -> " + os.fsdecode(await vol.readlink(attr.ino))
            _emit(line)
            return 0
        off = 0
        while True:
            batch = await vol.readdir(attr.ino, off)
            if not batch:
                break
            for ent in batch:
                off = ent.next_off
                if ent.name in (b".", b".."):
                    continue
                child = await vol.getattr(ent.ino)
                line = _ls_line(ent.name, child)
                if stat.S_ISLNK(child.mode):
                    line += " -> " + os.fsdecode(await vol.readlink(ent.ino))
                _emit(line)
    return 0


async def _cat(image: str, path: str, opts: MountOptions) -> int:
    async with open_stack(image, opts) as stack:
        vol = stack.volume
        attr = await _resolve(vol, path)
        if stat.S_ISDIR(attr.mode):
            raise UsageError(f"{path} is a directory")
        handle: Any = await vol.open(attr.ino)
        sys.stdout.flush()
        fd = sys.stdout.fileno()
        off, chunk = 0, 1 << 20
        while True:
            data = await vol.read(handle, off, chunk)
            if not data:
                break
            _write_all(fd, data)
            off += len(data)
    return 0


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is out. A blocking write to a pipe returns short when the
    io_uring completion work queued to this thread interrupts it (TIF_NOTIFY_SIGNAL: no signal
    is delivered, the write just stops), and sys.stdout's buffered writer was seen to drop the
    rest of such a write: `asyncfs cat IMG FILE | ...` lost 64 KiB-1 MiB pieces."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]
