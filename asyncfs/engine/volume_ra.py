"""Device readahead for the volume: inode-table blocks and the neighbourhood of small files.

Nothing below asyncfs reads ahead (the image is read O_DIRECT, or buffered with the host's
readahead off by POSIX_FADV_RANDOM), so a cold walk over many small files would cost one device
round trip per inode-table block and one per file. The kernel's
ext4 avoids the first with ``s_inode_readahead_blks`` (__ext4_get_inode_loc); a loop mount or
fuse2fs avoid the second through the host page cache's readahead of the image file. Here:

* ``inode_table``: on an inode-table miss, start the read of the aligned run of table blocks
  around it (the range comes from ``ext4.group.inode_table_readahead``);
* ``small_file``: on the first read of a small file whose first block is not cached, start the
  read of the aligned device window around it (mke2fs and the kernel's allocator place the files
  of a directory next to each other), with the kernel's MMAP_LOTSAMISS rule (``mmap_miss``,
  mm/filemap.c do_sync_mmap_readahead): after too many misses with no hit in between, stop.

Both only *start* I/O (``read_dev(..., nowait=True)``: the pages are created LOCKED and read in
one coalesced backend request); the caller then reads what it needs and parks on its own page.
Readahead is a hint: its failures are dropped, a reader that needs the bytes sees the error.
Readers without ``lookup`` (test scaffolding without a page cache) get no readahead.
"""

from __future__ import annotations

import logging
from typing import Protocol, cast

from asyncfs.engine.interfaces import FileMap
from asyncfs.errors import AsyncfsError, WouldBlockError
from asyncfs.pagecache.page import PAGE_SHIFT

log = logging.getLogger("asyncfs.ext4")

EXT4_DEF_INODE_READAHEAD_BLKS = 32  # the kernel's default inode_readahead_blks
# Device window read around a small file's first missed page (pages, a power of two; at most
# the file readahead size and a quarter of the cache). The host reads an image file ahead by
# read_ahead_kb (2.5 MiB on the benchmark VM); 1 MiB is one backend request (MAX_IO_PAGES) and
# costs ~1 ms cold where a 4 KiB read costs ~0.16 ms.
READAROUND_PAGES = (1 << 20) >> PAGE_SHIFT
SMALL_FILE = 256 * 1024  # files up to this size get the readaround; larger ones read ahead
MMAP_LOTSAMISS = 100


class _NowaitReader(Protocol):
    """The PageCache calls used here (beyond engine.interfaces.DeviceReader)."""

    def lookup(self, index: int) -> object | None: ...

    async def read_dev(self, off: int, length: int, *, nowait: bool = False) -> bytes: ...


class DeviceReadahead:
    """Starts device reads ahead of the volume's own reads (one per mounted volume)."""

    def __init__(self, reader: object, device_size: int, *, enabled: bool = True) -> None:
        self._reader: _NowaitReader | None = None
        if enabled and callable(getattr(reader, "lookup", None)):
            self._reader = cast(_NowaitReader, reader)
        self._last_page = (device_size >> PAGE_SHIFT) - 1
        # Like the cache's own readahead, a window stays within a quarter of the cache: a
        # larger one would be reclaimed before it is used (and evict what is being read).
        limit = getattr(getattr(reader, "lru", None), "limit", None)
        quarter = limit // 4 if isinstance(limit, int) else READAROUND_PAGES
        # The read-around window is the file readahead size, as the kernel's mmap read-around
        # uses ra_pages: ``-o readahead=0`` turns it off too.
        new_ra = getattr(reader, "new_readahead", None)
        ra_pages = getattr(new_ra(), "ra_pages", None) if callable(new_ra) else None
        if not isinstance(ra_pages, int):
            ra_pages = READAROUND_PAGES
        pages = min(READAROUND_PAGES, quarter, ra_pages)
        self.window_pages = 1 << (pages.bit_length() - 1) if pages > 0 else 0
        self._max_pages = max(1, quarter)
        self.mmap_miss = 0
        self.windows = 0  # readahead requests started (tests, stats)

    @property
    def enabled(self) -> bool:
        return self._reader is not None

    def cached(self, dev_off: int) -> bool:
        """Whether the page holding ``dev_off`` is in the cache (or being read)."""
        r = self._reader
        return r is None or r.lookup(dev_off >> PAGE_SHIFT) is not None

    async def start(self, first: int, last: int) -> None:
        """Start reading device pages ``[first, last]`` that are not cached; never waits."""
        r = self._reader
        if r is None:
            return
        last = min(last, self._last_page, first + self._max_pages - 1)
        while first <= last and r.lookup(first) is not None:
            first += 1
        if first > last:
            return
        self.windows += 1
        try:
            # nowait: the missing pages of the range are created LOCKED and submitted (one
            # backend read per contiguous run), then the call returns instead of parking
            await r.read_dev(first << PAGE_SHIFT, (last - first + 1) << PAGE_SHIFT, nowait=True)
        except WouldBlockError:
            pass
        except AsyncfsError as e:
            log.debug("device readahead of pages %d..%d dropped: %s", first, last, e)

    async def blocks(self, blocks: range, block_size: int) -> None:
        """Start reading filesystem blocks ``blocks`` (e.g. an inode-table window)."""
        if not blocks or self._reader is None:
            return
        first = (blocks.start * block_size) >> PAGE_SHIFT
        last = (blocks.stop * block_size - 1) >> PAGE_SHIFT
        await self.start(first, last)

    async def small_file(self, fmap: FileMap) -> None:
        """First read of a small file: read around its first block unless it is cached."""
        if self._reader is None or fmap.size > SMALL_FILE or fmap.size <= 0:
            return
        window = self.window_pages
        if window < 8:
            return  # a cache this small has no room to read around
        runs = await fmap.map(0, 1)
        if not runs or runs[0].dev_off is None:
            return  # inline data or a hole: nothing on the device to read
        idx = runs[0].dev_off >> PAGE_SHIFT
        if self._reader.lookup(idx) is not None:
            if self.mmap_miss > 0:
                self.mmap_miss -= 1  # a neighbour's readaround served this file
            return
        if self.mmap_miss < MMAP_LOTSAMISS * 10:  # capped, so hits can bring it back
            self.mmap_miss += 1
        if self.mmap_miss > MMAP_LOTSAMISS:
            return  # no locality seen lately: reading around would only waste I/O
        first = idx & ~(window - 1)
        await self.start(first, first + window - 1)
