"""Protocols between the engine's read path (cache) and the ext4 volume operations built on it."""

from __future__ import annotations

from typing import Protocol

from asyncfs.types import Run


class FileMap(Protocol):
    """A file as the read path sees it: a size and a way to map byte ranges onto the device."""

    @property
    def size(self) -> int: ...

    async def map(self, off: int, length: int) -> list[Run]:
        """Runs covering ``[off, min(off + length, size))`` in order, without gaps."""
        ...


class DeviceReader(Protocol):
    """What the volume code needs from the page cache (metadata and file data)."""

    async def read_dev(self, off: int, length: int) -> bytes:
        """``length`` bytes of the filesystem device at ``off``, through the cache."""
        ...

    async def read_file(
        self, fmap: FileMap, ra: object | None, off: int, size: int
    ) -> bytes | memoryview:
        """Up to ``size`` bytes of the file at ``off``: short only at EOF. ``ra`` is the open
        file's readahead state (``None``: no readahead, e.g. for directories). A
        ``memoryview`` result is valid only until the caller's next ``await``."""
        ...

    def new_readahead(self) -> object:
        """Fresh per-open-file readahead state."""
        ...
