"""The fuzz walk: every reachable inode of a mounted Volume once, every operation guarded
by a timeout and classified (an ``AsyncfsError`` with a one-line message is an answer;
anything else is a :class:`CaseFailure`), every read checked against the bytes its file
map names, read straight from the image file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from asyncfs.engine.volume import Volume
from asyncfs.errors import AsyncfsError, NoEntryError
from asyncfs.testing.treewalk import DepthFirst
from asyncfs.types import Run

READ_CHUNK = 128 * 1024
READ_HEAD = 512 * 1024  # bytes read from the start of each file
MAX_DIR_ENTRIES = 20_000
MAX_INODES = 4_000
LOOKUPS_PER_DIR = 64
CHILDREN_PER_DIR = 64


@dataclass
class InodeView:
    """What the walk saw of one inode (the pristine reference stores the same)."""

    attr: Any = None
    reads: dict[int, bytes] = field(default_factory=dict)  # offset -> sha256 of bytes
    link: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None
    names: list[bytes] | None = None
    errors: list[str] = field(default_factory=list)


class CaseFailure(Exception):
    """An oracle caught a bug."""

    def __init__(self, verdict: str, detail: str) -> None:
        super().__init__(f"{verdict}: {detail}")
        self.verdict = verdict
        self.detail = detail


def _sha(b: bytes | memoryview) -> bytes:
    return hashlib.sha256(b).digest()


class Walker:
    """Walks a mounted Volume: every reachable inode once, every operation guarded."""

    def __init__(self, vol: Volume, image: Path, *, op_timeout: float,
                 check_bytes: bool = True) -> None:
        self.vol = vol
        self.op_timeout = op_timeout
        self.check_bytes = check_bytes
        self.seen: dict[int, InodeView] = {}
        self.errors = 0
        self._img = open(image, "rb")  # noqa: SIM115 - closed in close()
        self._img_size = os.fstat(self._img.fileno()).st_size

    def close(self) -> None:
        self._img.close()

    async def _op(self, view: InodeView, what: str, fn: Any, *args: Any) -> Any:
        try:
            with trio.fail_after(self.op_timeout):
                return await fn(*args)
        except AsyncfsError as e:
            msg = str(e)
            if "\n" in msg or not msg:
                raise CaseFailure("message", f"{what}: {type(e).__name__} {msg!r}") from e
            self.errors += 1
            view.errors.append(f"{what}: {type(e).__name__}")
            return None
        except trio.TooSlowError:
            raise CaseFailure("hang", f"{what} took over {self.op_timeout}s") from None
        except CaseFailure:
            raise
        except Exception as e:
            tb = "".join(traceback.format_exception(e)[-6:])
            raise CaseFailure("crash", f"{what}: {type(e).__name__}: {e}\n{tb}") from e

    def _expected(self, runs: list[Run], off: int, n: int) -> bytes | None:
        """The bytes ``runs`` name, read straight from the image; None if a run leaves the
        device (then the read must have failed)."""
        out = bytearray()
        pos = off
        for r in runs:
            if r.file_off != pos or r.length <= 0:
                raise CaseFailure("bytes", f"file map runs not contiguous at {pos}: {r}")
            if r.data is not None:
                if len(r.data) < r.length:
                    raise CaseFailure("bytes", f"inline run shorter than its length: {r}")
                out += r.data[: r.length]
            elif r.dev_off is None:
                out += bytes(r.length)
            else:
                if r.dev_off < 0 or r.dev_off + r.length > self._img_size:
                    return None
                self._img.seek(r.dev_off)
                out += self._img.read(r.length)
            pos += r.length
        if pos != off + n:
            raise CaseFailure("bytes", f"file map covers {pos - off} of {n} bytes at {off}")
        return bytes(out)

    async def _read_at(self, view: InodeView, ino: int, fh: Any, off: int, n: int,
                       size: int) -> None:
        want = max(0, min(n, size - off))
        data = await self._op(view, f"read ino {ino} @{off}", self.vol.read, fh, off, n)
        if data is None:
            return
        if len(data) != want:
            raise CaseFailure("bytes", f"ino {ino}: read({off}, {n}) gave {len(data)} bytes, "
                                       f"file size {size} wants {want}")
        if self.check_bytes and want:
            try:
                runs = await fh.fmap.map(off, want)
            except AsyncfsError:
                runs = None
            if runs is None:
                raise CaseFailure("bytes", f"ino {ino}: read at {off} succeeded, map fails")
            exp = self._expected(runs, off, want)
            if exp is None:
                raise CaseFailure("bytes", f"ino {ino}: read at {off} served bytes past the "
                                           f"device end ({runs})")
            if exp != bytes(data):
                raise CaseFailure("bytes", f"ino {ino}: read at {off} differs from the bytes "
                                           "its map names")
        view.reads[off] = _sha(data)

    async def walk(self) -> None:
        vol = self.vol
        root = InodeView()
        await self._op(root, "statfs", _async_call, vol.statfs)
        # once per inode: hard links, and the directory loops a forged entry can make
        walk: DepthFirst[int] = DepthFirst(vol.root_ino, key=lambda ino: ino, limit=MAX_INODES)
        for ino in walk:
            view = InodeView()
            self.seen[ino] = view
            attr = await self._op(view, f"getattr {ino}", vol.getattr, ino)
            view.attr = attr
            names = await self._op(view, f"listxattr {ino}", vol.listxattr, ino)
            if names is not None:
                view.xattrs = {}
                for n in sorted(names)[:64]:
                    v = await self._op(view, f"getxattr {ino}", vol.getxattr, ino, n)
                    if v is not None:
                        view.xattrs[n] = _sha(v)
            if attr is None:
                continue
            mode = attr.mode
            if stat.S_ISREG(mode):
                fh = await self._op(view, f"open {ino}", vol.open, ino)
                if fh is None:
                    continue
                size = attr.size
                offs = list(range(0, min(size, READ_HEAD), READ_CHUNK))
                if size > READ_HEAD:
                    offs += [size - 4096, (size // 3) & ~4095, size - 1]
                offs.append(size)  # at EOF: empty
                for off in offs:
                    await self._read_at(view, ino, fh, max(off, 0), READ_CHUNK, size)
            elif stat.S_ISLNK(mode):
                view.link = await self._op(view, f"readlink {ino}", vol.readlink, ino)
            elif stat.S_ISDIR(mode):
                listed: list[bytes] = []
                children: list[int] = []
                off = 0
                for _ in range(MAX_DIR_ENTRIES):
                    batch = await self._op(view, f"readdir {ino} @{off}", vol.readdir, ino, off)
                    if not batch:
                        break
                    for e in batch:
                        listed.append(e.name)
                        if e.name not in (b".", b".."):
                            children.append(e.ino)
                    if batch[-1].next_off <= off:
                        raise CaseFailure("hang", f"readdir {ino}: cookie went from {off} "
                                                  f"back to {batch[-1].next_off}")
                    off = batch[-1].next_off
                    if len(listed) > MAX_DIR_ENTRIES:
                        break
                view.names = sorted(listed)
                # a big directory of alike files: visit evenly spaced ones (cost, not coverage)
                walk.push(children[:: max(1, len(children) // CHILDREN_PER_DIR)])
                # evenly spaced names reach every htree leaf without a lookup per entry
                for name in listed[:: max(1, len(listed) // LOOKUPS_PER_DIR)]:
                    if name in (b".", b".."):
                        continue
                    await self._op(view, f"lookup {ino}/{name!r}", vol.lookup, ino, name)
                await self._op(view, f"lookup {ino}/missing", _expect_missing, vol, ino)


async def _async_call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def _expect_missing(vol: Volume, ino: int) -> None:
    """A lookup of a name that is not there: ENOENT is the right answer, not an error."""
    with contextlib.suppress(NoEntryError):
        await vol.lookup(ino, b"no-such-name-here")
