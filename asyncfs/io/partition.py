"""Partition tables: MBR (primary, extended and logical) and GPT (CRCs checked, backup header
used when the primary is damaged), numbered as the Linux kernel numbers ``/dev/sdaN``.

Pure parsing over a ``read(offset, length)`` callable, so it runs on a file before the event
loop starts and in a worker thread after.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Reader = Callable[[int, int], bytes]

MBR_SECTOR = 512
_MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_MBR_PROTECTIVE = 0xEE
_MBR_MAX_LOGICAL = 256  # the chain is a linked list on disk: bound it against loops
_GPT_SIGNATURE = b"EFI PART"
_GPT_MAX_ENTRIES_BYTES = 1 << 20

MBR_TYPE_NAMES: dict[int, str] = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Ext'd (LBA)", 0x82: "Linux swap / Solaris", 0x83: "Linux", 0x85: "Linux extended",
    0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}

GPT_TYPE_NAMES: dict[str, str] = {
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM-64)",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": "Linux server data",
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D": "Linux variable data",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
}


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition; ``start`` and ``size`` in bytes from the start of the image."""

    number: int
    start: int
    size: int
    type: str  # human-readable type name
    type_id: str  # MBR: two hex digits ("83"); GPT: the type GUID, upper case
    name: str = ""  # GPT partition name
    uuid: str = ""  # GPT unique partition GUID
    bootable: bool = False
    container: bool = False  # an MBR extended partition: holds logical ones, no filesystem


@dataclass(frozen=True, slots=True)
class PartitionTable:
    kind: Literal["mbr", "gpt"]
    sector_size: int
    partitions: tuple[Partition, ...]
    disk_id: str = ""
    warnings: tuple[str, ...] = field(default=())


class PartitionTableError(Exception):
    """A partition table is present but cannot be used (both GPT headers damaged)."""


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(boot flag, type, start LBA, sector count) of the four slots of an MBR/EBR."""
    out = []
    for i in range(4):
        boot, ptype, start, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i)
        out.append((boot, ptype, start, count))
    return out


def _looks_like_fat_boot_sector(sector: bytes) -> bool:
    return sector[0] in (0xEB, 0xE9) and (
        sector[0x52:0x57] == b"FAT32" or sector[0x36:0x39] == b"FAT"
    )


def parse_partition_table(read: Reader, disk_size: int) -> PartitionTable | None:
    """The partition table of an image ``disk_size`` bytes long, or None for a bare image.

    Raises PartitionTableError for a protective MBR whose GPT headers are both damaged.
    """
    mbr = read(0, MBR_SECTOR)
    if len(mbr) < MBR_SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    entries = _mbr_entries(mbr)
    if any(boot not in (0x00, 0x80) for boot, _, _, _ in entries):
        return None
    if all(ptype == 0 for _, ptype, _, _ in entries):
        return None
    if any(ptype == _MBR_PROTECTIVE for _, ptype, _, _ in entries):
        return _parse_gpt(read, disk_size)
    if _looks_like_fat_boot_sector(mbr):
        return None
    return _parse_mbr(read, disk_size, mbr, entries)


def _mbr_partition(number: int, boot: int, ptype: int, start: int, count: int) -> Partition:
    return Partition(
        number=number,
        start=start * MBR_SECTOR,
        size=count * MBR_SECTOR,
        type=MBR_TYPE_NAMES.get(ptype, f"type 0x{ptype:02x}"),
        type_id=f"{ptype:x}",
        bootable=boot == 0x80,
        container=ptype in _MBR_EXTENDED,
    )


def _parse_mbr(
    read: Reader, disk_size: int, mbr: bytes, entries: list[tuple[int, int, int, int]]
) -> PartitionTable:
    parts: list[Partition] = []
    warnings: list[str] = []
    extended: tuple[int, int] | None = None
    for slot, (boot, ptype, start, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        parts.append(_mbr_partition(slot + 1, boot, ptype, start, count))
        if ptype in _MBR_EXTENDED and extended is None:  # the kernel follows only the first
            extended = (start, count)
    if extended is not None:
        parts.extend(_parse_logical(read, disk_size, extended, warnings))
    disk_id = f"0x{struct.unpack_from('<I', mbr, 440)[0]:08x}"
    return PartitionTable("mbr", MBR_SECTOR, tuple(parts), disk_id, tuple(warnings))


def _parse_logical(
    read: Reader, disk_size: int, extended: tuple[int, int], warnings: list[str]
) -> list[Partition]:
    """Walk the EBR chain: each EBR holds one logical partition (relative to that EBR) and a
    link to the next EBR (relative to the extended partition's start)."""
    ext_start, _ = extended
    parts: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = ext_start
    number = 5
    while len(seen) < _MBR_MAX_LOGICAL:
        if ebr_lba in seen:
            warnings.append(f"loop in the extended partition chain at sector {ebr_lba}")
            break
        seen.add(ebr_lba)
        ebr = read(ebr_lba * MBR_SECTOR, MBR_SECTOR)
        if len(ebr) < MBR_SECTOR or ebr[510:512] != b"\x55\xaa":
            if ebr_lba != ext_start:
                warnings.append(f"bad extended boot record at sector {ebr_lba}")
            break
        next_lba: int | None = None
        for boot, ptype, start, count in _mbr_entries(ebr):
            if ptype == 0 or count == 0:
                continue
            if ptype in _MBR_EXTENDED:
                if next_lba is None:
                    next_lba = ext_start + start
                continue
            parts.append(_mbr_partition(number, boot, ptype, ebr_lba + start, count))
            number += 1
        if next_lba is None or next_lba * MBR_SECTOR >= disk_size:
            break
        ebr_lba = next_lba
    return parts


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw)).upper()


@dataclass(frozen=True, slots=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int


def _gpt_header(read: Reader, lba: int, ss: int, disk_size: int) -> _GptHeader | str:
    """A header whose own CRC and fields check out, or why not."""
    if lba <= 0 or (lba + 1) * ss > disk_size:
        return f"header LBA {lba} outside the image"
    raw = read(lba * ss, ss)
    if len(raw) < 92 or raw[:8] != _GPT_SIGNATURE:
        return f"no GPT signature at LBA {lba}"
    hsize, hcrc = struct.unpack_from("<II", raw, 12)
    if hsize < 92 or hsize > ss:
        return f"bad GPT header size {hsize} at LBA {lba}"
    zeroed = raw[:16] + b"\0\0\0\0" + raw[20:hsize]
    if zlib.crc32(zeroed) != hcrc:
        return f"GPT header CRC mismatch at LBA {lba}"
    my_lba, alt, first, last = struct.unpack_from("<QQQQ", raw, 24)
    entries_lba, num, esize, ecrc = struct.unpack_from("<QIII", raw, 72)
    if my_lba != lba:
        return f"GPT header at LBA {lba} says it is at LBA {my_lba}"
    if esize < 128 or esize % 8 or num * esize > _GPT_MAX_ENTRIES_BYTES or first > last:
        return f"implausible GPT header fields at LBA {lba}"
    return _GptHeader(my_lba, alt, first, last, _guid(raw[56:72]), entries_lba, num, esize, ecrc)


def _gpt_entries(read: Reader, hdr: _GptHeader, ss: int) -> list[Partition] | str:
    nbytes = hdr.num_entries * hdr.entry_size
    raw = read(hdr.entries_lba * ss, nbytes)
    if len(raw) < nbytes:
        return "GPT partition entries run past the end of the image"
    if zlib.crc32(raw) != hdr.entries_crc:
        return "GPT partition entries CRC mismatch"
    parts = []
    for i in range(hdr.num_entries):
        e = raw[i * hdr.entry_size : (i + 1) * hdr.entry_size]
        if e[:16] == bytes(16):
            continue
        first, last, attrs = struct.unpack_from("<QQQ", e, 32)
        if last < first:
            continue
        type_guid = _guid(e[:16])
        parts.append(
            Partition(
                number=i + 1,  # the kernel keeps the slot index, gaps included
                start=first * ss,
                size=(last - first + 1) * ss,
                type=GPT_TYPE_NAMES.get(type_guid, type_guid),
                type_id=type_guid,
                name=e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0],
                uuid=_guid(e[16:32]),
                bootable=bool(attrs & 0x4),  # legacy BIOS bootable
            )
        )
    return parts


def _gpt_sector_sizes(read: Reader) -> tuple[int, ...]:
    if read(512, 8) == _GPT_SIGNATURE:
        return (512,)
    if read(4096, 8) == _GPT_SIGNATURE:
        return (4096,)
    return (512, 4096)  # no primary header at all: look for a backup at either sector size


def _parse_gpt(read: Reader, disk_size: int) -> PartitionTable:
    problems: list[str] = []
    for ss in _gpt_sector_sizes(read):
        if disk_size < 3 * ss:
            continue
        last_lba = disk_size // ss - 1
        primary = _gpt_header(read, 1, ss, disk_size)
        alt_lba = last_lba
        if isinstance(primary, _GptHeader):
            parts = _gpt_entries(read, primary, ss)
            if not isinstance(parts, str):
                return PartitionTable("gpt", ss, tuple(parts), primary.disk_guid)
            why = parts
            alt_lba = primary.alternate_lba
        else:
            why = primary
        problems.append(f"primary: {why}")
        backup = _gpt_header(read, alt_lba, ss, disk_size)
        if not isinstance(backup, _GptHeader) and alt_lba != last_lba:
            backup = _gpt_header(read, last_lba, ss, disk_size)
        if isinstance(backup, _GptHeader):
            bparts = _gpt_entries(read, backup, ss)
            if not isinstance(bparts, str):
                note = f"primary GPT damaged ({why}); using the backup at LBA {backup.my_lba}"
                return PartitionTable("gpt", ss, tuple(bparts), backup.disk_guid, (note,))
            problems.append(f"backup: {bparts}")
        else:
            problems.append(f"backup: {backup}")
    raise PartitionTableError("protective MBR but no usable GPT (" + "; ".join(problems) + ")")
