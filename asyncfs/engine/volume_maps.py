"""File maps: a file's byte ranges onto the device, for extent, block-map and inline files.

Each class implements engine/interfaces.py ``FileMap``. Mapping blocks (extent index/leaf
blocks, indirect pointer blocks) come parsed from the volume (which reads them through the page
cache and keeps a bounded volume-wide cache); contiguous physical blocks come back as one Run.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Protocol

from asyncfs.errors import CorruptionError
from asyncfs.ext4.blockmap import (
    EXT4_NDIR_BLOCKS,
    i_block_pointers,
    indirect_path,
    max_indirect_blocks,
)
from asyncfs.ext4.extents import (
    Extent,
    ExtentNode,
    find_extent,
    find_index,
    parse_extent_node,
)
from asyncfs.ext4.inode import Inode
from asyncfs.types import Run


class MapHost(Protocol):
    """What a file map needs from the volume (kept narrow so maps are testable alone)."""

    block_size: int
    blocks_count: int

    async def extent_block(
        self, ino: int, generation: int, pblk: int, depth: int
    ) -> ExtentNode: ...

    async def pointer_block(self, ino: int, pblk: int) -> array[int]: ...


def _append(runs: list[Run], run: Run) -> None:
    """Append ``run``, merging it into the previous one when the two are contiguous."""
    if runs:
        last = runs[-1]
        if last.data is None and run.data is None:
            if last.dev_off is None and run.dev_off is None:
                runs[-1] = Run(last.file_off, last.length + run.length)
                return
            if (
                last.dev_off is not None
                and run.dev_off is not None
                and last.dev_off + last.length == run.dev_off
            ):
                runs[-1] = Run(last.file_off, last.length + run.length, last.dev_off)
                return
    runs.append(run)


class ExtentFileMap:
    """Extent-mapped file; uninitialized extents and gaps map to hole Runs."""

    def __init__(self, host: MapHost, inode: Inode) -> None:
        self._host = host
        self._ino = inode.ino
        self._generation = inode.i_generation
        self._size = inode.i_size
        self._root = parse_extent_node(inode.i_block)
        # the last leaf used, with the logical range it is responsible for
        self._leaf: tuple[int, int, ExtentNode] | None = None

    @property
    def size(self) -> int:
        return self._size

    async def _node(self, pblk: int, depth: int) -> ExtentNode:
        # the host caches parsed blocks volume-wide (bounded), so memory does not grow with
        # the number of open files
        return await self._host.extent_block(self._ino, self._generation, pblk, depth)

    async def leaf_for(self, lblk: int) -> tuple[ExtentNode, int]:
        """The leaf responsible for ``lblk`` and the first logical block past its range."""
        cached = self._leaf
        if cached is not None and cached[0] <= lblk < cached[1]:
            return cached[2], cached[1]
        node = self._root
        lo, hi = 0, 1 << 32
        while node.depth > 0:
            i = bisect.bisect_right(node.starts, lblk) - 1
            if i >= 0:
                lo = max(lo, node.starts[i])
            if i + 1 < len(node.starts):
                hi = min(hi, node.starts[i + 1])
            # depth strictly decreases (checked by the parser): no loop can be followed
            node = await self._node(find_index(node, lblk), node.depth - 1)
        self._leaf = (lo, hi, node)
        return node, hi

    async def extent_at(self, lblk: int) -> tuple[Extent | None, int]:
        """(extent covering ``lblk`` or None, first logical block after this answer's range)."""
        leaf, bound = await self.leaf_for(lblk)
        ext, nxt = find_extent(leaf, lblk)
        if ext is not None:
            end = ext.ee_block + ext.ee_len
            if ext.ee_start + ext.ee_len > self._host.blocks_count or ext.ee_start == 0:
                raise CorruptionError(
                    f"inode {self._ino}: extent at block {ext.ee_start} outside the filesystem"
                )
            return ext, end
        return None, min(bound, nxt) if nxt is not None else bound

    async def block(self, lblk: int) -> int | None:
        """Physical block of logical ``lblk``; None for a hole or an uninitialized extent."""
        ext, _ = await self.extent_at(lblk)
        if ext is None or ext.uninit:
            return None
        return ext.ee_start + lblk - ext.ee_block

    async def map(self, off: int, length: int) -> list[Run]:
        end = min(off + length, self._size)
        runs: list[Run] = []
        bs = self._host.block_size
        pos = off
        while pos < end:
            lblk = pos // bs
            ext, stop = await self.extent_at(lblk)
            piece_end = min(end, stop * bs)
            if piece_end <= pos:  # pragma: no cover - guards a forged tree against no progress
                raise CorruptionError(f"inode {self._ino}: extent map makes no progress")
            if ext is None or ext.uninit:
                _append(runs, Run(pos, piece_end - pos))
            else:
                dev = (ext.ee_start + lblk - ext.ee_block) * bs + pos % bs
                _append(runs, Run(pos, piece_end - pos, dev))
            pos = piece_end
        return runs


class IndirectFileMap:
    """ext2/ext3 block-mapped file: direct, single, double and triple indirect blocks."""

    def __init__(self, host: MapHost, inode: Inode) -> None:
        self._host = host
        self._ino = inode.ino
        self._size = inode.i_size
        self._iblock = i_block_pointers(inode.i_block)
        self._ppb = host.block_size // 4
        self._max = max_indirect_blocks(self._ppb)

    @property
    def size(self) -> int:
        return self._size

    def _check(self, pblk: int) -> int:
        if pblk >= self._host.blocks_count:
            raise CorruptionError(
                f"inode {self._ino}: block pointer {pblk} outside the filesystem"
            )
        return pblk

    async def _pointers(self, pblk: int) -> array[int]:
        return await self._host.pointer_block(self._ino, self._check(pblk))

    async def _leaf(self, lblk: int) -> tuple[array[int] | tuple[int, ...] | None, int, int]:
        """(pointer array holding ``lblk``'s pointer or None for a hole, slot, slots left).

        ``slots left`` counts logical blocks from ``lblk`` that the same array (or the same
        hole) covers, so a caller can scan them without another descent.
        """
        path = indirect_path(lblk, self._ppb)
        if len(path) == 1:
            return self._iblock, lblk, EXT4_NDIR_BLOCKS - lblk
        p = self._iblock[path[0]]
        for depth, slot in enumerate(path[1:-1]):
            if p == 0:
                # the whole subtree under this pointer is a hole
                return None, 0, _remaining(path[depth + 1 :], self._ppb)
            ptrs = await self._pointers(p)
            p = ptrs[slot]
        if p == 0:
            return None, 0, self._ppb - path[-1]
        ptrs = await self._pointers(p)
        return ptrs, path[-1], self._ppb - path[-1]

    async def block(self, lblk: int) -> int | None:
        if lblk >= self._max:
            return None
        arr, slot, _ = await self._leaf(lblk)
        if arr is None:
            return None
        p = arr[slot]
        return self._check(p) if p else None

    async def map(self, off: int, length: int) -> list[Run]:
        end = min(off + length, self._size)
        runs: list[Run] = []
        bs = self._host.block_size
        pos = off
        while pos < end:
            lblk = pos // bs
            if lblk >= self._max:
                _append(runs, Run(pos, end - pos))
                break
            arr, slot, left = await self._leaf(lblk)
            last_lblk = min(lblk + left, (end + bs - 1) // bs)
            if arr is None:
                piece_end = min(end, last_lblk * bs)
                _append(runs, Run(pos, piece_end - pos))
                pos = piece_end
                continue
            # scan the pointer array for runs of consecutive blocks (or of zeros) so a
            # contiguous file maps to one Run without per-block objects
            lb = lblk
            while lb < last_lblk:
                p = arr[slot + lb - lblk]
                j = lb + 1
                if p:
                    while j < last_lblk and arr[slot + j - lblk] == p + (j - lb):
                        j += 1
                    self._check(p + (j - lb) - 1)
                else:
                    while j < last_lblk and not arr[slot + j - lblk]:
                        j += 1
                piece_end = min(end, j * bs)
                dev = p * bs + pos % bs if p else None
                _append(runs, Run(pos, piece_end - pos, dev))
                pos = piece_end
                lb = j
        return runs


def _remaining(path: tuple[int, ...], ppb: int) -> int:
    """Logical blocks from the position ``path`` to the end of the subtree it indexes into."""
    total = 0
    mult = 1
    for slot in reversed(path):
        total += (ppb - 1 - slot) * mult
        mult *= ppb
    return total + 1


class InlineFileMap:
    """inline_data file: bytes from i_block and the system.data xattr, zeros past them."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data = data
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def map(self, off: int, length: int) -> list[Run]:
        end = min(off + length, self._size)
        if off >= end:
            return []
        runs: list[Run] = []
        have = min(end, len(self._data))
        if off < have:
            runs.append(Run(off, have - off, data=self._data[off:have]))
        if end > max(off, have):
            runs.append(Run(max(off, have), end - max(off, have)))
        return runs


class EmptyFileMap:
    """A file whose data cannot be mapped but whose size is known (size 0 or all holes)."""

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def block(self, lblk: int) -> int | None:
        return None

    async def map(self, off: int, length: int) -> list[Run]:
        end = min(off + length, self._size)
        return [Run(off, end - off)] if off < end else []

