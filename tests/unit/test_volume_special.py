"""Casefolded directories and encrypted files, on real images.

The kernel on the test machine may lack CONFIG_UNICODE (it then refuses casefold images), so
casefold lookups are checked against the names the source tree holds; e2fsck -D builds the
casefolded hash index the lookups must follow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from asyncfs.engine.dirops import Directories
from asyncfs.engine.volume import Volume
from asyncfs.engine.volume_maps import ExtentFileMap
from asyncfs.engine.xattrs import Xattrs
from asyncfs.errors import NoEntryError
from tests.mutants import breaks
from tests.unit.volume_reader import PreadReader
from tests.unit.volume_walk import Snapshot, fails_unless_kernel, listing

NAMES = ["Hello", "Straße", "ÉCOLE", "x"]


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def cf_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cf")
    src = base / "src"
    for d in ("cf", "plain"):
        (src / d).mkdir(parents=True)
        for n in NAMES:
            (src / d / n).write_text(n)
    for i in range(400):
        (src / "cf" / f"File-{i}-ÄÖÜ-long-name-padding").write_bytes(b"")
    img = base / "cf.img"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "casefold", "-b", "1024", "-d", str(src),
         str(img), "16M")
    flags = _run("debugfs", "-R", "stat /cf", str(img)).split("Flags: ")[1].split()[0]
    _run("debugfs", "-w", "-R", f"sif /cf flags {int(flags, 16) | 0x40000000:#x}", str(img))
    subprocess.run(["e2fsck", "-fyD", str(img)], capture_output=True)  # casefolded htree
    _run("e2fsck", "-fn", str(img))
    return img


@pytest.mark.parametrize("variant", ["kernel", "bytes-only", "unfolded-hash"])
async def test_casefold_lookups(
    cf_image: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variants: _name_eq comparing bytes only -> "HELLO" is not found in cf/; and
    hash_name not folding -> the dx probe for a name in another case ("HELLO", "STRASSE")
    lands in the wrong leaf."""
    name = {"bytes-only": "_name_eq", "unfolded-hash": "hash_name"}.get(variant, "_name_eq")
    breaks(variant, monkeypatch, Directories, name, "if self._casefolded(inode):", "if False:")
    r = PreadReader(cf_image)
    try:
        with fails_unless_kernel(variant):
            vol = await Volume.mount(r, device_size=r.size)
            cf = (await vol.lookup(vol.root_ino, b"cf")).ino
            plain = (await vol.lookup(vol.root_ino, b"plain")).ino
            assert vol.dirs.is_dx(await vol.inode(cf))
            for asked, stored in (("HELLO", "Hello"), ("hello", "Hello"), ("STRASSE", "Straße"),
                                  ("école", "ÉCOLE"), ("X", "x"),
                                  ("file-7-äöü-LONG-name-padding", "File-7-ÄÖÜ-long-name-padding")):
                a = await vol.lookup(cf, asked.encode())
                b = await vol.lookup(cf, stored.encode())
                assert a.ino == b.ino, asked
            with pytest.raises(NoEntryError):
                await vol.lookup(plain, b"HELLO")
            assert (await vol.lookup(plain, b"Hello")).ino > 0
            names = {n for n, _, _ in await listing(vol, cf)}
            assert "Straße".encode() in names and len(names) == 2 + len(NAMES) + 400
    finally:
        r.close()


# ------------------------------------------------------------------------------------------
# encryption: files made by the kernel with a v2 policy, then read without the key


FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617
FS_IOC_SET_ENCRYPTION_POLICY = 0x800C6613


def _make_encrypted(img: Path, mnt: Path) -> None:
    import fcntl
    import os
    import struct

    _run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "encrypt", "-b", "4096", str(img), "32M")
    _run("mount", "-o", "loop", str(img), str(mnt))
    try:
        arg = bytearray(struct.pack("<II32sII32x", 2, 0, b"", 64, 0) + bytes(range(64)))
        fd = os.open(mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
        finally:
            os.close(fd)
        enc = mnt / "enc"
        enc.mkdir()
        dfd = os.open(enc, os.O_RDONLY)
        try:
            policy = struct.pack("<BBBB4s16s", 2, 1, 4, 0, b"", bytes(arg[8:24]))
            fcntl.ioctl(dfd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
        finally:
            os.close(dfd)
        (enc / "secret.txt").write_bytes(b"top secret\n" * 100)
        os.symlink("short-target", enc / "slink")
        os.symlink("L" * 300, enc / "longlink")
        (enc / "sub").mkdir()
        (enc / "sub" / "inner").write_bytes(b"i")
        (enc / ("n" * 200)).write_bytes(b"x")
        for i in range(300):
            (enc / f"file-{i:03d}").write_bytes(b"")
        (mnt / "plain").write_bytes(b"plain\n")
    finally:
        _run("umount", str(mnt))


@pytest.fixture(scope="module")
def encrypted_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Snapshot]:
    """An image with an encrypted directory, made by the kernel, and the kernel's no-key view
    of it (built once: the kernel mount is the slow part)."""
    from tests.imagegen import kernel_mount, kernel_mount_unavailable
    from tests.unit.volume_walk import os_snapshot

    why = kernel_mount_unavailable()
    if why is not None:
        pytest.skip(why)
    if not Path("/sys/fs/ext4/features/encryption").exists():
        pytest.skip("kernel ext4 without encryption support")
    base = tmp_path_factory.mktemp("enc")
    img = base / "enc.img"
    mnt = base / "mnt"
    mnt.mkdir()
    _make_encrypted(img, mnt)
    with kernel_mount(img) as kmnt:
        return img, os_snapshot(kmnt)


_NOKEY_VARIANTS = {
    "zero-prefix": (Directories, "_nokey", "if version >= 0:", "if False:"),
    "symlink-size": (Volume, "getattr", "if inode.is_encrypted and inode.is_lnk:", "if False:"),
}


@pytest.mark.parametrize("variant", ["kernel", *_NOKEY_VARIANTS])
async def test_encrypted_names_and_metadata_without_key(
    encrypted_image: tuple[Path, Snapshot], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the key, names, sizes, symlink targets and listings equal the kernel's no-key
    view; contents give NoKeyError, which the FUSE adapter answers with the kernel's ENOKEY.

    Broken variants: no-key names without the directory-hash prefix (zeros) -> every name in
    the hashed directory differs from the kernel's; symlink size from i_size -> differs."""
    from asyncfs.errors import NoKeyError
    from asyncfs.fuse.errnos import errno_for
    from tests.unit.test_volume_corpus import KERNEL_FIELDS
    from tests.unit.volume_walk import diff_snapshots, volume_snapshot

    if variant != "kernel":
        breaks(variant, monkeypatch, *_NOKEY_VARIANTS[variant])
    img, ref = encrypted_image
    r = PreadReader(img)
    try:
        vol = await Volume.mount(r, device_size=r.size)
        snap = await volume_snapshot(vol)
        enc = (await vol.lookup(vol.root_ino, b"enc")).ino
        secret = [n for n, _, _ in await listing(vol, enc) if n not in (b".", b"..")]
        assert len(secret) == 305
    finally:
        r.close()
    assert {rec.get("content") for p, rec in snap.items() if p.startswith(b"enc/")} - {
        None} == {"NoKeyError"}
    kernel_errors = {rec.get("content") for p, rec in ref.items() if p.startswith(b"enc/")}
    assert kernel_errors - {None} == {f"errno {errno_for(NoKeyError('x'))}"}
    with fails_unless_kernel(variant):
        diffs = diff_snapshots(snap, ref, KERNEL_FIELDS - {"content"})
        assert diffs == [], "\n".join(diffs[:20])
    assert snap[b"plain"]["content"] == ref[b"plain"]["content"]


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_uninitialized_extents_read_as_zeros(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fallocate()d ranges are uninitialized extents: zeros, and holes in the map.

    Broken variant: ExtentFileMap.map ignoring ``ext.uninit`` -> the stale bytes under the
    preallocated range are returned instead of zeros and this fails."""
    breaks(variant, monkeypatch, ExtentFileMap, "map", "if ext is None or ext.uninit:",
           "if ext is None:")
    import os

    from tests.imagegen import kernel_mount, kernel_mount_unavailable

    why = kernel_mount_unavailable()
    if why is not None:
        pytest.skip(why)
    img = tmp_path / "u.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # stale non-zero bytes everywhere, so an uninitialized extent read as data shows garbage
    with open(img, "wb") as f:
        f.write(b"\xa5" * (16 << 20))
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-E", "nodiscard", str(img))
    _run("mount", "-o", "loop", str(img), str(mnt))
    try:
        fd = os.open(mnt / "pre", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)
            os.pwrite(fd, b"D" * 5000, 300_000)
        finally:
            os.close(fd)
    finally:
        _run("umount", str(mnt))
    assert "Uninit" in _run("debugfs", "-R", "ex /pre", str(img))
    r = PreadReader(img)
    try:
        vol = await Volume.mount(r, device_size=r.size)
        ino = (await vol.lookup(vol.root_ino, b"pre")).ino
        from tests.unit.volume_walk import read_all

        data = await read_all(vol, ino, 1 << 20)
        fmap = await vol.file_map(ino)
        runs = await fmap.map(0, 1 << 20)
    finally:
        r.close()
    expect = bytearray(1 << 20)
    expect[300_000:305_000] = b"D" * 5000
    with fails_unless_kernel(variant):
        assert data == bytes(expect)
        assert runs[0].dev_off is None and any(x.dev_off is not None for x in runs)
        with kernel_mount(img) as kmnt:
            assert (kmnt / "pre").read_bytes() == data


@pytest.mark.parametrize("variant", ["kernel", "broken"])
async def test_xattr_value_in_ea_inode(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ea_inode: a value too large for the xattr block lives in its own inode.

    Broken variant: getxattr returning ``entry.value`` (b"" for EA-inode values) without
    reading the EA inode -> the value differs from the kernel's and this fails."""
    breaks(variant, monkeypatch, Xattrs, "getxattr", "if entry.value_inum:", "if False:")
    import os

    from tests.imagegen import kernel_mount

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    big = os.urandom(3000)
    os.setxattr(src / "f", "user.huge", big)
    os.setxattr(src / "f", "user.small", b"hi")
    img = tmp_path / "ea.img"
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "ea_inode", "-b", "1024", "-d", str(src),
         str(img), "16M")
    r = PreadReader(img)
    try:
        vol = await Volume.mount(r, device_size=r.size)
        ino = (await vol.lookup(vol.root_ino, b"f")).ino
        entries = await vol.xattrs.entries(ino)
        assert any(e.value_inum for e in entries), "value must be in an EA inode"
        got = await vol.getxattr(ino, b"user.huge")
        names = await vol.listxattr(ino)
    finally:
        r.close()
    with fails_unless_kernel(variant):
        assert got == big
        with kernel_mount(img) as kmnt:
            assert os.getxattr(kmnt / "f", "user.huge") == got
            assert sorted(os.fsencode(n) for n in os.listxattr(kmnt / "f")) == sorted(names)
