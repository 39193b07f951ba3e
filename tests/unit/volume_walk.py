"""Test helpers: snapshot a tree seen through a Volume, or through the OS, field by field.

Both produce ``{relative path: {field: value}}`` with the same field names, so a test can
compare the Volume against the kernel's loop mount of the same image (every field) and against
the source tree (the fields an image preserves).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from asyncfs.engine.volume import Volume
from asyncfs.errors import AsyncfsError
from asyncfs.testing.treewalk import DepthFirst, host_tree

Snapshot = dict[bytes, dict[str, Any]]


@contextmanager
def fails_unless_kernel(variant: str) -> Iterator[None]:
    """Run a test's checks: for ``variant == "kernel"`` (the real code) they must pass, for a
    broken variant they must fail, by a failed assertion (or ``pytest.raises``) or by one of
    the project's errors escaping where the real code answers."""
    if variant == "kernel":
        yield
        return
    try:
        yield
    except (AssertionError, AsyncfsError, pytest.fail.Exception):
        return
    raise AssertionError(f"broken variant {variant!r} passed the checks")


_CHUNK = 1 << 20


def _digest_add(h: Any, off: int, data: bytes) -> None:
    """Feed one aligned chunk; all-zero chunks are skipped so holes cost nothing to hash."""
    if data.count(0) != len(data):
        h.update(off.to_bytes(8, "little") + data)


async def volume_digest(vol: Volume, ino: int, size: int) -> str:
    """Content digest (sparse-aware, see :func:`os_digest`) read through ``Volume.read``."""
    fh = await vol.open(ino)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    for off in range(0, size, _CHUNK):
        runs = await fh.fmap.map(off, _CHUNK)
        if all(r.dev_off is None and r.data is None for r in runs):
            continue
        data = bytearray()
        while len(data) < min(_CHUNK, size - off):
            got = await vol.read(fh, off + len(data), min(_CHUNK, size - off) - len(data))
            if not got:
                raise AssertionError(f"short read at {off + len(data)} of {size}")
            data += got
        _digest_add(h, off, bytes(data))
    return h.hexdigest()


def os_digest(path: bytes, size: int) -> str:
    """sha256 over (offset, chunk) of every non-zero 1 MiB chunk, skipping holes (SEEK_DATA)."""
    h = hashlib.sha256(size.to_bytes(8, "little"))
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                data_at = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            off = data_at - data_at % _CHUNK
            try:
                hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
            except OSError:
                # ext4 answers ENOENT for SEEK_HOLE past the inline part of an inline_data
                # file whose i_size exceeds it (mke2fs -d makes such files): read it all
                hole_at = size
            while off < hole_at:
                _digest_add(h, off, os.pread(fd, min(_CHUNK, size - off), off))
                off += _CHUNK
    finally:
        os.close(fd)
    return h.hexdigest()


async def read_all(vol: Volume, ino: int, size: int, chunk: int = 128 * 1024) -> bytes:
    fh = await vol.open(ino)
    out = bytearray()
    off = 0
    while off < size:
        data = await vol.read(fh, off, chunk)
        if not data:
            break
        out += data
        off += len(data)
    return bytes(out)


async def listing(vol: Volume, ino: int) -> list[tuple[bytes, int, int]]:
    """Full readdir of ``ino`` by following cookies batch by batch."""
    out: list[tuple[bytes, int, int]] = []
    off = 0
    for _ in range(1_000_000):
        batch = await vol.readdir(ino, off)
        if not batch:
            return out
        for e in batch:
            out.append((e.name, e.ino, e.file_type))
        off = batch[-1].next_off
    raise AssertionError("readdir never ended")


async def volume_snapshot(vol: Volume, *, xattrs: bool = True) -> Snapshot:
    snap: Snapshot = {}
    walk: DepthFirst[tuple[bytes, int]] = DepthFirst((b"", vol.root_ino))
    for rel, ino in walk:
        a = await vol.getattr(ino)
        rec: dict[str, Any] = {
            "mode": a.mode,
            "nlink": a.nlink,
            "uid": a.uid,
            "gid": a.gid,
            "size": a.size,
            "rdev": a.rdev,
            "blocks": a.blocks,
            "ino": a.ino,
            "atime": a.atime_ns,
            "mtime": a.mtime_ns,
            "ctime": a.ctime_ns,
            "blksize": a.blksize,
        }
        if xattrs:
            names = sorted(await vol.listxattr(ino))
            vals = []
            for n in names:
                try:
                    vals.append((n, await vol.getxattr(ino, n)))
                except AsyncfsError as e:
                    vals.append((n, type(e).__name__.encode()))
            rec["xattrs"] = vals
        if stat.S_ISREG(a.mode):
            try:
                rec["content"] = await volume_digest(vol, ino, a.size)
            except AsyncfsError as e:
                rec["content"] = type(e).__name__
        elif stat.S_ISLNK(a.mode):
            rec["link"] = await vol.readlink(ino)
        elif stat.S_ISDIR(a.mode):
            entries = await listing(vol, ino)
            names_only = [n for n, _, _ in entries if n not in (b".", b"..")]
            rec["names"] = sorted(names_only)
            rec["order"] = names_only  # readdir order, which `ls -U`, find and du follow
            rec["dup_names"] = len(names_only) != len(set(names_only))
            for name, child, _ft in entries:
                if name in (b".", b".."):
                    continue
                looked = await vol.lookup(ino, name)
                if looked.ino != child:
                    rec.setdefault("lookup_mismatch", []).append(name)
                walk.push([(os.path.join(rel, name) if rel else name, child)])
        snap[rel] = rec
    return snap


def _os_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    names = os.listxattr(path, follow_symlinks=False)
    return sorted(
        (os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names
    )


def os_snapshot(root: Path, *, xattrs: bool = True) -> Snapshot:
    snap: Snapshot = {}
    for rel, path, st in host_tree(root):
        rec: dict[str, Any] = {
            "mode": st.st_mode,
            "nlink": st.st_nlink,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": st.st_size,
            "rdev": st.st_rdev,
            "blocks": st.st_blocks,
            "ino": st.st_ino,
            "atime": st.st_atime_ns,
            "mtime": st.st_mtime_ns,
            "ctime": st.st_ctime_ns,
            "blksize": st.st_blksize,
        }
        if xattrs:
            rec["xattrs"] = _os_xattrs(path)
        if stat.S_ISREG(st.st_mode):
            try:
                rec["content"] = os_digest(path, st.st_size)
            except OSError as e:
                rec["content"] = f"errno {e.errno}"
        elif stat.S_ISLNK(st.st_mode):
            rec["link"] = os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path))
            rec["names"] = names
            rec["order"] = os.listdir(path)  # getdents order
            rec["dup_names"] = False
        snap[rel] = rec
    return snap


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) < 300 else r[:300] + "..."


def diff_snapshots(
    a: Snapshot,
    b: Snapshot,
    fields: set[str] | frozenset[str],
    *,
    skip_dirs: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Human-readable differences in ``fields`` between two snapshots (paths must match)."""
    out: list[str] = []
    for p in sorted(set(a) | set(b)):
        if p not in a or p not in b:
            out.append(f"{p!r}: only in {'a' if p in a else 'b'}")
            continue
        ra, rb = a[p], b[p]
        isdir = stat.S_ISDIR(ra["mode"])
        for f in sorted(fields):
            if isdir and f in skip_dirs:
                continue
            if (f in ra or f in rb) and ra.get(f) != rb.get(f):
                out.append(f"{p!r}: {f} {_short(ra.get(f))} != {_short(rb.get(f))}")
        for f in ("lookup_mismatch",):
            if f in ra:
                out.append(f"{p!r}: {f} {ra[f]!r}")
        if ra.get("dup_names"):
            out.append(f"{p!r}: readdir repeated a name")
    return out
