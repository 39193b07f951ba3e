"""The format layer: what a transport device holds, told by its magic (qcow2, else raw), and
the backing chain of a qcow2 image.

    fmt = await open_format(transport, path_for_backing=path, open_file=opener)

returns ``transport`` itself for a raw image, else a ``Qcow2Device`` over it. A qcow2 image's
backing file is found relative to ``path_for_backing``'s directory (or by its absolute path),
opened with ``open_file`` and recursively given its own format: chains of any depth, raw or
qcow2 at each step (``backing_fmt`` is honoured; without it the magic decides, as QEMU
probes). A chain that comes back to a file already in it is refused. Transports with no local
path (NBD, HTTP) pass ``path_for_backing=None``: an image there with a backing file is refused
in one line.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from asyncfs.errors import ImageError
from asyncfs.io.device import BlockDevice
from asyncfs.io.qcow2 import is_qcow2
from asyncfs.io.qcow2dev import Qcow2Device

# Opens a local file (a backing file) as a transport device for its whole length.
FileOpener = Callable[[str], Awaitable[BlockDevice]]

_FileId = tuple[int, int]


def _file_id(path: str, label: str) -> _FileId:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{label}: backing file {path} does not exist") from None
    except OSError as err:
        raise ImageError(f"{label}: backing file {path}: {err.strerror}") from None
    return st.st_dev, st.st_ino


async def open_format(dev: BlockDevice, *, path_for_backing: str | None,
                      open_file: FileOpener | None = None, name: str | None = None,
                      _seen: frozenset[_FileId] | None = None) -> BlockDevice:
    """The guest disk held by transport ``dev``: ``dev`` itself (raw) or a Qcow2Device over it.
    On error ``dev`` is left open (the caller owns it); devices opened here are closed."""
    label = name or path_for_backing or str(getattr(dev, "path", "image"))
    head = bytes(await dev.read(0, min(dev.size, 4)))
    if not is_qcow2(head):
        return dev
    seen = _seen
    if seen is None:
        seen = frozenset()
        if path_for_backing is not None:
            seen = frozenset({_file_id(path_for_backing, label)})

    async def backing(ref: str, fmt: str | None) -> BlockDevice:
        if path_for_backing is None or open_file is None:
            raise ImageError(f"{label}: its backing file {ref} cannot be opened for an image "
                             "that is not a local file")
        full = ref if os.path.isabs(ref) else os.path.join(
            os.path.dirname(os.path.abspath(path_for_backing)), ref)
        ident = _file_id(full, label)
        if ident in seen:
            raise ImageError(f"{label}: backing chain loops: {full} is already in it")
        if fmt not in (None, "raw", "qcow2"):
            raise ImageError(f"{label}: backing file {full} has format {fmt}; only raw and "
                             "qcow2 backing files are read")
        tdev = await open_file(full)
        try:
            if fmt == "raw":
                return tdev
            out = await open_format(tdev, path_for_backing=full, open_file=open_file,
                                    _seen=seen | {ident})
            if fmt == "qcow2" and out is tdev:
                raise ImageError(f"{label}: backing file {full} is not qcow2 as the image says")
            return out
        except BaseException:
            await tdev.aclose()
            raise

    return await Qcow2Device.open(dev, label, backing)


def describe_layers(dev: BlockDevice) -> list[str]:
    """``asyncfs info``'s lines for the format and backing chain of a device ``open_format``
    returned (none for a raw image)."""
    out: list[str] = []
    depth = 0
    cur: BlockDevice | None = dev
    while isinstance(cur, Qcow2Device):
        hdr = cur.header
        what = (f"qcow2 v{hdr.version}, virtual size {hdr.size} bytes, "
                f"{hdr.cluster_size // 1024} KiB clusters, compression {hdr.compression_name}"
                f"{', extended L2' if hdr.extended_l2 else ''}"
                f"{f', {hdr.nb_snapshots} snapshots' if hdr.nb_snapshots else ''}")
        if depth == 0:
            out.append(f"format: {what}")
        else:
            out.append(f"{'  ' * depth}backing: {cur.path} ({what})")
        out.extend(f"{'  ' * depth}warning: {n}" for n in hdr.notes())
        nxt = cur.backing
        if nxt is not None and not isinstance(nxt, Qcow2Device):
            out.append(f"{'  ' * (depth + 1)}backing: {getattr(nxt, 'path', '?')} (raw, "
                       f"{nxt.size} bytes)")
        cur = nxt
        depth += 1
    return out
