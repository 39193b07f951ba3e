"""xattr parsing and ACL conversion against real images and the kernel's own answers."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncfs.errors import AsyncfsError, CorruptionError, NoAttrError, NotSupportedError
from asyncfs.ext4 import xattr
from asyncfs.ext4.xattr import (
    EXT4_XATTR_INDEX_SYSTEM,
    EXT4_XATTR_INDEX_USER,
    EXT4_XATTR_MAGIC,
    XattrEntry,
    acl_from_disk,
    find_xattr,
    list_names,
    parse_ibody_xattrs,
    parse_xattr_block,
    resolve_name,
    system_data,
    verify_ea_inode_value,
    visible,
    xattr_entry_hash,
    xattr_name,
    xattr_value_for_user,
)
from asyncfs.testing.imagegen import image_info
from tests.imagegen import corpus_image, kernel_mount
from tests.mutants import breaks
from tests.unit.volume_walk import fails_unless_kernel

VARIANTS = ["kernel", "broken"]


def _broken(variant: str, monkeypatch: pytest.MonkeyPatch, name: str, old: str,
            new: str) -> None:
    """The broken variant of ``xattr.name`` (see mutants.breaks), also under the name this
    test module imported it by."""
    breaks(variant, monkeypatch, xattr, name, old, new)
    if variant != "kernel" and name in globals():
        monkeypatch.setitem(globals(), name, getattr(xattr, name))


def _system_listed(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken variant that hands the system index to a handler: system.data is listed."""
    if variant != "kernel":
        monkeypatch.setattr(xattr, "_HANDLED", xattr._HANDLED | {EXT4_XATTR_INDEX_SYSTEM})


class RawImage:
    """Raw inode and block bytes of an image, located with debugfs (not our decoder)."""

    def __init__(self, img: Path) -> None:
        self.img = img
        info = image_info(img)
        self.block_size = int(info["Block size"])
        self.inode_size = int(info["Inode size"])
        self.ea_inode = "ea_inode" in info["Filesystem features"]
        self.where: dict[str, int] = {}

    def locate(self, paths: list[str]) -> None:
        """Find where the inodes of ``paths`` live, with one debugfs run."""
        script = self.img.with_suffix(".imap")
        script.write_text("".join(f"imap {p}\n" for p in paths))
        out = subprocess.run(["debugfs", "-f", str(script), str(self.img)],
                             capture_output=True, check=True).stdout.decode()
        found = re.findall(r"located at block (\d+), offset (0x[0-9a-f]+)", out)
        assert len(found) == len(paths), out
        for p, (blk, off) in zip(paths, found, strict=True):
            self.where[p] = int(blk) * self.block_size + int(off, 16)

    def inode(self, path: str) -> tuple[bytes, int, int]:
        """(raw inode, i_extra_isize, i_file_acl) of ``path``."""
        if path not in self.where:
            self.locate([path])
        off = self.where[path]
        with open(self.img, "rb") as f:
            f.seek(off)
            raw = f.read(self.inode_size)
        extra = struct.unpack_from("<H", raw, 128)[0] if self.inode_size > 128 else 0
        file_acl = struct.unpack_from("<I", raw, 104)[0] | (
            struct.unpack_from("<H", raw, 116 + 2)[0] << 32)
        return raw, extra, file_acl

    def block(self, nr: int) -> bytes:
        with open(self.img, "rb") as f:
            f.seek(nr * self.block_size)
            return f.read(self.block_size)

    def xattrs(self, path: str) -> list[XattrEntry]:
        raw, extra, file_acl = self.inode(path)
        entries = parse_ibody_xattrs(raw, self.inode_size, extra,
                                     ea_inode_feature=self.ea_inode)
        if file_acl:
            entries += parse_xattr_block(self.block(file_acl), file_acl,
                                         ea_inode_feature=self.ea_inode)
        return entries


@pytest.fixture(scope="module")
def corpus() -> Iterator[tuple[Path, dict[str, Path]]]:
    imgs = {p: corpus_image(p) for p in ("ext4", "ext2-1k", "inline_data", "ext4-128inode")}
    yield imgs["ext4"][0], {p: v[1] for p, v in imgs.items()}


def _paths(src: Path) -> list[str]:
    out = []
    for d in ("xattr", "acl", "files", "links"):
        out += [f"{d}/{n}" for n in sorted(os.listdir(src / d))]
    return out


_KERNEL_VARIANTS = {
    "acl-unconverted": ("xattr_value_for_user",
                        "if entry.name_index not in (EXT4_XATTR_INDEX_POSIX_ACL_ACCESS,",
                        "if True or entry.name_index not in (EXT4_XATTR_INDEX_POSIX_ACL_ACCESS,"),
    "offsets-from-magic": ("parse_ibody_xattrs", "raw_inode, first, inode_size, first, True,",
                           "raw_inode, first, inode_size, header, True,"),
}


@pytest.mark.root
@pytest.mark.parametrize(("preset", "variant"), [
    *((p, "kernel") for p in ("ext4", "ext2-1k", "inline_data", "ext4-128inode")),
    ("inline_data", "system-listed"), ("ext4", "acl-unconverted"),
    ("ext4", "offsets-from-magic"),
])
def test_matches_kernel(
    corpus: tuple[Path, dict[str, Path]], preset: str, variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Names (listxattr order) and values (ACLs converted) equal the kernel's loop mount.

    Broken variants: listing system.data (inline_data files differ), passing ACLs through
    unconverted (acl/* differ), value offsets relative to the magic instead of the first
    entry (in-inode values differ)."""
    if variant == "system-listed":
        _system_listed(variant, monkeypatch)
    elif variant != "kernel":
        _broken(variant, monkeypatch, *_KERNEL_VARIANTS[variant])
    with fails_unless_kernel(variant):
        _check_matches_kernel(corpus, preset)


def _check_matches_kernel(corpus: tuple[Path, dict[str, Path]], preset: str) -> None:
    src, imgs = corpus
    raw = RawImage(imgs[preset])
    raw.locate(_paths(src))
    checked = 0
    with kernel_mount(imgs[preset]) as mnt:
        for rel in _paths(src):
            entries = raw.xattrs(rel)
            names = list_names(entries)
            want = [n.encode() for n in os.listxattr(mnt / rel, follow_symlinks=False)]
            assert sorted(names) == sorted(want), rel
            for n in names:
                e = find_xattr(entries, n)
                got = xattr_value_for_user(e, e.value)
                assert got == os.getxattr(mnt / rel, n, follow_symlinks=False), (rel, n)
                checked += 1
            is_link = os.path.islink(mnt / rel)  # the VFS answers EOPNOTSUPP for ACLs there
            for n in (b"system.posix_acl_access", b"user.nope"):
                if n not in names and not is_link:
                    with pytest.raises(NoAttrError):
                        xattr_value_for_user(find_xattr(entries, n), b"")
                    with pytest.raises(OSError) as ei:
                        os.getxattr(mnt / rel, n, follow_symlinks=False)
                    assert ei.value.errno == errno.ENODATA
    assert checked > 20


@pytest.mark.root
@pytest.mark.parametrize("variant", VARIANTS)
def test_inline_data_hides_system_data(
    corpus: tuple[Path, dict[str, Path]], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inline_data files carry system.data; nobody sees it, getxattr gives EOPNOTSUPP like
    the kernel (measured).

    Broken variant: the system index counted among those with a handler lists it."""
    _system_listed(variant, monkeypatch)
    _src, imgs = corpus
    raw = RawImage(imgs["inline_data"])
    entries = raw.xattrs("files/inline_small")
    assert [(e.name_index, e.name) for e in entries] == [(EXT4_XATTR_INDEX_SYSTEM, b"data")]
    with fails_unless_kernel(variant):
        assert list_names(entries) == []
    if variant != "kernel":
        return
    assert not visible(b"system.data")
    with pytest.raises(NotSupportedError):
        find_xattr(entries, b"system.data")
    with kernel_mount(imgs["inline_data"]) as mnt:
        with pytest.raises(OSError) as ei:
            os.getxattr(mnt / "files/inline_small", "system.data")
        assert ei.value.errno == errno.EOPNOTSUPP
        # a 100-byte file: 60 bytes in i_block, the rest is the system.data value
        raw_inode, _extra, _acl = raw.inode("files/inline_100")
        sd = system_data(raw.xattrs("files/inline_100"))
        assert sd is not None and sd.value_size == 40
        assert raw_inode[40:100] + sd.value == (mnt / "files/inline_100").read_bytes()
    assert system_data(raw.xattrs("files/big")) is None  # too big to be inline


def test_shared_block_and_debugfs(corpus: tuple[Path, dict[str, Path]]) -> None:
    """The two files with identical xattrs share one block with h_refcount 2; the entries
    agree with ``debugfs ea_list``."""
    _src, imgs = corpus
    raw = RawImage(imgs["ext4"])
    _, _, acl1 = raw.inode("xattr/shared1")
    _, _, acl2 = raw.inode("xattr/shared2")
    assert acl1 == acl2 != 0
    assert struct.unpack_from("<I", raw.block(acl1), 4)[0] == 2
    out = subprocess.run(["debugfs", "-R", "ea_list xattr/large", str(imgs["ext4"])],
                         capture_output=True, check=True).stdout.decode()
    for e in raw.xattrs("xattr/large"):
        assert f"{xattr_name(e).decode()} ({e.value_size})" in out


def _entry(name_len: int, index: int, offs: int, inum: int, size: int, name: bytes) -> bytes:
    b = struct.pack("<BBHIII", name_len, index, offs, inum, size, 0) + name
    return b + b"\0" * (-len(b) % 4)


def _ibody(entries: bytes, values: bytes, inode_size: int = 256, extra: int = 32) -> bytes:
    raw = bytearray(inode_size)
    struct.pack_into("<I", raw, 128 + extra, EXT4_XATTR_MAGIC)
    first = 128 + extra + 4
    raw[first : first + len(entries)] = entries
    raw[inode_size - len(values) :] = values
    return bytes(raw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ibody_offsets_and_checks(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-built inode bodies: a good one parses, each kernel check_xattrs rule rejects.

    Broken variant: skipping the overlap check accepts a value that starts inside the names."""
    _broken(variant, monkeypatch, "_check_entries", "if vstart < names_end or size",
            "if size")
    first = 128 + 32 + 4
    val_off = 256 - 8 - first
    good = _ibody(_entry(3, 1, val_off, 0, 5, b"abc"), b"hello\0\0\0")
    [e] = parse_ibody_xattrs(good, 256, 32)
    assert (xattr_name(e), e.value) == (b"user.abc", b"hello")
    assert parse_ibody_xattrs(good[:160] + bytes(96), 256, 32) == []  # no magic
    assert parse_ibody_xattrs(bytes(256), 256, 124) == []  # no room for the magic
    with fails_unless_kernel(variant), pytest.raises(CorruptionError):
        parse_ibody_xattrs(_ibody(_entry(3, 1, 0, 0, 5, b"abc"), b""), 256, 32)
    if variant != "kernel":
        return
    for bad in (
        _ibody(_entry(3, 1, 0, 0, 5, b"abc"), b""),  # value overlaps the names
        _ibody(_entry(3, 1, val_off, 0, 9, b"abc"), b""),  # value runs past the end
        _ibody(_entry(3, 1, 4000, 0, 5, b"abc"), b""),  # offset out of bounds
        _ibody(_entry(3, 1, val_off, 0, 5, b"a\0c"), b""),  # NUL inside the name
        _ibody(_entry(200, 1, val_off, 0, 5, b"x"), b""),  # name past the end
        _ibody(_entry(3, 1, 0, 2, 5, b"abc"), b""),  # EA inode = root inode
    ):
        with pytest.raises(CorruptionError):
            parse_ibody_xattrs(bad, 256, 32)
    with pytest.raises(CorruptionError):
        parse_ibody_xattrs(_ibody(_entry(3, 1, 0, 12, 5, b"abc"), b""), 256, 32,
                           ea_inode_feature=False)
    [ea] = parse_ibody_xattrs(_ibody(_entry(3, 1, 0, 12, 70000, b"abc"), b""), 256, 32)
    assert (ea.value_inum, ea.value_size, ea.value) == (12, 70000, b"")


@pytest.mark.parametrize("variant", VARIANTS)
def test_acl_conversion(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 ACL v1 (short + long entries) to Linux xattr v2; malformed ones rejected.

    Broken variant: treating every entry as 8 bytes misreads anything after USER_OBJ."""
    _broken(variant, monkeypatch, "acl_from_disk", "off += _SHORT", "off += _LONG")
    disk = struct.pack("<I", 1) + struct.pack("<HH", 1, 6) + struct.pack("<HHI", 2, 7, 1000) \
        + struct.pack("<HH", 4, 4) + struct.pack("<HH", 0x10, 7) + struct.pack("<HH", 0x20, 0)
    e = XattrEntry(2, b"", 0, 0, len(disk), 0, disk, True)
    want = struct.pack("<I", 2) + struct.pack("<HHI", 1, 6, 0xFFFFFFFF) \
        + struct.pack("<HHI", 2, 7, 1000) + struct.pack("<HHI", 4, 4, 0xFFFFFFFF) \
        + struct.pack("<HHI", 0x10, 7, 0xFFFFFFFF) + struct.pack("<HHI", 0x20, 0, 0xFFFFFFFF)
    with fails_unless_kernel(variant):
        assert xattr_value_for_user(e, disk) == want
    if variant != "kernel":
        return
    with pytest.raises(NoAttrError):
        xattr_value_for_user(e, struct.pack("<I", 1))
    with pytest.raises(NoAttrError):
        xattr_value_for_user(e, b"")
    for bad in (struct.pack("<I", 2) + bytes(4), struct.pack("<I", 1) + bytes(3),
                struct.pack("<I", 1) + struct.pack("<HH", 0x40, 0),
                struct.pack("<I", 1) + struct.pack("<HHI", 2, 7, 5) * 2 + bytes(4)):
        with pytest.raises(CorruptionError):
            acl_from_disk(bad)
    plain = XattrEntry(EXT4_XATTR_INDEX_USER, b"x", 0, 0, 3, 0, b"abc", True)
    assert xattr_value_for_user(plain, b"abc") == b"abc"


def test_names() -> None:
    assert resolve_name(b"user.x") == (1, b"x")
    assert resolve_name(b"system.posix_acl_default") == (3, b"")
    for n in (b"system.data", b"system.richacl", b"os2.x", b"lustre.x"):
        assert not visible(n)
        with pytest.raises(NotSupportedError):
            resolve_name(n)
    assert xattr_name(XattrEntry(5, b"lov", 0, 0, 0, 0, b"", False)) == b""


@settings(max_examples=400, deadline=None)
@given(data=st.binary(min_size=0, max_size=1100), extra=st.integers(-4, 200),
       size=st.sampled_from([128, 256, 512]))
def test_arbitrary_inode_bytes(data: bytes, extra: int, size: int) -> None:
    """Random inode bodies (magic forced in half the cases) raise only project errors."""
    raw = bytearray(data[:size].ljust(size, b"\0"))
    if len(data) % 2 and extra >= 0 and 128 + extra + 4 <= size:
        struct.pack_into("<I", raw, 128 + extra, EXT4_XATTR_MAGIC)
    try:
        for e in parse_ibody_xattrs(bytes(raw), size, extra):
            with_value = xattr_value_for_user(e, e.value)
            assert isinstance(with_value, bytes)
    except AsyncfsError:
        pass


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=1024), refcount=st.integers(0, 3),
       blocks=st.sampled_from([1, 1, 1, 0, 2]), size=st.sampled_from([1024, 4096, 1023, 40]))
def test_arbitrary_block_bytes(body: bytes, refcount: int, blocks: int, size: int) -> None:
    """Random xattr blocks (valid header most of the time) raise only project errors."""
    block = (struct.pack("<IIIII", EXT4_XATTR_MAGIC, refcount, blocks, 0, 0) + bytes(12)
             + body)[:size].ljust(size, b"\0")
    try:
        for e in parse_xattr_block(block, 7):
            xattr_value_for_user(e, e.value)
    except AsyncfsError:
        pass


@given(value=st.binary(max_size=80))
def test_arbitrary_acl_bytes(value: bytes) -> None:
    e = XattrEntry(2, b"", 0, 0, len(value), 0, value, False)
    try:
        out = xattr_value_for_user(e, struct.pack("<I", 1) + value)
    except AsyncfsError:
        return
    assert (len(out) - 4) % 8 == 0


@st.composite
def _xattr_tables(draw: st.DrawFn) -> tuple[bytes, int]:
    """Near-valid in-inode tables: real entry layout, offsets and sizes that are mostly in
    range, then a few random byte flips, so parsing gets past the first check."""
    inode_size = draw(st.sampled_from([256, 512, 1024]))
    extra = draw(st.sampled_from([0, 4, 28, 32]))
    first = 128 + extra + 4
    area = inode_size - first
    table = b""
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.binary(min_size=0, max_size=12))
        size = draw(st.integers(0, 64))
        offs = draw(st.integers(0, area)) & ~3
        inum = draw(st.sampled_from([0, 0, 0, 2, 13]))
        table += _entry(len(name), draw(st.integers(0, 11)), offs, inum, size, name)
    raw = bytearray(draw(st.binary(min_size=inode_size, max_size=inode_size)))
    struct.pack_into("<I", raw, 128 + extra, EXT4_XATTR_MAGIC)
    table = table[: area - 4] + b"\0\0\0\0"
    raw[first : first + len(table)] = table
    for pos in draw(st.lists(st.integers(0, inode_size - 1), max_size=3)):
        raw[pos] ^= draw(st.integers(1, 255))
    return bytes(raw), extra


@settings(max_examples=500, deadline=None)
@given(case=_xattr_tables(), ea_inode=st.booleans())
def test_near_valid_tables(case: tuple[bytes, int], ea_inode: bool) -> None:
    """Whatever parses honours the kernel's rules: values inside the inode and after the
    names, sizes as declared; everything else is CorruptionError, never another error."""
    raw, extra = case
    try:
        entries = parse_ibody_xattrs(raw, len(raw), extra, ea_inode_feature=ea_inode)
    except CorruptionError:
        return
    first = 128 + extra + 4
    for e in entries:
        assert b"\0" not in e.name
        if e.value_inum:
            assert ea_inode and e.value == b""
        elif e.value_size:
            assert len(e.value) == e.value_size
            assert raw[first + e.value_offs : first + e.value_offs + e.value_size] == e.value
        name = xattr_name(e)
        if name:
            assert visible(name) or name.startswith(b"system.posix_acl")
            with contextlib.suppress(CorruptionError, NoAttrError):
                xattr_value_for_user(e, e.value)


@pytest.mark.root
@pytest.mark.parametrize("variant", VARIANTS)
def test_ea_inode_values(tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ea_inode: a 3 KiB value on 1 KiB blocks lands in an EA inode; the entry reports that
    inode and size, and the value read from it passes the kernel's hash checks and equals
    the kernel's getxattr.

    Broken variant: an entry hash over the value bytes instead of the value's crc32c."""
    _broken(variant, monkeypatch, "verify_ea_inode_value", "    return entry.hash in (\n",
            "    words = struct.unpack(f'<{len(value) // 4}I', value[: len(value) // 4 * 4])\n"
            "    return entry.hash in (xattr_entry_hash(entry.name, words),\n"
            "                          xattr_entry_hash(entry.name, words, signed=True))\n"
            "    return entry.hash in (\n")
    from asyncfs.ext4.csum import csum_seed_from_superblock

    src = tmp_path / "src"
    src.mkdir()
    big = bytes(range(256)) * 12
    (src / "f").write_bytes(b"x")
    os.setxattr(src / "f", "user.big", big)
    os.setxattr(src / "f", "user.small", b"abc")
    img = tmp_path / "img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", "-O", "ea_inode", "-d",
                    str(src), str(img), "16M"], check=True, capture_output=True)
    raw = RawImage(img)
    assert raw.ea_inode
    entries = raw.xattrs("f")
    [ea] = [e for e in entries if e.value_inum]
    assert (xattr_name(ea), ea.value_size, ea.value) == (b"user.big", len(big), b"")
    value = subprocess.run(["debugfs", "-R", f"cat <{ea.value_inum}>", str(img)],
                           capture_output=True, check=True).stdout
    ea_raw, _, _ = raw.inode(f"<{ea.value_inum}>")
    stored_hash = struct.unpack_from("<I", ea_raw, 8)[0]  # i_atime holds the value hash
    seed = csum_seed_from_superblock(img.read_bytes()[1024:2048])
    with fails_unless_kernel(variant):
        assert verify_ea_inode_value(ea, value, stored_hash, seed)
    if variant != "kernel":
        return
    assert not verify_ea_inode_value(ea, value[:-1] + b"\0", stored_hash, seed)
    assert xattr_entry_hash(b"big", [stored_hash]) == ea.hash
    with kernel_mount(img) as mnt:
        assert os.getxattr(mnt / "f", "user.big") == value == big
        assert sorted(list_names(entries)) == sorted(
            n.encode() for n in os.listxattr(mnt / "f"))
