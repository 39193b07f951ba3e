"""open_image: read-only opening, the partition choice and its one-line errors."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Literal

import pytest

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io import ThreadDevice, UringDevice, open_image
from tests.unit.test_partition import GPT_SCRIPT, MBR_SCRIPT, make_disk, mkfs_at

MIB = 1 << 20


def _ext_magic(dev_bytes: bytes) -> bytes:
    return dev_bytes[1080:1082]


@pytest.fixture(scope="module")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MBR: ext4 at sector 63 (not 4 KiB aligned), ext2 in logical 5, ext3 in logical 6."""
    img = tmp_path_factory.mktemp("open") / "mbr.img"
    make_disk(img, MBR_SCRIPT)
    mkfs_at(img, "ext4", 63 * 512, 9000)
    mkfs_at(img, "ext2", 43008 * 512, 5000)
    mkfs_at(img, "ext3", 55296 * 512, 3000)
    return img


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(("number", "start"), [(1, 63 * 512), (5, 43008 * 512),
                                               (6, 55296 * 512)])
async def test_partition_n_serves_that_partition(mbr_disk: Path, number: int, start: int,
                                                 direct: bool) -> None:
    dev = await open_image(mbr_disk, partition=number, direct=direct)
    try:
        with open(mbr_disk, "rb") as f:
            f.seek(start)
            want = f.read(16384)
        assert bytes(await dev.read(0, 16384)) == want
        assert _ext_magic(want) == b"\x53\xef"
        assert bytes(await dev.read(1000, 77)) == want[1000:1077]  # unaligned inside too
        with pytest.raises(DeviceIOError):
            await dev.read(dev.size - 1, 2)
    finally:
        await dev.aclose()


async def test_several_linux_partitions_need_a_choice(mbr_disk: Path) -> None:
    with pytest.raises(ImageError) as info:
        await open_image(mbr_disk)
    msg = str(info.value)
    assert "\n" not in msg and "partition=N" in msg
    for listed in ("1 (Linux, ext4", "5 (Linux, ext2", "6 (Linux, ext3"):
        assert listed in msg


async def test_no_such_partition_lists_the_ones_there(mbr_disk: Path) -> None:
    with pytest.raises(ImageError, match=r"no partition 4; it has: 1 \(Linux, ext4") as info:
        await open_image(mbr_disk, partition=4)
    assert "7 (Linux LVM" in str(info.value)
    with pytest.raises(ImageError, match="extended partition"):
        await open_image(mbr_disk, partition=3)


async def test_single_linux_partition_is_chosen(tmp_path: Path) -> None:
    img = tmp_path / "gpt.img"
    make_disk(img, GPT_SCRIPT)
    mkfs_at(img, "ext4", 2048 * 512, 10240)
    dev = await open_image(img)
    try:
        assert dev.size == 10 * MIB
        assert _ext_magic(bytes(await dev.read(0, 4096))) == b"\x53\xef"
    finally:
        await dev.aclose()


async def test_offset_and_sizelimit(tmp_path: Path) -> None:
    img = tmp_path / "raw"
    data = random.Random(1).randbytes(MIB)
    img.write_bytes(data)
    dev = await open_image(img, offset=1000, sizelimit=5000)
    assert dev.size == 5000
    assert bytes(await dev.read(0, 5000)) == data[1000:6000]
    await dev.aclose()
    dev = await open_image(img, offset=MIB - 10, sizelimit=100)  # clipped at the end, as losetup
    assert dev.size == 10
    await dev.aclose()
    with pytest.raises(ImageError, match="beyond the end"):
        await open_image(img, offset=MIB)
    with pytest.raises(ImageError, match="not both"):
        await open_image(img, offset=0, partition=1)
    with pytest.raises(ImageError, match="no partition table"):
        await open_image(img, partition=1)


async def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        await open_image(tmp_path / "missing")
    with pytest.raises(ImageError, match="is a directory"):
        await open_image(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        await open_image(tmp_path / "empty")


async def test_image_is_opened_read_only(tmp_path: Path) -> None:
    """The fd the device holds is O_RDONLY (the image is never written)."""
    img = tmp_path / "raw"
    img.write_bytes(bytes(8192))
    os.chmod(img, 0o444)
    backends: list[Literal["uring", "threads"]] = ["uring", "threads"]
    for backend in backends:
        dev = await open_image(img, backend=backend)
        assert isinstance(dev, UringDevice | ThreadDevice)
        fd = dev._fd
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
        flags = int(fdinfo.split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        await dev.aclose()
