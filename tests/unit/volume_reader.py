"""Test scaffolding: a tiny DeviceReader over an image file (os.pread), no page cache.

It implements engine/interfaces.py DeviceReader exactly as the Volume needs it, so the ext4
volume tests run before (and independently of) the real page cache. Not a mock of the mount:
every byte comes from the real image.
"""

from __future__ import annotations

import os
from pathlib import Path

from asyncfs.engine.interfaces import FileMap


class PreadReader:
    """read_dev via os.pread of the image; read_file by mapping the range and preading runs."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.dev_reads = 0
        self.dev_bytes = 0

    def close(self) -> None:
        os.close(self.fd)

    async def read_dev(self, off: int, length: int) -> bytes:
        self.dev_reads += 1
        self.dev_bytes += length
        data = os.pread(self.fd, length, off)
        if len(data) != length:
            raise AssertionError(f"short device read at {off}+{length}")
        return data

    async def read_file(
        self, fmap: FileMap, ra: object | None, off: int, size: int
    ) -> bytes | memoryview:
        out = bytearray()
        for run in await fmap.map(off, size):
            if run.data is not None:
                assert len(run.data) == run.length
                out += run.data
            elif run.dev_off is not None:
                out += os.pread(self.fd, run.length, run.dev_off)
            else:
                out += bytes(run.length)
        return bytes(out)

    def new_readahead(self) -> object:
        return object()


class MemReader:
    """The same DeviceReader over an in-memory image (for fuzzing mutated copies)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytes(data)
        self.size = len(self.data)

    async def read_dev(self, off: int, length: int) -> bytes:
        if off < 0 or off + length > self.size:
            from asyncfs.errors import DeviceIOError

            raise DeviceIOError(f"read past the end of the image at {off}+{length}")
        return self.data[off : off + length]

    async def read_file(
        self, fmap: FileMap, ra: object | None, off: int, size: int
    ) -> bytes | memoryview:
        out = bytearray()
        for run in await fmap.map(off, size):
            if run.data is not None:
                out += run.data
            elif run.dev_off is not None:
                out += await self.read_dev(run.dev_off, run.length)
            else:
                out += bytes(run.length)
        return bytes(out)

    def new_readahead(self) -> object:
        return object()
