"""Partition tables parsed by asyncfs.io, checked against ``sfdisk --json`` on images built with
sfdisk (MBR with logical partitions, GPT, GPT with a damaged primary header or entry array)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncfs.errors import ImageError
from asyncfs.io import describe_image, parse_partition_table
from asyncfs.io import partition as partition_mod
from asyncfs.io.image import file_reader
from asyncfs.io.partition import PartitionTable, PartitionTableError
from tests.mutants import breaks

MIB = 1 << 20

MBR_SCRIPT = """label: dos
start=63, size=20000, type=83
size=10M, type=82
type=5
size=5M, type=83
size=3M, type=83
type=8e
"""

GPT_SCRIPT = """label: gpt
size=10M, type=L, name="root fs"
size=4M, type=S
type=U, name=esp
"""


def make_disk(path: Path, script: str, size_mib: int = 64) -> dict[str, object]:
    """A sparse image partitioned by sfdisk; returns sfdisk's own JSON view of it."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True,
                   capture_output=True)
    return sfdisk_json(path)


def sfdisk_json(path: Path) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "--json", str(path)], text=True, check=True,
                         capture_output=True).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


def mkfs_at(path: Path, fstype: str, offset: int, size_kib: int) -> None:
    subprocess.run(["mke2fs", "-q", "-F", "-t", fstype, "-E", f"offset={offset}", str(path),
                    f"{size_kib}k"], check=True, capture_output=True)


def parse(path: Path) -> PartitionTable | None:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse_partition_table(file_reader(fd, size), size)
    finally:
        os.close(fd)


def expected_rows(sf: dict[str, object]) -> list[tuple[int, int, int, str, str]]:
    """(number, start sector, sectors, type id, name) for each partition sfdisk lists."""
    rows = []
    dev = str(sf["device"])
    for p in sf["partitions"]:  # type: ignore[attr-defined]
        number = int(p["node"][len(dev):])
        rows.append((number, p["start"], p["size"], p["type"].upper(), p.get("name", "")))
    return rows


def our_rows(table: PartitionTable) -> list[tuple[int, int, int, str, str]]:
    ss = table.sector_size
    return [(p.number, p.start // ss, p.size // ss, p.type_id.upper(), p.name)
            for p in table.partitions]


_LOGICAL_BROKEN = {
    "numbered_from_1": ("number = 5", "number = 1"),
    "start_from_extended": ("ebr_lba + start, count", "ext_start + start, count"),
}


@pytest.mark.parametrize("variant", ["kernel", *_LOGICAL_BROKEN])
def test_mbr_with_logical_partitions_matches_sfdisk(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variants: numbering logical partitions from 1 instead of 5, 6, 7..., or
    taking a logical start relative to the extended partition instead of its own EBR."""
    if variant != "kernel":
        breaks(variant, monkeypatch, partition_mod, "_parse_logical", *_LOGICAL_BROKEN[variant])
    img = tmp_path / "mbr.img"
    sf = make_disk(img, MBR_SCRIPT)
    table = parse(img)
    assert table is not None and table.kind == "mbr"
    assert (our_rows(table) == expected_rows(sf)) == (variant == "kernel")
    if variant != "kernel":
        return
    assert table.disk_id == sf["id"]
    assert [p.container for p in table.partitions] == [False, False, True, False, False, False]


def test_gpt_matches_sfdisk(tmp_path: Path) -> None:
    img = tmp_path / "gpt.img"
    sf = make_disk(img, GPT_SCRIPT)
    table = parse(img)
    assert table is not None and table.kind == "gpt" and table.warnings == ()
    assert our_rows(table) == expected_rows(sf)
    assert table.disk_id == sf["id"]
    assert [p.uuid for p in table.partitions] == [p["uuid"] for p in sf["partitions"]]  # type: ignore[attr-defined]
    assert [p.type for p in table.partitions] == ["Linux filesystem", "Linux swap", "EFI System"]


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


_GPT_BROKEN = {
    "no_header_crc": ("_gpt_header", "if zlib.crc32(zeroed) != hcrc:", "if False:"),
    "no_entries_crc": ("_gpt_entries", "if zlib.crc32(raw) != hdr.entries_crc:", "if False:"),
}


@pytest.mark.parametrize(("variant", "damage"), [
    ("kernel", "header"), ("kernel", "entries"), ("kernel", "signature"),
    ("no_header_crc", "header"), ("no_entries_crc", "entries"),
])
def test_gpt_damaged_primary_uses_backup(
    tmp_path: Path, damage: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variants: trusting the primary header without checking its CRC (then the
    damaged header is used, with no warning), or not checking the entry array CRC (the
    damaged entry is used)."""
    if variant != "kernel":
        breaks(variant, monkeypatch, partition_mod, *_GPT_BROKEN[variant])
    img = tmp_path / "gpt.img"
    before = make_disk(img, GPT_SCRIPT)
    if damage == "header":
        _corrupt(img, 512 + 40, b"\xff\xff")  # inside first_usable_lba: the header CRC breaks
    elif damage == "entries":
        _corrupt(img, 1024 + 32, b"\x01")  # first entry's starting LBA: the array CRC breaks
    else:
        _corrupt(img, 512, b"XXXXXXXX")
    table = parse(img)
    assert table is not None and table.kind == "gpt"
    backup = (our_rows(table) == expected_rows(before) and len(table.warnings) == 1
              and "backup" in table.warnings[0])
    assert backup == (variant == "kernel"), (our_rows(table), table.warnings)
    if variant != "kernel":
        return
    after = subprocess.run(["sfdisk", "--json", str(img)], text=True, capture_output=True)
    if after.returncode == 0:  # libfdisk also falls back to the backup header
        assert our_rows(table) == expected_rows(json.loads(after.stdout)["partitiontable"])


def test_gpt_both_headers_damaged_is_an_error(tmp_path: Path) -> None:
    img = tmp_path / "gpt.img"
    make_disk(img, GPT_SCRIPT)
    _corrupt(img, 512, b"XXXXXXXX")
    _corrupt(img, 64 * MIB - 512, b"XXXXXXXX")
    with pytest.raises(PartitionTableError, match="no usable GPT"):
        parse(img)
    with pytest.raises(ImageError, match="no usable GPT"):
        describe_image(img)


@pytest.mark.parametrize("variant", ["kernel", "no_header_crc"])
def test_gpt_backup_header_crc_is_checked(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: accepting the backup header without its CRC check."""
    breaks(variant, monkeypatch, partition_mod, *_GPT_BROKEN["no_header_crc"])
    img = tmp_path / "gpt.img"
    make_disk(img, GPT_SCRIPT)
    _corrupt(img, 512, b"XXXXXXXX")
    _corrupt(img, 64 * MIB - 512 + 40, b"\xff")
    try:
        parse(img)
        refused = False
    except PartitionTableError:
        refused = True
    assert refused == (variant == "kernel")


def test_describe_image_names_filesystems(tmp_path: Path) -> None:
    """ext4 at an unaligned start (sector 63), ext2 and ext3 in logical partitions, swap."""
    img = tmp_path / "mbr.img"
    sf = make_disk(img, MBR_SCRIPT)
    parts = {int(p["node"][len(str(sf["device"])):]): p for p in sf["partitions"]}  # type: ignore[attr-defined]
    mkfs_at(img, "ext4", parts[1]["start"] * 512, 9000)
    mkfs_at(img, "ext2", parts[5]["start"] * 512, 5000)
    mkfs_at(img, "ext3", parts[6]["start"] * 512, 3000)
    swap = tmp_path / "swap"
    with open(swap, "wb") as f:
        f.truncate(4 * MIB)
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)
    _corrupt(img, parts[2]["start"] * 512, swap.read_bytes()[:8192])
    info = describe_image(img)
    assert info.table == "mbr"
    assert {p.number: p.filesystem for p in info.partitions} == {
        1: "ext4", 2: "swap", 3: "", 5: "ext2", 6: "ext3", 7: "unknown"}
    text = info.format()
    assert "ext4" in text and "Linux swap" in text


def test_describe_bare_image(tmp_path: Path) -> None:
    img = tmp_path / "bare.img"
    with open(img, "wb") as f:
        f.truncate(8 * MIB)
    mkfs_at(img, "ext4", 0, 8192)
    info = describe_image(img)
    assert info.table == "none"
    assert [(p.number, p.start, p.size, p.filesystem) for p in info.partitions] == [
        (0, 0, 8 * MIB, "ext4")]


def _ext_sb(compat: int, incompat: int, ro_compat: int) -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<H", sb, 56, 0xEF53)
    struct.pack_into("<III", sb, 92, compat, incompat, ro_compat)
    return bytes(sb)


def test_ext_flavours_by_features() -> None:
    from asyncfs.io.fsdetect import ext_kind

    assert ext_kind(_ext_sb(0, 0x2, 0x1)) == "ext2"
    assert ext_kind(_ext_sb(0x4, 0x2, 0x1)) == "ext3"
    assert ext_kind(_ext_sb(0x4, 0x2 | 0x40, 0x1)) == "ext4"  # extents
    assert ext_kind(_ext_sb(0x4, 0x2, 0x1 | 0x400)) == "ext4"  # metadata_csum
    assert ext_kind(_ext_sb(0, 0x8, 0)) == "jbd"
    assert ext_kind(bytes(1024)) is None


def _gpt_disk(entries: list[tuple[bytes, int, int]], size: int = 4 * MIB) -> bytes:
    """A minimal valid GPT image in memory (for fuzzing around a valid table)."""
    disk = bytearray(size)
    disk[446:462] = struct.pack("<B3xB3xII", 0, 0xEE, 1, size // 512 - 1)
    disk[510:512] = b"\x55\xaa"
    arr = bytearray(128 * 128)
    for i, (tguid, first, last) in enumerate(entries):
        arr[i * 128 : i * 128 + 48] = tguid + bytes(16) + struct.pack("<QQ", first, last)
    last_lba = size // 512 - 1
    for my, alt, ent in ((1, last_lba, 2), (last_lba, 1, last_lba - 32)):
        hdr = bytearray(92)
        struct.pack_into("<8sIII4xQQQQ16sQIII", hdr, 0, b"EFI PART", 0x10000, 92, 0, my, alt,
                         34, last_lba - 33, bytes(16), ent, 128, 128, zlib.crc32(arr))
        struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
        disk[my * 512 : my * 512 + 92] = hdr
        disk[ent * 512 : ent * 512 + len(arr)] = arr
    return bytes(disk)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 4 * MIB - 1), st.binary(min_size=1, max_size=16)),
             max_size=6),
    st.booleans(),
)
def test_parser_survives_damage(edits: list[tuple[int, bytes]], gpt: bool) -> None:
    """Crafted tables never crash the parser or send it past the image: it returns a table,
    None, or PartitionTableError."""
    if gpt:
        disk = bytearray(_gpt_disk([(b"\xaf" * 16, 34, 2000), (b"\x11" * 16, 2048, 4000)]))
    else:
        disk = bytearray(4 * MIB)
        disk[446:478] = struct.pack("<B3xB3xIIB3xB3xII", 0, 0x83, 1, 100, 0, 0x05, 200, 3000)
        disk[510:512] = b"\x55\xaa"
        disk[200 * 512 + 446 : 200 * 512 + 478] = struct.pack(
            "<B3xB3xIIB3xB3xII", 0, 0x83, 2, 50, 0, 0x05, 100, 100)
        disk[200 * 512 + 510 : 200 * 512 + 512] = b"\x55\xaa"
    for off, data in edits:
        disk[off : off + len(data)] = data[: len(disk) - off]
    size = len(disk)
    reads: list[tuple[int, int]] = []

    def read(off: int, length: int) -> bytes:
        reads.append((off, length))
        return bytes(disk[max(off, 0) : max(off, 0) + length]) if off < size else b""

    try:
        table = parse_partition_table(read, size)
    except PartitionTableError:
        return
    assert len(reads) < 600
    if table is not None:
        assert all(p.number >= 1 for p in table.partitions)


def test_fuzz_base_tables_are_valid() -> None:
    """The fuzz test above starts from tables that really parse (else it tests nothing)."""
    disk = _gpt_disk([(b"\xaf" * 16, 34, 2000), (b"\x11" * 16, 2048, 4000)])

    def read(off: int, length: int) -> bytes:
        return disk[off : off + length]

    table = parse_partition_table(read, len(disk))
    assert table is not None and table.kind == "gpt"
    assert [(p.number, p.start, p.size) for p in table.partitions] == [
        (1, 34 * 512, 1967 * 512), (2, 2048 * 512, 1953 * 512)]
