"""Checksums against images written by mke2fs/e2fsck (metadata_csum and gdt_csum)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncfs.ext4 import csum
from asyncfs.ext4.csum import (
    crc16,
    csum_seed_from_superblock,
    ext4_chksum,
    has_dirent_tail,
    inode_csum,
    inode_csum_seed,
    inode_generation,
    verify_dir_block,
    verify_dx_node,
    verify_extent_block,
    verify_group_desc,
    verify_inode,
    verify_superblock,
    verify_xattr_block,
)
from asyncfs.testing.imagegen import image_info
from tests.imagegen import corpus_image
from tests.mutants import breaks
from tests.unit.volume_walk import fails_unless_kernel

VARIANTS = ["kernel", "broken"]


def _broken(variant: str, monkeypatch: pytest.MonkeyPatch, name: str, old: str,
            new: str) -> None:
    """The broken variant of ``csum.name`` (see mutants.breaks), also under the name this
    test module imported it by."""
    breaks(variant, monkeypatch, csum, name, old, new)
    if variant != "kernel" and name in globals():
        monkeypatch.setitem(globals(), name, getattr(csum, name))


class Img:
    """Raw bytes of an image plus the facts needed to find objects (from dumpe2fs/debugfs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        info = image_info(path)
        self.bs = int(info["Block size"])
        self.inode_size = int(info["Inode size"])
        self.features = info["Filesystem features"].split()
        self.desc_size = int(info.get("Group descriptor size", "32"))
        self.groups = -(-int(info["Block count"]) // int(info["Blocks per group"]))
        self.first_data_block = int(info["First block"])
        self.sb = self.data[1024:2048]
        self.fs_seed = csum_seed_from_superblock(self.sb)
        self.uuid = self.sb[0x68:0x78]

    def block(self, nr: int) -> bytes:
        return self.data[nr * self.bs : (nr + 1) * self.bs]

    def debugfs(self, cmd: str) -> str:
        return subprocess.run(["debugfs", "-R", cmd, str(self.path)], capture_output=True,
                              check=True).stdout.decode("utf-8", "replace")

    def inode(self, path: str) -> tuple[int, bytes]:
        m = re.search(r"Inode (\d+) is part of block group \d+\s+located at block (\d+), "
                      r"offset (0x[0-9a-f]+)", self.debugfs(f"imap {path}"))
        assert m, path
        off = int(m.group(2)) * self.bs + int(m.group(3), 16)
        return int(m.group(1)), self.data[off : off + self.inode_size]

    def inode_seed(self, path: str) -> tuple[int, bytes]:
        ino, raw = self.inode(path)
        return inode_csum_seed(self.fs_seed, ino, inode_generation(raw)), raw

    def file_blocks(self, path: str) -> list[int]:
        """Data blocks of ``path`` in logical order, from debugfs stat."""
        out = []
        text = self.debugfs(f"stat {path}")
        for a, b in re.findall(r"\(\d+(?:-\d+)?\):(\d+)(?:-(\d+))?", text.split("EXTENTS:")[-1]):
            out += list(range(int(a), int(b or a) + 1))
        return out


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, Img]]:
    yield {p: Img(corpus_image(p)[1]) for p in ("ext4", "ext4-1k", "csum_seed",
                                                 "ext4-128inode", "gdt_csum", "gdt_csum-32")}


# corpus trees hold device nodes and foreign owners: built as root
pytestmark = pytest.mark.root

CSUM_PRESETS = ["ext4", "ext4-1k", "csum_seed", "ext4-128inode"]
PATHS = ["/", "files/big", "files/empty", "xattr/large", "sparse/fragmented", "links/len500",
         "special/null", "bigdir", "bigdir_long", "acl/default_dir"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_crc_relation(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4_chksum is raw CRC32C (no inversions); the package is standard CRC32C.

    Broken variant: passing the CRC seed straight as ``value`` gives a different result."""
    _broken(variant, monkeypatch, "ext4_chksum", "value=seed ^ _M) ^ _M", "value=seed)")
    with fails_unless_kernel(variant):
        assert ext4_chksum(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    if variant != "kernel":
        return
    assert ext4_chksum(ext4_chksum(7, b"ab"), b"cd") == ext4_chksum(7, b"abcd")
    assert ext4_chksum(7, b"ab") != crc32c.crc32c(b"ab", value=7)
    # CRC-16/ARC check value; lib/crc16 with seed 0 is exactly that
    assert crc16(0, b"123456789") == 0xBB3D


@pytest.mark.parametrize(("preset", "variant"), [
    *((p, "kernel") for p in CSUM_PRESETS), ("ext4", "broken")])
def test_superblock_and_group_descs(
    images: dict[str, Img], preset: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Superblock and every group descriptor in the first descriptor block verify; one
    flipped byte fails.

    Broken variant: checksumming the group descriptor without the le32 group number fails
    every group."""
    _broken(variant, monkeypatch, "group_desc_csum", "c = ext4_chksum(fs_seed, le_group)",
            "c = fs_seed")
    img = images[preset]
    assert verify_superblock(img.sb)
    assert not verify_superblock(img.sb[:100] + bytes([img.sb[100] ^ 1]) + img.sb[101:])
    gdt = img.block(img.first_data_block + 1)
    n = min(img.groups, img.bs // img.desc_size)
    for g in range(n):
        d = gdt[g * img.desc_size : (g + 1) * img.desc_size]
        with fails_unless_kernel(variant):
            assert verify_group_desc(d, g, fs_seed=img.fs_seed, uuid=img.uuid,
                                     metadata_csum=True, is_64bit="64bit" in img.features), g
        if variant != "kernel":
            return
        bad = bytes([d[0] ^ 0x80]) + d[1:]
        assert not verify_group_desc(bad, g, fs_seed=img.fs_seed, uuid=img.uuid,
                                     metadata_csum=True, is_64bit="64bit" in img.features)


@pytest.mark.parametrize(("preset", "variant"), [
    ("gdt_csum", "kernel"), ("gdt_csum-32", "kernel"), ("gdt_csum", "broken")])
def test_gdt_csum_crc16(
    images: dict[str, Img], preset: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without metadata_csum, uninit_bg descriptors carry crc16 (64- and 32-byte descs).

    Broken variant: leaving out the 64bit tail of the descriptor fails the 64-byte case."""
    _broken(variant, monkeypatch, "group_desc_csum",
            "if is_64bit and desc_size > _BG_CHECKSUM_OFF + 2:", "if False:")
    img = images[preset]
    assert "metadata_csum" not in img.features and "uninit_bg" in img.features
    gdt = img.block(img.first_data_block + 1)
    with fails_unless_kernel(variant):
        for g in range(min(img.groups, img.bs // img.desc_size)):
            d = gdt[g * img.desc_size : (g + 1) * img.desc_size]
            assert verify_group_desc(d, g, fs_seed=0, uuid=img.uuid, metadata_csum=False,
                                     is_64bit="64bit" in img.features), g


_INODE_VARIANTS = {
    "checksum-hi-kept": ("inode_csum",
                         'raw[I_CHECKSUM_HI_OFF : I_CHECKSUM_HI_OFF + 2] = b"\\0\\0"', "pass"),
    "no-generation": ("inode_csum_seed", 'struct.pack("<II", ino & _M, generation & _M)',
                      'struct.pack("<I", ino & _M)'),
}


@pytest.mark.parametrize(("preset", "variant"), [
    *((p, "kernel") for p in CSUM_PRESETS), *(("ext4", v) for v in _INODE_VARIANTS)])
def test_inodes(
    images: dict[str, Img], preset: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inodes of every kind verify, agree with debugfs's "Inode checksum", and fail when
    any byte but the checksum fields changes.

    Broken variants: not zeroing i_checksum_hi; seeding without the generation."""
    if variant != "kernel":
        _broken(variant, monkeypatch, *_INODE_VARIANTS[variant])
    img = images[preset]
    with fails_unless_kernel(variant):
        _check_inodes(img)


def _check_inodes(img: Img) -> None:
    for path in PATHS:
        seed, raw = img.inode_seed(path)
        assert verify_inode(raw, img.inode_size, seed), path
        m = re.search(r"Inode checksum: (0x[0-9a-f]+)", img.debugfs(f"stat {path}"))
        assert m is not None
        want = int(m.group(1), 16)
        got = inode_csum(raw, img.inode_size, seed)
        assert (got if img.inode_size > 128 else got & 0xFFFF) == want
        # the checksum fields themselves are excluded from the sum
        cleared = bytearray(raw)
        cleared[0x7C:0x7E] = b"\xaa\xbb"
        if img.inode_size > 128:
            cleared[0x82:0x84] = b"\xcc\xdd"
        assert inode_csum(bytes(cleared), img.inode_size, seed) == got
        for pos in (0, 0x64, 0x7E, img.inode_size - 1):
            flipped = bytearray(raw)
            flipped[pos] ^= 0x10
            assert not verify_inode(bytes(flipped), img.inode_size, seed), (path, pos)


@pytest.mark.parametrize("preset", CSUM_PRESETS)
def test_extent_blocks(images: dict[str, Img], preset: str) -> None:
    """All extent tree blocks of the fragmented file verify; a changed entry fails."""
    img = images[preset]
    seed, _ = img.inode_seed("sparse/fragmented")
    etbs = [int(b) for b in re.findall(r"\(ETB\d+\):(\d+)",
                                        img.debugfs("stat sparse/fragmented"))]
    assert etbs
    for b in etbs:
        blk = img.block(b)
        assert verify_extent_block(blk, seed), b
        assert not verify_extent_block(blk[:20] + bytes([blk[20] ^ 1]) + blk[21:], seed)
    other, _ = img.inode_seed("files/big")
    assert not verify_extent_block(img.block(etbs[0]), other)


@pytest.mark.parametrize(("preset", "variant"), [
    *((p, "kernel") for p in CSUM_PRESETS), ("ext4", "broken")])
def test_directory_blocks(
    images: dict[str, Img], preset: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every block of htree directories verifies as a leaf (dirent tail) or a dx root/node,
    classified the way the kernel does; corruption in either fails.

    Broken variant: checksumming the whole dx block (not count entries + dt_reserved)."""
    _broken(variant, monkeypatch, "dx_node_csum",
            "c = ext4_chksum(inode_seed, block[: off + count * DX_ENTRY_SIZE])",
            "return ext4_chksum(inode_seed, block)")
    img = images[preset]
    with fails_unless_kernel(variant):
        _check_directory_blocks(img)


def _check_directory_blocks(img: Img) -> None:
    kinds = {"leaf": 0, "dx": 0}
    for path in ("bigdir", "bigdir_long", "names", "/"):
        seed, _ = img.inode_seed(path)
        for lblk, pblk in enumerate(img.file_blocks(path)):
            blk = img.block(pblk)
            ino, rec_len = struct.unpack_from("<IH", blk, 0)
            is_dx = (lblk == 0 and path in ("bigdir", "bigdir_long")) or (
                ino == 0 and rec_len == img.bs)
            if is_dx:
                assert verify_dx_node(blk, seed), (path, lblk)
                kinds["dx"] += 1
                bad = blk[:44] + bytes([blk[44] ^ 1]) + blk[45:]
                assert not verify_dx_node(bad, seed)
            else:
                assert has_dirent_tail(blk)
                assert verify_dir_block(blk, seed), (path, lblk)
                kinds["leaf"] += 1
                bad = blk[:9] + bytes([blk[9] ^ 1]) + blk[10:]
                assert not verify_dir_block(bad, seed)
    # 1 KiB blocks: bigdir_long needs a second index level (dx nodes besides the roots)
    assert kinds["dx"] >= (3 if img.bs == 1024 else 2) and kinds["leaf"] >= 10, kinds


@pytest.mark.parametrize(("preset", "variant"), [
    *((p, "kernel") for p in CSUM_PRESETS), ("ext4", "broken")])
def test_xattr_blocks(
    images: dict[str, Img], preset: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """External xattr blocks (one of them shared) verify with their own block number only.

    Broken variant: seeding with the 32-bit block number."""
    _broken(variant, monkeypatch, "xattr_block_csum",
            'struct.pack("<Q", block_nr & 0xFFFFFFFFFFFFFFFF)',
            'struct.pack("<I", block_nr & 0xFFFFFFFF)')
    img = images[preset]
    for path in ("xattr/large", "xattr/shared1"):
        _, raw = img.inode(path)
        nr = struct.unpack_from("<I", raw, 104)[0] | struct.unpack_from("<H", raw, 118)[0] << 32
        assert nr
        blk = img.block(nr)
        with fails_unless_kernel(variant):
            assert verify_xattr_block(blk, nr, img.fs_seed)
        if variant != "kernel":
            return
        assert not verify_xattr_block(blk, nr + 1, img.fs_seed)
        assert not verify_xattr_block(blk[:-1] + bytes([blk[-1] ^ 1]), nr, img.fs_seed)


def test_e2fsck_agrees_after_corruption(images: dict[str, Img], tmp_path: Path) -> None:
    """A block our verifier rejects is one e2fsck rejects too (a leaf with one byte changed)."""
    img = images["ext4"]
    seed, _ = img.inode_seed("names")
    [pblk] = img.file_blocks("names")[:1]
    data = bytearray(img.data)
    data[pblk * img.bs + 9] ^= 1  # inside the first name's bytes ("."), still parseable
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    assert not verify_dir_block(bytes(data[pblk * img.bs : (pblk + 1) * img.bs]), seed)
    res = subprocess.run(["e2fsck", "-fn", str(bad)], capture_output=True)
    assert res.returncode != 0
    os.unlink(bad)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4200), n=st.integers(0, 2**64 - 1),
       seed=st.integers(0, 2**32 - 1), isize=st.sampled_from([128, 256, 160, 130]))
def test_arbitrary_bytes_give_bool(data: bytes, n: int, seed: int, isize: int) -> None:
    """Every verifier returns a bool on any input, never raises."""
    for r in (verify_superblock(data), verify_extent_block(data, seed),
              verify_dir_block(data, seed), verify_dx_node(data, seed),
              verify_xattr_block(data, n, seed), verify_inode(data, isize, seed),
              verify_group_desc(data[:64], n % 2**32, fs_seed=seed, uuid=data[:16],
                                metadata_csum=bool(n & 1), is_64bit=bool(n & 2))):
        assert isinstance(r, bool)
