"""Hypothesis over damaged images: flip bytes in the metadata of real small images and walk
the whole tree through the Volume. Only the project's own errors may come out, the walk must
end, and nothing may allocate without bound."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncfs.engine.volume import Volume
from asyncfs.errors import AsyncfsError
from tests.unit.volume_reader import MemReader

_MAX_NODES = 400
_MAX_READ = 1 << 20


def _tree(root: Path) -> None:
    root.mkdir()
    (root / "f").write_bytes(b"data" * 3000)
    (root / "small").write_bytes(b"s")
    os.symlink("f", root / "l")
    os.symlink("x" * 200, root / "long")
    d = root / "d"
    d.mkdir()
    for i in range(120):
        (d / f"name-{i:03d}-{'y' * (i % 30)}").write_bytes(b"")
    with open(root / "sparse", "wb") as fh:
        for i in range(40):
            fh.seek(i * 8192)
            fh.write(b"z" * 1024)
    os.setxattr(root / "f", "user.a", b"v" * 300)


class _Recorder(MemReader):
    """Records every metadata range read, so mutations can aim at real metadata."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.ranges: set[tuple[int, int]] = set()

    async def read_dev(self, off: int, length: int) -> bytes:
        self.ranges.add((off, length))
        return await super().read_dev(off, length)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, list[int]]]:
    base = tmp_path_factory.mktemp("fuzz")
    _tree(base / "src")
    out = {}
    for name, args in {
        "ext4": ["-t", "ext4", "-b", "1024", "-O", "inline_data"],
        "ext2": ["-t", "ext2", "-b", "1024"],
    }.items():
        img = base / f"{name}.img"
        subprocess.run(["mke2fs", "-q", "-F", *args, "-d", str(base / "src"), str(img), "2M"],
                       check=True, capture_output=True)
        subprocess.run(["e2fsck", "-fyD", str(img)], capture_output=True)
        data = img.read_bytes()
        out[name] = (data, _metadata_offsets(data))
    return out


def _metadata_offsets(data: bytes) -> list[int]:
    """Every byte offset the Volume reads as metadata while walking the pristine image."""
    import trio

    rec = _Recorder(data)

    async def walk() -> None:
        vol = await Volume.mount(rec, device_size=len(data))
        await _walk(vol)

    trio.run(walk)
    offs: set[int] = set()
    for off, length in rec.ranges:
        offs.update(range(off, off + length))
    return sorted(offs)


async def _walk(vol: Volume) -> int:
    seen = 0
    stack = [vol.root_ino]
    visited: set[int] = set()
    while stack and seen < _MAX_NODES:
        ino = stack.pop()
        if ino in visited:
            continue
        visited.add(ino)
        seen += 1
        try:
            attr = await vol.getattr(ino)
            await vol.listxattr(ino)
            mode = attr.mode & 0o170000
            if mode == 0o040000:
                off = 0
                for _ in range(50):
                    batch = await vol.readdir(ino, off)
                    if not batch:
                        break
                    assert batch[-1].next_off > off, "readdir cookie did not advance"
                    off = batch[-1].next_off
                    for e in batch:
                        if e.name not in (b".", b".."):
                            await vol.lookup(ino, e.name)
                            stack.append(e.ino)
            elif mode == 0o120000:
                await vol.readlink(ino)
            elif mode == 0o100000:
                fh = await vol.open(ino)
                data = await vol.read(fh, 0, min(attr.size, _MAX_READ))
                assert len(data) <= _MAX_READ
        except AsyncfsError:
            continue
    return seen


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["ext4", "ext2"]),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=40),
    st.booleans(),
)
async def test_damaged_images_raise_only_our_errors(
    images: dict[str, tuple[bytes, list[int]]], kind: str, flips: list[tuple[int, int]],
    verify: bool,
) -> None:
    """Mutations land only on bytes the Volume reads as metadata of the pristine image.

    What it guards, for example: a damaged record's inode number past s_inodes_count must come
    out as the project's error (the range checks of ``Volume.inode`` and ``parse_dirents``),
    never as an IndexError from the group descriptor table."""
    pristine, meta = images[kind]
    data = bytearray(pristine)
    for pick, val in flips:
        data[meta[pick % len(meta)]] = val
    try:
        vol = await Volume.mount(MemReader(data), verify_csum=verify, device_size=len(data))
    except AsyncfsError:
        return
    await _walk(vol)
    vol.statfs()
    vol.describe()
