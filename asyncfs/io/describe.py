"""``describe_source``: what ``asyncfs info`` prints for any image, a raw file (partitions and
filesystems, read on the descriptor), a qcow2 image (its format and backing chain too) or an NBD
export (its transport too)."""

from __future__ import annotations

import dataclasses
import os

import trio

from asyncfs.io.device import BlockDevice
from asyncfs.io.format import describe_layers, open_format
from asyncfs.io.image import ImageInfo, describe_image, open_readonly
from asyncfs.io.nbd import NbdDevice, is_nbd_uri
from asyncfs.io.qcow2 import MAGIC as QCOW2_MAGIC
from asyncfs.io.threads import ThreadDevice
from asyncfs.io.window import describe_device


async def _open_local(path: str) -> BlockDevice:
    fd, size = await trio.to_thread.run_sync(open_readonly, path)
    return ThreadDevice(fd, base=0, size=size, direct=False, path=path, threads=4)


def _magic(path: str) -> bytes:
    fd, _ = open_readonly(path)
    try:
        return os.pread(fd, 4, 0)
    finally:
        os.close(fd)


async def describe_source(path: str) -> ImageInfo:
    """The partition listing of the guest disk ``path`` holds, with its layers."""
    layers: list[str] = []
    if is_nbd_uri(path):
        nbd = await NbdDevice.connect(path)
        transport: BlockDevice = nbd
        layers.append(f"transport: NBD {nbd.addr}, export of {nbd.size} bytes")
        backing_path: str | None = None
    else:
        if await trio.to_thread.run_sync(_magic, path) != QCOW2_MAGIC:
            return await trio.to_thread.run_sync(describe_image, path)
        transport = await _open_local(path)
        backing_path = path
    dev = transport
    try:
        dev = await open_format(transport, path_for_backing=backing_path,
                                open_file=_open_local)
        layers += describe_layers(dev) or ["format: raw"]
        info = await describe_device(dev, path)
        return dataclasses.replace(info, layers=tuple(layers))
    finally:
        with trio.CancelScope(shield=True):
            await dev.aclose()
