"""VM disk images through the real `asyncfs mount`: qcow2 files (compressed, partitioned) and
NBD exports (qemu-nbd, nbdkit), compared with the source tree and with the kernel's loop mount
of ``qemu-img convert -O raw`` of the same image."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.testing.imagegen import compare_trees
from tests.imagegen import kernel_mount
from tests.mount.helpers import mounted, regular_files, run_asyncfs
from tests.unit.test_nbd import Server, nbdkit, qemu_nbd

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("qemu-img", "qemu-nbd", "nbdkit")),
                       reason="qemu-utils/nbdkit missing"),
]

FIELDS = ("mode", "uid", "gid", "size", "rdev", "mtime", "content", "link", "xattrs")
MIB = 1 << 20


def _qemu_img(*args: str | Path) -> None:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def vm_qcow2(ext4_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus ext4 image as a compressed qcow2."""
    img = tmp_path_factory.mktemp("vm") / "fs.qcow2"
    _qemu_img("convert", "-c", "-O", "qcow2", ext4_image, img)
    return img


def test_qcow2_mount_matches_kernel_mount_of_its_raw_conversion(
        vm_qcow2: Path, small_tree: Path, tmp_path: Path) -> None:
    """`asyncfs mount fs.qcow2` (compressed clusters): the tree equals the source tree and,
    field for field, the kernel's loop mount of ``qemu-img convert -O raw fs.qcow2``."""
    raw = tmp_path / "fs.raw"
    _qemu_img("convert", "-O", "raw", vm_qcow2, raw)
    with mounted(vm_qcow2, tmp_path / "mnt") as mnt:
        assert compare_trees(small_tree, mnt, fields=("content", "link", "size")) == []
        with kernel_mount(raw) as ref:
            assert compare_trees(mnt, ref, fields=FIELDS) == []


def _two_partition_disk(path: Path, label: str, fs_image: Path, decoy: Path) -> None:
    """Partition 1: a small ext2 of ``decoy``; partition 2: a copy of ``fs_image``."""
    p2 = -(-fs_image.stat().st_size // MIB)
    with open(path, "wb") as f:
        f.truncate((1 + 8 + p2 + 1) * MIB)
    kind = "type=L" if label == "gpt" else "type=83"
    subprocess.run(["sfdisk", "-q", str(path)], check=True, capture_output=True, text=True,
                   input=f"label: {label}\nsize=8MiB, {kind}\nsize={p2}MiB, {kind}\n")
    table = json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                      capture_output=True, text=True).stdout)
    a, b = table["partitiontable"]["partitions"]
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-E", f"offset={a['start'] * 512}",
                    "-d", str(decoy), str(path), f"{a['size'] // 2}k"],
                   check=True, capture_output=True)
    subprocess.run(["dd", f"if={fs_image}", f"of={path}", "bs=1M", f"seek={b['start'] * 512}",
                    "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"], check=True)


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_partitioned_qcow2_mounts_with_partition_option(
        label: str, ext4_image: Path, small_tree: Path, tmp_path: Path) -> None:
    """A GPT or MBR disk converted to qcow2: ``asyncfs info`` lists its partitions under the
    qcow2 format line, ``-o partition=2`` mounts the second one, ``partition=1`` the decoy;
    without a choice the two ext partitions are a one-line error."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "partition-1.txt").write_text("the wrong partition\n")
    disk = tmp_path / "disk.raw"
    _two_partition_disk(disk, label, ext4_image, decoy)
    img = tmp_path / "disk.qcow2"
    _qemu_img("convert", "-O", "qcow2", disk, img)
    info = run_asyncfs("info", str(img))
    assert info.returncode == 0, info.stderr
    assert "format: qcow2 v3" in info.stdout
    assert f"{'GPT' if label == 'gpt' else 'MBR'} partition table" in info.stdout
    (tmp_path / "nomnt").mkdir()
    r = run_asyncfs("mount", str(img), str(tmp_path / "nomnt"))
    assert r.returncode != 0 and "several ext2/3/4 partitions" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    with mounted(img, tmp_path / "m2", "partition=2") as mnt:
        assert compare_trees(small_tree, mnt, fields=("content", "link", "size")) == []
    with mounted(img, tmp_path / "m1", "partition=1") as mnt:
        assert (mnt / "partition-1.txt").read_text() == "the wrong partition\n"


def test_nbd_mounts_qemu_nbd_and_nbdkit(vm_qcow2: Path, ext4_image: Path, small_tree: Path,
                                        tmp_path: Path) -> None:
    """`asyncfs mount nbd+unix:///...` of a qcow2 file qemu-nbd serves as is (asyncfs reads the
    qcow2 format), and `asyncfs mount nbd://127.0.0.1:PORT/...` of nbdkit serving the raw
    image: both trees equal the source; `asyncfs info` names the transport and format."""
    with qemu_nbd(vm_qcow2, "raw", sock=tmp_path / "q.sock") as srv:
        info = run_asyncfs("info", srv.uri)
        assert info.returncode == 0, info.stderr
        assert "transport: NBD" in info.stdout and "format: qcow2" in info.stdout
        with mounted(srv.uri, tmp_path / "mq") as mnt:
            assert compare_trees(small_tree, mnt, fields=("content", "link", "size")) == []
    with _nbdkit_tcp(ext4_image) as uri, mounted(uri, tmp_path / "mk") as mnt:
        assert compare_trees(small_tree, mnt, fields=("content", "link", "size")) == []


@contextlib.contextmanager
def _nbdkit_tcp(image: Path) -> Iterator[str]:
    from tests.unit.test_nbd import free_port

    port = free_port()
    srv = Server(["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port), "-e", "exp",
                  "file", str(image)], port=port)
    try:
        yield f"nbd://127.0.0.1:{port}/exp"
    finally:
        srv.kill()


def test_nbd_server_errors_are_eio_in_the_mount(ext4_image: Path, small_tree: Path,
                                                tmp_path: Path) -> None:
    """nbdkit's error filter failing every read while a trigger file exists: reading a file
    fails with EIO (and the mount answers); once the trigger is gone the same file reads
    right (the failure was not cached)."""
    trigger = tmp_path / "fail"
    with nbdkit(ext4_image, tmp_path / "e.sock", "--filter=error",
                params=("error-pread=EIO", "error-pread-rate=100%",
                        f"error-pread-file={trigger}")) as srv, \
            mounted(srv.uri, tmp_path / "m") as mnt:
        victim = regular_files(mnt)[0]
        rel = victim.relative_to(mnt)
        trigger.touch()
        with pytest.raises(OSError) as exc:
            victim.read_bytes()
        assert exc.value.errno == errno.EIO
        trigger.unlink()
        assert victim.read_bytes() == (small_tree / rel).read_bytes()


def test_info_shows_the_backing_chain(ext4_image: Path, tmp_path: Path) -> None:
    """`asyncfs info` of an overlay over a qcow2 over the raw image: format, virtual size and
    each backing file; the overlay mounts with its backing chain."""
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", ext4_image, "-F", "raw", mid)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    r = run_asyncfs("info", str(top))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("format: qcow2 v3, virtual size")
    assert f"backing: {mid}" in r.stdout and f"backing: {ext4_image} (raw" in r.stdout
    with mounted(top, tmp_path / "m") as mnt:
        assert any(mnt.iterdir())
