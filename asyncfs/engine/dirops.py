"""Directory operations of a mounted volume: listings, lookups and the blocks behind them.

``Directories`` owns everything the volume does with directories, in the order and with the
answers of the kernel's ext4:

* readdir: disk order for linear directories (cookies are byte positions, holes skipped whole),
  ext4_dx_readdir's hash order for what ext4 treats as a dx directory (cookies are positions
  in the whole sorted listing), synthesized "." and ".." for inline directories;
* lookup: through the htree index (engine/volume_htree.py walks it, this class is its
  ``DxHost``), through a name table built by one scan of a linear directory, by the no-key
  names of an encrypted directory, or in the inline area; casefolded names compare folded;
* directory blocks: read through the page cache as metadata, their checksums checked, parsed
  once and kept in the volume's ``MetaCache``.

Inodes, their maps and the shared error handling (checksum errors, log-once) come from the
``Volume`` this object belongs to.
"""

from __future__ import annotations

import logging
import struct
from itertools import chain
from typing import TYPE_CHECKING

import trio

from asyncfs.engine.interfaces import DeviceReader, FileMap
from asyncfs.engine.metacache import InodeInfo, MetaCache
from asyncfs.engine.volume_htree import dx_lookup
from asyncfs.errors import (
    ChecksumError,
    CorruptionError,
    NoEntryError,
    NotADirError,
    NotSupportedError,
)
from asyncfs.ext4 import casefold, csum, fscrypt
from asyncfs.ext4 import features as F
from asyncfs.ext4.dirent import (
    EXT4_NAME_LEN,
    FT_DIR,
    INLINE_DOTDOT_SIZE,
    Dirent,
    parse_dirents,
    rec_len_from_disk,
)
from asyncfs.ext4.dx_hash import DX_HASH_TEA, ext4fs_dirhash
from asyncfs.ext4.htree import (
    DX_ROOT_HASH_VERSION_OFF,
    DxBlock,
    DxRoot,
    parse_dx_node,
    parse_dx_root,
    readdir_hash_order,
)
from asyncfs.ext4.inode import EXT4_CASEFOLD_FL, EXT4_INDEX_FL, I_BLOCK_SIZE, Inode
from asyncfs.ext4.superblock import Superblock
from asyncfs.types import DirEntry

if TYPE_CHECKING:
    from asyncfs.engine.volume import Volume

READDIR_BATCH = 1000  # entries answered per readdir call, about
LINEAR_TABLE_MAX = 200_000  # entries; larger linear directories are scanned per lookup
_HOLE_WINDOW = 1 << 20  # directory blocks mapped per step when skipping a hole
_MAX_LBLK = 1 << 32  # ext4 logical block numbers are 32 bits
_SCAN_YIELD = 64  # directory blocks parsed between two event-loop checkpoints
_DOTS = (b".", b"..")


class Directories:
    """The directory operations of one volume (``vol.dirs``)."""

    def __init__(self, vol: Volume, reader: DeviceReader, meta: MetaCache) -> None:
        self._vol = vol
        self._reader = reader
        self._meta = meta
        self.sb: Superblock = vol.sb
        self.block_size = vol.block_size
        self._filetype = vol.sb.has_incompat(F.INCOMPAT_FILETYPE)
        self._casefold_fs = vol.sb.has_incompat(F.INCOMPAT_CASEFOLD)
        self._parsed_blocks = 0

    def log_once(self, key: object, level: int, msg: str, *args: object) -> None:
        """The volume's log-once (``DxHost``)."""
        self._vol.log_once(key, level, msg, *args)

    # ---------------------------------------------------------------------------------------
    # readdir

    async def readdir(self, ino: int, off: int) -> list[DirEntry]:
        """Entries after cookie ``off`` (0: from the start), at most about one batch, in the
        kernel's order: hash order for what ext4 treats as a dx directory, else disk order."""
        inode = await self._dir_inode(ino)
        info = await self._vol.inode_info(inode)
        listing = await self._hash_listing(inode, info)
        if listing is not None:
            return listing[off : off + READDIR_BATCH]
        if info.inline is not None:
            return self._readdir_inline(inode, info.inline, off)
        if info.fmap is None:  # pragma: no cover - directories always get a map
            return []
        bs = self.block_size
        out: list[DirEntry] = []
        nblocks = (inode.i_size + bs - 1) // bs
        lblk, start = divmod(off, bs)
        nokey = await self._nokey_hash_version(inode) if inode.is_encrypted else None
        while lblk < nblocks:
            nxt_lblk = await self._next_dir_block(info.fmap, lblk, nblocks)
            if nxt_lblk != lblk:  # a hole, skipped whole
                lblk, start = nxt_lblk, 0
                if lblk >= nblocks:
                    break
            try:
                entries = await self.block_entries(inode, info.fmap, lblk)
            except ChecksumError:
                # ext4_readdir logs "directory fails checksum" and skips the block
                entries = None
            if entries is not None:
                for e in entries:
                    if e.offset < start or not e.inode or not e.name:
                        continue
                    nxt = lblk * bs + e.offset + e.rec_len
                    name = e.name if nokey is None else self._nokey(e.name, nokey)
                    out.append(DirEntry(name, e.inode, e.file_type, nxt))
            lblk += 1
            start = 0
            if len(out) >= READDIR_BATCH or (out and lblk < nblocks):
                break
        return out

    def _one_block(self, inode: Inode) -> bool:
        """i_size of exactly one block: the kernel's readdir takes the htree path for it."""
        return inode.i_size // self.block_size == 1

    def _is_dx_dir(self, inode: Inode, info: InodeInfo) -> bool:
        """fs/ext4/dir.c is_dx_dir: readdir takes the hash-ordered path."""
        return self.sb.has_compat(F.COMPAT_DIR_INDEX) and (
            inode.has_flag(EXT4_INDEX_FL)
            or self._one_block(inode)
            or info.inline is not None
        )

    async def _hash_listing(self, inode: Inode, info: InodeInfo) -> list[DirEntry] | None:
        """The whole directory in ext4_dx_readdir's order, cookies = positions; None where the
        kernel lists in disk order (not a dx dir, or an unusable index: ERR_BAD_DX_DIR).

        The order is a property of the image, so it is computed once per directory (bounded
        cache) and a listing in pieces can never repeat or skip an entry.
        """
        if not self._is_dx_dir(inode, info):
            return None
        cached = self._meta.sorted_dirs.get(inode.ino)
        if cached is not None:
            return cached
        sb = self.sb
        seed = struct.unpack("<4I", sb.s_hash_seed)
        version = sb.s_def_hash_version
        # (major, minor, name as stored, inode, file type) in the kernel's traversal order
        keyed: list[tuple[int, int, bytes, int, int]] = []
        dots: list[tuple[bytes, int, int]] = []
        raw_items: list[tuple[bytes, int, int]] = []
        if info.inline is not None:
            parent = int.from_bytes(info.inline[:INLINE_DOTDOT_SIZE], "little")
            raw_items = [(b".", inode.ino, FT_DIR), (b"..", parent, FT_DIR)]
            raw_items += [(e.name, e.inode, e.file_type)
                          for e in self._inline_dirents(inode, info.inline)]
        elif info.fmap is None:  # pragma: no cover - directories always get a map
            return None
        elif inode.has_flag(EXT4_INDEX_FL):
            try:
                root = await self.dx_block(inode, 0)
                leaves = await self._dx_leaves(inode, root)
            except ChecksumError:
                raise
            except CorruptionError as err:
                self.log_once(("dxlist", inode.ino), logging.WARNING,
                              "directory inode %d: bad htree (%s), listing linearly",
                              inode.ino, err)
                return None
            if not isinstance(root, DxRoot):  # pragma: no cover - block 0 is the root
                return None
            version = root.hash_version
            block0 = await self.block_entries(inode, info.fmap, 0) or []
            dots = [(e.name, e.inode, e.file_type) for e in block0[:2]]
            for lblk in leaves:
                for e in await self.block_entries(inode, info.fmap, lblk) or ():
                    raw_items.append((e.name, e.inode, e.file_type))
        else:
            for e in await self.block_entries(inode, info.fmap, 0) or ():
                raw_items.append((e.name, e.inode, e.file_type))
        if version <= DX_HASH_TEA:
            version += sb.hash_unsigned
        # the root's "." and ".." go in with the fixed hashes 0 and 2 (ext4_htree_fill_tree)
        for (name, ino, ftype), major in zip(dots, (0, 2), strict=False):
            keyed.append((major, 0, name, ino, ftype))
        try:
            for name, ino, ftype in raw_items:
                if ino and name:
                    major, minor = ext4fs_dirhash(self.hash_name(inode, name), version, seed)
                    keyed.append((major, minor, name, ino, ftype))
        except NotSupportedError:
            return None  # a hash we cannot compute (SipHash without the key): disk order
        nokey = await self._nokey_hash_version(inode) if inode.is_encrypted else None
        ordered = readdir_hash_order([(k[0], k[1], k) for k in keyed])
        listing = [
            DirEntry(name if nokey is None else self._nokey(name, nokey), ino, ftype, pos)
            for pos, (_, _, name, ino, ftype) in enumerate(ordered, start=1)
        ]
        self._meta.sorted_dirs.put(inode.ino, listing)
        return listing

    async def _dx_leaves(self, inode: Inode, root: DxRoot | DxBlock) -> list[int]:
        """Leaf blocks of an htree in index order (the order ext4_htree_next_block walks)."""
        if not isinstance(root, DxRoot):  # pragma: no cover - block 0 is the root
            raise CorruptionError(f"directory inode {inode.ino}: no htree root")
        level = list(root.node.blocks[: root.node.count])
        for _ in range(root.indirect_levels):
            nxt: list[int] = []
            for lblk in level:
                node = await self.dx_block(inode, lblk)
                if isinstance(node, DxRoot):
                    raise CorruptionError(f"directory inode {inode.ino}: htree loops to root")
                nxt.extend(node.blocks[: node.count])
            level = nxt
        return level

    def _readdir_inline(self, inode: Inode, data: bytes, off: int) -> list[DirEntry]:
        out: list[DirEntry] = []
        parent = int.from_bytes(data[:INLINE_DOTDOT_SIZE], "little")
        if off < 1:
            out.append(DirEntry(b".", inode.ino, FT_DIR, 1))
        if off < 2:
            out.append(DirEntry(b"..", parent, FT_DIR, 2))
        start = max(off, INLINE_DOTDOT_SIZE)
        for e in self._inline_dirents(inode, data):
            if e.offset >= start and e.inode and e.name:
                out.append(DirEntry(e.name, e.inode, e.file_type, e.offset + e.rec_len))
        return out

    def _inline_dirents(self, inode: Inode, data: bytes) -> list[Dirent]:
        # two regions: i_block after the 4-byte parent, then the system.data value
        first = self._parse(data, INLINE_DOTDOT_SIZE, min(I_BLOCK_SIZE, len(data)), inode.ino)
        second = (self._parse(data, I_BLOCK_SIZE, len(data), inode.ino)
                  if len(data) > I_BLOCK_SIZE else [])
        return first + second

    # ---------------------------------------------------------------------------------------
    # lookup

    async def lookup(self, parent_ino: int, name: bytes) -> int:
        """The inode number ``name`` names in directory ``parent_ino``; NoEntryError if none."""
        inode = await self._dir_inode(parent_ino)
        if not name or len(name) > EXT4_NAME_LEN or b"/" in name:
            raise NoEntryError(f"no entry {name!r}")
        info = await self._vol.inode_info(inode)
        if info.inline is not None:
            if name == b".":
                return inode.ino
            if name == b"..":
                return int.from_bytes(info.inline[:INLINE_DOTDOT_SIZE], "little")
            for e in self._inline_dirents(inode, info.inline):
                if e.inode and self._name_eq(inode, e.name, name):
                    return e.inode
            raise NoEntryError(f"no entry {name!r}")
        if info.fmap is None:  # pragma: no cover
            raise NoEntryError(f"no entry {name!r}")
        if inode.is_encrypted and name not in _DOTS:
            return await self._encrypted_lookup(inode, info.fmap, name)
        if self.is_dx(inode) and name not in _DOTS:
            found = await self._dx_lookup(inode, info.fmap, name)
            if found is not None:
                return found
            # None: the index is unusable (ERR_BAD_DX_DIR), fall back to a linear scan
        bs = self.block_size
        nblocks = (inode.i_size + bs - 1) // bs
        if nblocks > 1 and not self._casefolded(inode):
            return await self._linear_table_lookup(inode, info.fmap, name, nblocks)
        if nblocks == 1 and not self._casefolded(inode):
            # the block's name table (built once, bounded) instead of comparing names one by
            # one; a hole finds nothing, as the scan below would
            if await self.block_entries(inode, info.fmap, 0) is None:
                raise NoEntryError(f"no entry {name!r}")
            found = (await self.leaf_names(inode, 0)).get(name)
            if found is None:
                raise NoEntryError(f"no entry {name!r}")
            return found
        for lblk in chain.from_iterable(await self._dir_ranges(info.fmap, nblocks)):
            for e in await self.block_entries(inode, info.fmap, lblk) or ():
                if e.inode and self._name_eq(inode, e.name, name):
                    return e.inode
        raise NoEntryError(f"no entry {name!r}")

    async def _linear_table_lookup(
        self, inode: Inode, fmap: FileMap, name: bytes, nblocks: int
    ) -> int:
        """Lookup in a multi-block linear directory through a name table built by one scan.

        Without it, ``find``/``tar`` over an ext2 directory of n entries costs n^2 record
        parses. The first record of a name wins, as in a block-order scan; a block that
        fails its checksum makes a miss an error (the kernel's scan would have hit it).
        """
        table = self._meta.linear_dirs.get(inode.ino)
        if table is None:
            names: dict[bytes, int] = {}
            bad: list[int] = []
            for lblk in chain.from_iterable(await self._dir_ranges(fmap, nblocks)):
                try:
                    entries = await self.block_entries(inode, fmap, lblk)
                except ChecksumError:
                    bad.append(lblk)
                    continue
                for e in entries or ():
                    if e.inode and e.name:
                        names.setdefault(e.name, e.inode)
            table = (names, tuple(bad))
            if len(names) <= LINEAR_TABLE_MAX:
                self._meta.linear_dirs.put(inode.ino, table)
        found = table[0].get(name)
        if found is not None:
            return found
        if table[1]:
            raise ChecksumError(
                f"directory inode {inode.ino} block {table[1][0]}: checksum invalid"
            )
        raise NoEntryError(f"no entry {name!r}")

    async def _dx_lookup(self, inode: Inode, fmap: FileMap, name: bytes) -> int | None:
        """htree lookup; the inode number, NoEntryError, or None if the index is unusable."""
        return await dx_lookup(self, inode, name)

    async def _encrypted_lookup(self, inode: Inode, fmap: FileMap, name: bytes) -> int:
        """Lookup by no-key name: the presented names of all entries, built once per
        directory (a bounded cache), since no hash of the plaintext name is available."""
        names = self._meta.nokey_dirs.get(inode.ino)
        if names is None:
            version = await self._nokey_hash_version(inode)
            names = {}
            bs = self.block_size
            for lblk in chain.from_iterable(
                await self._dir_ranges(fmap, (inode.i_size + bs - 1) // bs)
            ):
                for e in await self.block_entries(inode, fmap, lblk) or ():
                    if e.inode and e.name:
                        names.setdefault(self._nokey(e.name, version), e.inode)
            self._meta.nokey_dirs.put(inode.ino, names)
        found = names.get(name)
        if found is None:
            raise NoEntryError(f"no entry {name!r}")
        return found

    def _casefolded(self, inode: Inode) -> bool:
        return self._casefold_fs and inode.has_flag(EXT4_CASEFOLD_FL)

    def _name_eq(self, inode: Inode, disk: bytes, name: bytes) -> bool:
        if self._casefolded(inode):
            return casefold.names_match(disk, name)
        return disk == name

    # ---------------------------------------------------------------------------------------
    # no-key names of encrypted directories

    async def _nokey_hash_version(self, inode: Inode) -> int:
        """Hash version whose (major, minor) prefix the no-key names of ``inode`` carry, or -1
        for zeros: the kernel's readdir hashes entries whenever it takes the htree path
        (is_dx_dir: dir_index and an index, or a one-block directory)."""
        sb = self.sb
        if not sb.has_compat(F.COMPAT_DIR_INDEX):
            return -1
        if inode.has_flag(EXT4_INDEX_FL):
            raw = await self.dir_block_raw(inode, 0)
            if raw is None:
                return -1
            version = raw[DX_ROOT_HASH_VERSION_OFF]
        elif self._one_block(inode):
            version = sb.s_def_hash_version
        else:
            return -1
        return version + sb.hash_unsigned if version <= DX_HASH_TEA else version

    def _nokey(self, cipher: bytes, version: int) -> bytes:
        if fscrypt.is_dot_or_dotdot(cipher):
            return cipher
        major = minor = 0
        if version >= 0:
            seed = struct.unpack("<4I", self.sb.s_hash_seed)
            try:
                major, minor = ext4fs_dirhash(cipher, version, seed)
            except (NotSupportedError, CorruptionError):
                major = minor = 0
        return fscrypt.nokey_name(cipher, major, minor)

    # ---------------------------------------------------------------------------------------
    # directory blocks: mapped, read, checked, parsed (and the DxHost calls of volume_htree.py)

    async def _dir_inode(self, ino: int) -> Inode:
        inode = await self._vol.inode(ino)
        if not inode.is_dir:
            raise NotADirError(f"inode {ino} is not a directory")
        return inode

    async def _next_dir_block(self, fmap: FileMap, lblk: int, nblocks: int) -> int:
        """``lblk`` if it is mapped, else the next mapped block of the directory (``nblocks``
        if none): a hole is skipped whole, as ext4_readdir skips ``map.m_len`` blocks, so a
        forged i_size costs a few map walks, not a visit per block, and never holds the
        event loop (a checkpoint per window)."""
        blk_of = getattr(fmap, "block", None)
        if lblk >= nblocks or blk_of is None or await blk_of(lblk) is not None:
            return lblk
        bs = self.block_size
        end = min(nblocks, _MAX_LBLK)
        while lblk < end:
            span = min(end - lblk, _HOLE_WINDOW)
            for run in await fmap.map(lblk * bs, span * bs):
                if run.dev_off is not None:
                    return max(lblk, run.file_off // bs)
            lblk += span
            await trio.lowlevel.checkpoint()
        return nblocks

    async def _dir_ranges(self, fmap: FileMap, nblocks: int) -> list[range]:
        """The mapped blocks ``[0, nblocks)`` of a directory as ranges, holes skipped."""
        out: list[range] = []
        lblk = 0
        while (lblk := await self._next_dir_block(fmap, lblk, nblocks)) < nblocks:
            if out and out[-1].stop == lblk:
                out[-1] = range(out[-1].start, lblk + 1)
            else:
                out.append(range(lblk, lblk + 1))
            lblk += 1
            if lblk % (_SCAN_YIELD * 16) == 0:
                await trio.lowlevel.checkpoint()
        return out

    async def _dir_block(self, inode: Inode, fmap: FileMap, lblk: int) -> bytes | None:
        """Directory block ``lblk`` (None for a hole), read as metadata."""
        blk_of = getattr(fmap, "block", None)
        if blk_of is None:  # pragma: no cover - block maps always have block()
            raise CorruptionError(f"inode {inode.ino}: directory without a block map")
        pblk = await blk_of(lblk)
        if pblk is None:
            return None
        return bytes(await self._reader.read_dev(pblk * self.block_size, self.block_size))

    async def dir_block_raw(self, inode: Inode, lblk: int) -> bytes | None:
        """Directory block ``lblk`` as stored (None for a hole), unchecked."""
        return await self._dir_block(inode, await self._vol.fmap(inode), lblk)

    async def block_entries(self, inode: Inode, fmap: FileMap, lblk: int) -> list[Dirent] | None:
        """Parsed, checked records of directory block ``lblk`` (None: a hole), cached.

        Parsing a block in Python costs far more than reading it from the page cache, and
        find/tar look up every name readdir just listed, so parsed blocks are kept (bounded).
        """
        key = (inode.ino, lblk)
        entries = self._meta.dir_blocks.get(key)
        if entries is not None:
            return entries
        raw = await self._dir_block(inode, fmap, lblk)
        if raw is None:
            return None
        entries = self._leaf_entries(inode, lblk, raw)
        self._parsed_blocks += 1
        if self._parsed_blocks % _SCAN_YIELD == 0:
            # a scan over many cached blocks never awaits I/O: let other requests run
            await trio.lowlevel.checkpoint()
        self._meta.dir_blocks.put(key, entries)
        return entries

    def _parse(self, buf: bytes, start: int, end: int, ino: int) -> list[Dirent]:
        entries, bad = parse_dirents(
            buf,
            start,
            end,
            block_size=self.block_size,
            inodes_count=self.sb.s_inodes_count,
            filetype=self._filetype,
        )
        if bad is not None:
            self.log_once(("dirent", ino), logging.ERROR, "directory inode %d: %s", ino, bad)
        return entries

    def _is_dx_block(self, inode: Inode, lblk: int, raw: bytes) -> bool:
        """An htree index block (root or node), as __ext4_read_dirblock classifies blocks."""
        if not self.is_dx(inode):
            return False
        if lblk == 0:
            return True
        rec_len = rec_len_from_disk(int.from_bytes(raw[4:6], "little"), self.block_size)
        return rec_len == self.block_size

    def _leaf_entries(self, inode: Inode, lblk: int, raw: bytes) -> list[Dirent]:
        """Entries of one directory block, its checksum checked as the kernel checks it.

        dx index blocks contribute only what the kernel shows of them ("." and ".." of the
        root); a checksum mismatch raises ChecksumError (with a log line).
        """
        if self._is_dx_block(inode, lblk, raw) and (
            lblk == 0 or int.from_bytes(raw[0:4], "little") == 0
        ):
            # an index node's fake record has inode 0; a leaf holding one entry that spans
            # the whole block (no checksum tail) also has rec_len == block size, and its
            # entry must not be lost
            self.check_index_block(inode, lblk, raw)
            if lblk != 0:
                return []
            dots = self._parse(raw, 0, self.block_size, inode.ino)[:2]
            return [e for e in dots if e.name in (b".", b"..")]
        if self._vol.verify_csum and not csum.verify_dir_block(
            raw, self._vol.inode_seed(inode.ino, inode.i_generation)
        ):
            raise self._vol.bad_csum(f"directory inode {inode.ino} block {lblk}")
        return self._parse(raw, 0, self.block_size, inode.ino)

    def is_dx(self, inode: Inode) -> bool:
        """An indexed directory (dir_index and the inode's index flag)."""
        return self.sb.has_compat(F.COMPAT_DIR_INDEX) and inode.has_flag(EXT4_INDEX_FL)

    async def dx_block(self, inode: Inode, lblk: int) -> DxRoot | DxBlock:
        key = (inode.ino, lblk)
        node = self._meta.dx_blocks.get(key)
        if node is not None:
            return node
        raw = await self._dir_block(inode, await self._vol.fmap(inode), lblk)
        if raw is None:
            raise CorruptionError(f"directory inode {inode.ino}: htree block {lblk} is a hole")
        if not self._is_dx_block(inode, lblk, raw):
            raise CorruptionError(
                f"directory inode {inode.ino}: leaf block {lblk} found instead of index block"
            )
        self.check_index_block(inode, lblk, raw)
        csum_on = self.sb.has_metadata_csum
        if lblk == 0:
            node = parse_dx_root(
                raw,
                block_size=self.block_size,
                csum=csum_on,
                largedir=self.sb.has_incompat(F.INCOMPAT_LARGEDIR),
            )
        else:
            node = parse_dx_node(raw, block_size=self.block_size, csum=csum_on)
        self._meta.dx_blocks.put(key, node)
        return node

    async def leaf_names(self, inode: Inode, lblk: int) -> dict[bytes, int]:
        key = (inode.ino, lblk)
        names = self._meta.leaf_names.get(key)
        if names is None:
            entries = await self.block_entries(inode, await self._vol.fmap(inode), lblk)
            if entries is None:
                raise CorruptionError(f"directory inode {inode.ino}: htree leaf is a hole")
            names = {}
            for e in entries:
                if e.inode and e.name:
                    names.setdefault(e.name, e.inode)
            self._meta.leaf_names.put(key, names)
        return names

    def exact_names(self, inode: Inode) -> bool:
        return not self._casefolded(inode)

    def check_index_block(self, inode: Inode, lblk: int, raw: bytes) -> None:
        if self._vol.verify_csum and not csum.verify_dx_node(
            raw, self._vol.inode_seed(inode.ino, inode.i_generation)
        ):
            raise self._vol.bad_csum(f"directory inode {inode.ino} index block {lblk}")

    def name_matches(self, inode: Inode, disk: bytes, name: bytes) -> bool:
        return self._name_eq(inode, disk, name)

    def hash_name(self, inode: Inode, name: bytes) -> bytes:
        if self._casefolded(inode):
            folded = casefold.casefold(name)
            if folded is not None:
                return folded
        return name

