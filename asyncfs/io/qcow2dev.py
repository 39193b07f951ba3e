"""``Qcow2Device``: the guest disk of a qcow2 image, as a BlockDevice over the device that
holds the image file (a local file backend, NBD, ...), with an optional backing device.

It owns the L1 table (read once at open), a bounded LRU of L2 tables and one of inflated
compressed clusters. Metadata is read through the underlying device, not through the page cache
above: the page cache holds guest pages, and an L2 table read once serves thousands of them.
Guest reads become the fewest file reads: runs of data clusters that are contiguous in the file
are merged into one read, and independent reads (data, compressed clusters, backing ranges) run
concurrently. A read that maps to one run of data clusters whose L2 table is cached goes
straight to the file backend's ``submit_read_into`` (into the page cache's frames), so a qcow2
image with few compressed clusters reads at the speed of the raw file.
"""

from __future__ import annotations

import logging
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io.device import BlockDevice, IntoCallback
from asyncfs.io.qcow2 import (
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    Extent,
    Qcow2Corrupt,
    Qcow2Header,
    cluster_extents,
    decode_table,
    decompress,
    header_bytes_needed,
    l2_table_offset,
    parse_header,
    require_codec,
)

log = logging.getLogger(__name__)

# L2 tables kept: 16 MiB covers 128 GiB of guest disk with the default 64 KiB clusters, so a
# mount's working set stays cached while a hostile image (millions of L2 tables) cannot grow
# memory without bound. A table costs one small read to bring back.
L2_CACHE_BYTES = 16 << 20
# Inflated compressed clusters kept: pages of one compressed cluster are often read one by
# one (random 4 KiB reads), and each would otherwise inflate the whole cluster again.
ZCACHE_BYTES = 8 << 20
_MERGE_MAX = 16 << 20  # one file read never spans more than this

_NOT_PLAIN = 1 << 62  # compressed
_HOST_MASK = ((1 << 56) - 1) & ~0x1FF

BackingOpener = Callable[[str, str | None], Awaitable[BlockDevice]]

_Plan = list[tuple[int, Extent]]  # (offset into the guest read, extent)


class Qcow2Device:
    """A qcow2 image's guest disk, read-only. ``open`` reads and checks the header."""

    backend_name = "qcow2"

    def __init__(self, file: BlockDevice, hdr: Qcow2Header, l1: array[int],
                 backing: BlockDevice | None, name: str) -> None:
        self._file = file
        self._hdr = hdr
        self._l1 = l1
        self._backing = backing
        self.path = name
        self._fsize = file.size
        self._l2: OrderedDict[int, array[int]] = OrderedDict()  # by L1 index
        self._l2_max = max(8, L2_CACHE_BYTES // hdr.cluster_size)
        self._l2_loading: dict[int, trio.Event] = {}
        self._z: OrderedDict[int, bytes] = OrderedDict()  # inflated clusters, by host offset
        self._z_max = max(4, ZCACHE_BYTES // hdr.cluster_size)
        self._into: Callable[..., bool] | None = getattr(file, "submit_read_into", None)
        self._nowait_into: Callable[..., bool] | None = getattr(file, "read_nowait_into", None)
        self.backend_note: str | None = getattr(file, "backend_note", None)
        # what `asyncfs stats` shows: the format over the backend that reads the file
        self.backend_name = f"qcow2+{getattr(file, 'backend_name', type(file).__name__)}"
        self.l2_loads = 0
        self.inflated = 0
        self._memo: tuple[int, int, int | None] = (-1, -1, None)

    @classmethod
    async def open(cls, file: BlockDevice, name: str,
                   open_backing: BackingOpener | None) -> Qcow2Device:
        """Read the header and the L1 table; open the backing device with ``open_backing``
        (ImageError when the image has one and ``open_backing`` is None)."""
        head = bytes(await file.read(0, min(file.size, 4096)))
        need = min(file.size, header_bytes_needed(head))
        if need > len(head):
            head = bytes(await file.read(0, need))
        hdr = parse_header(head, file.size, name)
        require_codec(hdr, name)
        l1 = decode_table(bytes(await file.read(hdr.l1_offset, 8 * hdr.l1_size))
                          ) if hdr.l1_size else array("Q")
        backing: BlockDevice | None = None
        if hdr.backing_file is not None:
            if open_backing is None:
                raise ImageError(f"{name}: its backing file {hdr.backing_file} cannot be opened "
                                 "for an image that is not a local file")
            backing = await open_backing(hdr.backing_file, hdr.backing_fmt)
        for note in hdr.notes():
            log.warning("%s: %s", name, note)
        return cls(file, hdr, l1, backing, name)

    @property
    def size(self) -> int:
        return self._hdr.size

    @property
    def header(self) -> Qcow2Header:
        return self._hdr

    @property
    def backing(self) -> BlockDevice | None:
        return self._backing

    # -- mapping ---------------------------------------------------------------------------

    def _plan(self, offset: int, length: int, pinned: dict[int, array[int] | None]
              ) -> _Plan | int:
        """The extents of the guest range, merged where contiguous; or the L1 index of the
        first L2 table neither cached nor in ``pinned`` (the caller loads it and asks again).
        Qcow2Corrupt for a damaged entry."""
        hdr = self._hdr
        csize = hdr.cluster_size
        per = hdr.l2_entries
        ext = hdr.extended_l2
        out: _Plan = []
        pos = offset
        end = offset + length
        while pos < end:
            cluster = pos // csize
            l1i, idx = divmod(cluster, per)
            if l1i in pinned:
                table = pinned[l1i]
            else:
                table = self._l2.get(l1i)
                if table is None:
                    if l1i >= len(self._l1):
                        raise Qcow2Corrupt(f"guest offset {pos} is beyond the L1 table")
                    if l2_table_offset(hdr, self._l1[l1i], self._fsize) == 0:
                        table = None  # unallocated L2: every cluster under it
                    else:
                        return l1i
                else:
                    self._l2.move_to_end(l1i)
            within = pos - cluster * csize
            n = min(end - pos, csize - within)
            if table is None:
                entry = bitmap = 0
            elif ext:
                entry, bitmap = table[2 * idx], table[2 * idx + 1]
            else:
                entry, bitmap = table[idx], 0
            for e in cluster_extents(hdr, entry, bitmap, within, n, self._fsize):
                _append(out, pos - offset, e)
                pos += e.length
        return out

    async def _extents(self, offset: int, length: int) -> _Plan:
        pinned: dict[int, array[int] | None] = {}
        while True:
            plan = self._plan(offset, length, pinned)
            if not isinstance(plan, int):
                return plan
            pinned[plan] = await self._load_l2(plan)

    async def _load_l2(self, l1i: int) -> array[int] | None:
        """The L2 table under L1 entry ``l1i``, read once however many readers want it."""
        while True:
            table = self._l2.get(l1i)
            if table is not None:
                return table
            ev = self._l2_loading.get(l1i)
            if ev is None:
                break
            await ev.wait()
        off = l2_table_offset(self._hdr, self._l1[l1i], self._fsize)
        if off == 0:
            return None
        ev = self._l2_loading[l1i] = trio.Event()
        try:
            raw = await self._file.read(off, self._hdr.cluster_size)
            table = decode_table(bytes(raw))
            self.l2_loads += 1
            self._l2[l1i] = table
            while len(self._l2) > self._l2_max:
                self._l2.popitem(last=False)
            return table
        finally:
            del self._l2_loading[l1i]
            ev.set()

    # -- reads -----------------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._hdr.size:
            raise DeviceIOError(f"read of {length} bytes at {offset} is past the end of "
                                f"{self.path} ({self._hdr.size} bytes)")

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._check(offset, length)
        try:
            plan = await self._extents(offset, length)
        except Qcow2Corrupt as err:
            raise DeviceIOError(f"{self.path}: guest bytes {offset}-{offset + length}: "
                                f"{err}") from None
        if len(plan) == 1 and plan[0][1].kind == DATA and plan[0][1].host + length <= self._fsize:
            return await self._file.read(plan[0][1].host, length)
        out = bytearray(length)
        jobs = [(at, e) for at, e in plan if e.kind != ZERO]
        if len(jobs) == 1:
            await self._fill(out, offset, *jobs[0])
        elif jobs:
            async with trio.open_nursery() as nursery:
                for at, e in jobs:
                    nursery.start_soon(self._fill, out, offset, at, e)
        return out

    async def _fill(self, out: bytearray, offset: int, at: int, e: Extent) -> None:
        """Put extent ``e`` (``at`` bytes into the read of guest ``offset``) into ``out``."""
        if e.kind == DATA:
            n = min(e.length, self._fsize - e.host)  # past the file's end: zeros
            if n > 0:
                out[at:at + n] = await self._file.read(e.host, n)
        elif e.kind == COMPRESSED:
            data = await self._inflate(e, offset + at)
            out[at:at + e.length] = data[e.skip:e.skip + e.length]
        elif e.kind == UNALLOCATED and self._backing is not None:
            g = offset + at
            n = min(e.length, self._backing.size - g)
            if n > 0:
                out[at:at + n] = await self._backing.read(g, n)

    async def _inflate(self, e: Extent, guest: int) -> bytes:
        data = self._z.get(e.host)
        if data is not None:
            self._z.move_to_end(e.host)
            return data
        raw = await self._file.read(e.host, e.csize)
        try:
            data = decompress(self._hdr, bytes(raw), self.path)
        except Qcow2Corrupt as err:
            raise DeviceIOError(f"{self.path}: compressed cluster of guest byte {guest}: "
                                f"{err}") from None
        self.inflated += 1
        self._z[e.host] = data
        while len(self._z) > self._z_max:
            self._z.popitem(last=False)
        return data

    def _direct(self, offset: int, length: int) -> int | None:
        """The file offset of a guest range that is one run of data clusters whose L2 tables
        are cached, else None (the caller then reads through ``read``)."""
        if offset < 0 or length <= 0 or offset + length > self._hdr.size:
            return None
        memo = self._memo
        if memo[0] == offset and memo[1] == length:
            return memo[2]  # the probe just mapped it: the mapping of a read-only image holds
        host = self._scan(offset, length) if not self._hdr.extended_l2 else self._planned(
            offset, length)
        self._memo = (offset, length, host)
        return host

    def _scan(self, offset: int, length: int) -> int | None:
        """``_direct`` for standard L2 entries, on the integers alone: it runs for every
        page-cache miss, and a stream's window spans a hundred clusters."""
        hdr = self._hdr
        csize = hdr.cluster_size
        per = hdr.l2_entries
        first = offset // csize
        last = (offset + length - 1) // csize
        base = -1  # host offset of guest cluster ``first``
        l1i = -1
        table: array[int] | None = None
        for c in range(first, last + 1):
            i, idx = divmod(c, per)
            if i != l1i:
                l1i = i
                table = self._l2.get(i)
                if table is None:
                    return None
                self._l2.move_to_end(i)
            assert table is not None
            e = table[idx]
            if e & _NOT_PLAIN or (hdr.version >= 3 and e & 1):
                return None
            off = e & _HOST_MASK
            if off == 0 or off % csize:
                return None
            if base < 0:
                base = off
            elif off != base + (c - first) * csize:
                return None
        host = base + offset - first * csize
        return host if host + length <= self._fsize else None

    def _planned(self, offset: int, length: int) -> int | None:
        try:
            plan = self._plan(offset, length, {})
        except Qcow2Corrupt:
            return None
        if isinstance(plan, int) or len(plan) != 1 or plan[0][1].kind != DATA:
            return None
        host = plan[0][1].host
        return host if host + length <= self._fsize else None

    def submit_read_into(self, offset: int, views: list[memoryview], callback: IntoCallback,
                         delay: float = 0.0) -> bool:
        if self._into is None:
            return False
        host = self._direct(offset, sum(map(len, views)))
        return host is not None and bool(self._into(host, views, callback, delay))

    def read_nowait_into(self, offset: int, views: list[memoryview]) -> bool:
        if self._nowait_into is None:
            return False
        host = self._direct(offset, sum(map(len, views)))
        return host is not None and bool(self._nowait_into(host, views))

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    async def aclose(self) -> None:
        try:
            if self._backing is not None:
                await self._backing.aclose()
        finally:
            await self._file.aclose()


def _append(out: _Plan, at: int, e: Extent) -> None:
    """Add an extent, merging it into the previous one where both are one run."""
    if out:
        pat, prev = out[-1]
        if prev.kind == e.kind and prev.kind in (ZERO, UNALLOCATED):
            out[-1] = (pat, Extent(prev.kind, prev.length + e.length))
            return
        if (prev.kind == e.kind == DATA and prev.host + prev.length == e.host
                and prev.length + e.length <= _MERGE_MAX):
            out[-1] = (pat, Extent(DATA, prev.length + e.length, prev.host))
            return
    out.append((at, e))
