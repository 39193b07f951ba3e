"""The qcow2 on-disk format, decoded: the header and its extensions, L1 and L2 entries (with
extended L2 subclusters), and compressed clusters (deflate, zstd).

Pure functions over bytes that never await and never touch a file: ``Qcow2Device``
(``qcow2dev.py``) does the reading. Every refusal is an ``ImageError`` with a one-line message;
a damaged entry met while reading is a ``Qcow2Corrupt`` naming the guest range it spoils.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass

from asyncfs.errors import ImageError

MAGIC = b"QFI\xfb"

_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION = 1 << 3
_INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = 0x1F

_EXT_END = 0
_EXT_BACKING_FMT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

_OFFSET_MASK = ((1 << 56) - 1) & ~0x1FF  # bits 9-55: L1 entries and standard L2 descriptors
_L2_COMPRESSED = 1 << 62
_L2_COPIED = 1 << 63
_L2_ZERO = 1
SUBCLUSTERS = 32  # per cluster, with extended L2 entries

# QEMU's own limits: wider values are damage or hostile input, never a real image.
_MAX_CLUSTER_BITS = 21
_MAX_L1_BYTES = 32 << 20
_MAX_BACKING_NAME = 1023

# What an L2 entry (or one subcluster of it) says about a guest range.
UNALLOCATED = 0  # read from the backing file, or zeros without one
ZERO = 1  # reads as zeros
DATA = 2  # at ``host`` in the image file
COMPRESSED = 3  # the whole cluster, compressed at ``host`` in ``csize`` bytes


class Qcow2Corrupt(Exception):
    """One L1/L2 entry or compressed cluster is damaged; reads of its range fail (EIO)."""


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The fields of a qcow2 header that reading needs, checked for sanity."""

    version: int
    cluster_bits: int
    size: int  # the virtual disk's size in bytes
    l1_size: int  # entries
    l1_offset: int
    incompatible: int
    compression_type: int
    backing_file: str | None
    backing_fmt: str | None
    nb_snapshots: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & _INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (each 16 bytes with extended L2, else 8)."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // SUBCLUSTERS if self.extended_l2 else self.cluster_size

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & _INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & _INCOMPAT_CORRUPT)

    @property
    def compression_name(self) -> str:
        return {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}.get(
            self.compression_type, str(self.compression_type))

    def notes(self) -> list[str]:
        """Warnings in the words ``qemu-img info`` uses for the same bits."""
        out = []
        if self.dirty:
            out.append("cleanly shut down: no (dirty bit set: refcounts may be stale; "
                       "the data is read as mapped)")
        if self.corrupt:
            out.append("corrupt: true (QEMU marked the image corrupt; it is read as mapped, "
                       "damaged clusters fail with EIO)")
        return out


def is_qcow2(head: bytes) -> bool:
    return head[:4] == MAGIC


def header_bytes_needed(head: bytes) -> int:
    """How much of the file's start ``parse_header`` needs: the first cluster (the header, its
    extensions and the backing file name live there), given at least the first 24 bytes."""
    if len(head) < 24:
        return 4096
    bits: int = struct.unpack_from(">I", head, 20)[0]
    return 1 << max(9, min(bits, _MAX_CLUSTER_BITS))


def parse_header(head: bytes, file_size: int, name: str) -> Qcow2Header:
    """Decode and check the header in ``head`` (the file's first cluster, or all of a shorter
    file). ImageError for anything that cannot be read: a bad field, encryption, an external
    data file, an unknown incompatible feature."""
    if len(head) < 72 or head[:4] != MAGIC:
        raise ImageError(f"{name}: not a qcow2 image (bad magic or truncated header)")
    (version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, _rt_off, _rt_clusters,
     nb_snap, _snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", head, 4)
    if version not in (2, 3):
        raise ImageError(f"{name}: qcow2 version {version} is not supported (only 2 and 3)")
    incompat = compression = 0
    hdr_len = 72
    if version == 3:
        if len(head) < 104:
            raise ImageError(f"{name}: qcow2 header is truncated")
        incompat = struct.unpack_from(">Q", head, 72)[0]
        hdr_len = struct.unpack_from(">I", head, 100)[0]
        if hdr_len < 104 or hdr_len % 8 or hdr_len > len(head):
            raise ImageError(f"{name}: qcow2 header length {hdr_len} is invalid")
        if hdr_len > 104:
            compression = head[104]
    if not 9 <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise ImageError(f"{name}: qcow2 cluster_bits {cluster_bits} is out of range (9-21)")
    if crypt:
        kind = {1: "AES", 2: "LUKS"}.get(crypt, f"method {crypt}")
        raise ImageError(f"{name}: encrypted qcow2 ({kind}) is not supported")
    if incompat & _INCOMPAT_DATA_FILE:
        raise ImageError(f"{name}: qcow2 with an external data file is not supported")
    unknown = incompat & ~_INCOMPAT_KNOWN
    if unknown:
        raise ImageError(f"{name}: qcow2 uses unknown incompatible features {unknown:#x}")
    if incompat & _INCOMPAT_COMPRESSION and compression == 0:
        raise ImageError(f"{name}: qcow2 compression type bit set but the type is zlib")
    if not incompat & _INCOMPAT_COMPRESSION:
        compression = COMPRESSION_ZLIB
    if compression not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise ImageError(f"{name}: qcow2 compression type {compression} is not supported")
    if incompat & _INCOMPAT_EXTL2 and cluster_bits < 14:
        raise ImageError(f"{name}: qcow2 extended L2 entries need clusters of 16 KiB or more")
    csize = 1 << cluster_bits
    entries_per_l2 = csize // (16 if incompat & _INCOMPAT_EXTL2 else 8)
    need_l1 = -(-size // (csize * entries_per_l2)) if size else 0
    if l1_size < need_l1 or l1_size * 8 > _MAX_L1_BYTES:
        raise ImageError(f"{name}: qcow2 L1 table of {l1_size} entries does not fit a "
                         f"{size}-byte disk")
    if l1_size and (l1_off % csize or l1_off + 8 * l1_size > file_size):
        raise ImageError(f"{name}: qcow2 L1 table at {l1_off} lies outside the file")
    backing: str | None = None
    if bf_off:
        if bf_size == 0 or bf_size > _MAX_BACKING_NAME or bf_off + bf_size > len(head):
            raise ImageError(f"{name}: qcow2 backing file name is out of range")
        backing = head[bf_off:bf_off + bf_size].decode("utf-8", "replace")
    backing_fmt = None
    if version == 3:
        backing_fmt = _extensions(head, hdr_len, name)
    elif bf_off:
        # QEMU writes extensions after a v2 header too, but older writers left other bytes
        # there: for v2 a malformed area only means "no backing format".
        with contextlib.suppress(ImageError):
            backing_fmt = _extensions(head[:bf_off], hdr_len, name)
    return Qcow2Header(version, cluster_bits, size, l1_size, l1_off, incompat, compression,
                       backing, backing_fmt, nb_snap)


def _extensions(head: bytes, pos: int, name: str) -> str | None:
    """The backing format named in the header extensions, if any."""
    fmt = None
    while pos + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, pos)
        pos += 8
        if kind == _EXT_END:
            break
        if pos + length > len(head):
            raise ImageError(f"{name}: qcow2 header extension {kind:#x} runs past the header")
        if kind == _EXT_BACKING_FMT:
            fmt = head[pos:pos + length].decode("ascii", "replace")
        pos += (length + 7) & ~7
    return fmt


def decode_table(raw: bytes) -> array[int]:
    """Big-endian 64-bit entries (an L1 table, or an L2 table) as native integers."""
    out = array("Q")
    out.frombytes(raw[: len(raw) - len(raw) % 8])
    if sys.byteorder == "little":
        out.byteswap()
    return out


def l2_table_offset(hdr: Qcow2Header, entry: int, file_size: int) -> int:
    """Where the L2 table an L1 entry points to starts, 0 for none; Qcow2Corrupt if the
    pointer is misaligned or outside the file."""
    off = entry & _OFFSET_MASK
    if off and (off % hdr.cluster_size or off + hdr.cluster_size > file_size):
        raise Qcow2Corrupt(f"L2 table offset {off:#x} is misaligned or outside the image file")
    return off


@dataclass(frozen=True, slots=True)
class Extent:
    """What ``length`` guest bytes starting at some guest offset hold (see the kinds above).
    ``host`` is the byte in the image file for DATA, the compressed data's start for
    COMPRESSED (with ``csize`` bytes and ``skip`` bytes into the decompressed cluster)."""

    kind: int
    length: int
    host: int = 0
    csize: int = 0
    skip: int = 0


def cluster_extents(hdr: Qcow2Header, entry: int, bitmap: int, within: int, length: int,
                    file_size: int) -> list[Extent]:
    """The extents of ``length`` bytes at ``within`` bytes into one guest cluster whose L2
    entry is ``entry`` (and subcluster ``bitmap`` with extended L2). Qcow2Corrupt for an entry
    that points outside the file or is malformed."""
    csize = hdr.cluster_size
    if entry & _L2_COMPRESSED:
        if hdr.extended_l2 and bitmap:
            raise Qcow2Corrupt("compressed cluster with a non-zero subcluster bitmap")
        host, span = compressed_span(hdr, entry)
        if host >= file_size:
            raise Qcow2Corrupt(f"compressed cluster at {host:#x} lies outside the image file")
        return [Extent(COMPRESSED, length, host, min(span, file_size - host), within)]
    off = entry & _OFFSET_MASK
    # The cluster may run past the file's end (QEMU leaves unwritten subclusters of the last
    # cluster out of the file, and reads them as zeros): only its start must be inside.
    if off and (off % csize or off >= file_size):
        raise Qcow2Corrupt(f"data cluster offset {off:#x} is misaligned or outside the file")
    if not hdr.extended_l2:
        if hdr.version >= 3 and entry & _L2_ZERO:
            return [Extent(ZERO, length)]
        if off == 0:
            return [Extent(UNALLOCATED, length)]
        return [Extent(DATA, length, off + within)]
    alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
    if alloc & zero:
        raise Qcow2Corrupt("subcluster both allocated and zero in an extended L2 entry")
    if alloc and off == 0:
        raise Qcow2Corrupt("allocated subclusters without a host cluster")
    sub = hdr.subcluster_size
    out: list[Extent] = []
    pos, end = within, within + length
    while pos < end:
        i = pos // sub
        n = min(end, (i + 1) * sub) - pos
        if alloc >> i & 1:
            kind = DATA
        elif zero >> i & 1:
            kind = ZERO
        else:
            kind = UNALLOCATED
        last = out[-1] if out else None
        if last is not None and last.kind == kind and (
                kind != DATA or last.host + last.length == off + pos):
            out[-1] = Extent(kind, last.length + n, last.host)
        else:
            out.append(Extent(kind, n, off + pos if kind == DATA else 0))
        pos += n
    return out


def compressed_span(hdr: Qcow2Header, entry: int) -> tuple[int, int]:
    """(host offset, bytes that may hold the data) of a compressed cluster's L2 entry."""
    x = 62 - (hdr.cluster_bits - 8)
    host = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (62 - x)) - 1)) + 1
    return host, sectors * 512 - (host & 511)


def decompress(hdr: Qcow2Header, data: bytes, name: str) -> bytes:
    """One compressed cluster, inflated to exactly ``cluster_size`` bytes; Qcow2Corrupt when the
    stream is bad or short. The stream may be followed by unrelated bytes (the next cluster's
    data shares the last sector), so decoding stops at the cluster's size."""
    want = hdr.cluster_size
    if hdr.compression_type == COMPRESSION_ZSTD:
        out = _zstd(data, want, name)
    else:
        try:
            # raw deflate: QEMU writes neither a zlib nor a gzip header
            out = zlib.decompressobj(-15).decompress(data, want)
        except zlib.error as err:
            raise Qcow2Corrupt(f"bad deflate data in a compressed cluster: {err}") from None
    if len(out) != want:
        raise Qcow2Corrupt(f"compressed cluster inflates to {len(out)} bytes, not {want}")
    return out


def _zstd(data: bytes, want: int, name: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise ImageError(f"{name}: its compressed clusters are zstd, and the Python module "
                         "zstandard is not installed (pip install zstandard)") from None
    try:
        # a stream reader bounds the output: a hostile frame cannot inflate past ``want``
        out = bytearray()
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while len(out) < want:
                chunk = reader.read(want - len(out))
                if not chunk:
                    break
                out += chunk
        return bytes(out)
    except zstandard.ZstdError as err:
        raise Qcow2Corrupt(f"bad zstd data in a compressed cluster: {err}") from None


def require_codec(hdr: Qcow2Header, name: str) -> None:
    """At open: a zstd image without the zstandard module is refused in one line (images that
    use zlib never need it)."""
    if hdr.compression_type == COMPRESSION_ZSTD:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ImageError(f"{name}: its compressed clusters are zstd, and the Python module "
                             "zstandard is not installed (pip install zstandard)") from None
