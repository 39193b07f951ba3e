"""The benchmark image: built once into bench/out/ with ``mke2fs -d``, plus the cold-cache helper.

Layout (``/`` of the image): ``big.bin`` (2 GiB, incompressible; sequential and memory
workloads), ``rand.bin`` (1 GiB; random 4 KiB reads), ``tree/dNN/fNNNN`` (3000 small files of
512 B - 64 KiB). A JSON manifest beside the image records sizes, where each big file sits in the
image (for the raw-fio target) and hashes of its first and last MiB (to check a mount serves the
right bytes before trusting its speed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

LAYOUT_VERSION = 1
MIB = 1 << 20
GIB = 1 << 30
BLOCK = 4096
TREE_FILES = 3000
TREE_DIRS = 30


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str  # inside the image, no leading slash
    size: int
    phys_off: int  # byte offset of the first block in the image
    contiguous: bool
    head_sha256: str  # first MiB
    tail_sha256: str  # last MiB


@dataclass(frozen=True, slots=True)
class Manifest:
    version: int
    image: str
    image_size: int
    big: FileInfo
    rand: FileInfo
    tree_files: int
    tree_bytes: int
    built_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        d["big"] = FileInfo(**d["big"])
        d["rand"] = FileInfo(**d["rand"])
        return cls(**d)


def _write_random(path: Path, size: int) -> tuple[str, str]:
    """Write ``size`` incompressible bytes; return the hashes of the first and last MiB."""
    chunk = 8 * MIB
    head = tail = b""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            buf = os.urandom(n)
            if not head:
                head = buf[:MIB]
            f.write(buf)
            left -= n
            tail = (tail + buf)[-MIB:]
    return hashlib.sha256(head).hexdigest(), hashlib.sha256(tail).hexdigest()


def _write_tree(root: Path) -> int:
    rng = random.Random(6)  # sizes are reproducible; content is not (it need not be)
    total = 0
    for i in range(TREE_FILES):
        d = root / f"d{i % TREE_DIRS:02d}"
        d.mkdir(parents=True, exist_ok=True)
        # Log-uniform 512 B .. 64 KiB: mostly small files, a few that need several extents
        # worth of reads, like a source tree.
        size = int(2 ** rng.uniform(9, 16))
        (d / f"f{i:04d}").write_bytes(os.urandom(size))
        total += size
    return total


def _phys_block(image: Path, path: str, logical: int) -> int:
    out = subprocess.run(
        ["debugfs", "-R", f"bmap /{path} {logical}", str(image)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return int(out[-1])


def _file_info(image: Path, path: str, size: int, head: str, tail: str) -> FileInfo:
    nblocks = (size + BLOCK - 1) // BLOCK
    first = _phys_block(image, path, 0)
    last = _phys_block(image, path, nblocks - 1)
    return FileInfo(path, size, first * BLOCK, last - first == nblocks - 1, head, tail)


def build_image(out_dir: Path, big_size: int = 2 * GIB, rand_size: int = GIB,
                log: Callable[[str], None] = print) -> Manifest:
    """Build ``out_dir/bench.img`` unless a manifest of the same layout is already there."""
    out_dir = out_dir.resolve()
    img = out_dir / "bench.img"
    man_path = out_dir / "bench.img.json"
    if img.exists() and man_path.exists():
        try:
            man = Manifest.from_json(man_path.read_text())
            man = dataclasses.replace(man, image=str(img))  # the tree may have moved
            if (man.version == LAYOUT_VERSION and man.big.size == big_size
                    and man.rand.size == rand_size and img.stat().st_size == man.image_size):
                return man
        except (ValueError, KeyError, TypeError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    t0 = time.monotonic()
    log(f"building benchmark image {img} (once; ~{(big_size + rand_size) // MIB} MiB of data)")
    try:
        bh, bt = _write_random(src / "big.bin", big_size)
        rh, rt = _write_random(src / "rand.bin", rand_size)
        tree_bytes = _write_tree(src / "tree")
        # Room for metadata, a journal and the tree's partial blocks, rounded to a MiB.
        size = (big_size + rand_size + tree_bytes + TREE_FILES * BLOCK) * 11 // 10 + 256 * MIB
        size = (size + MIB - 1) // MIB * MIB
        img.unlink(missing_ok=True)
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-L", "asyncfs-bench",
             "-d", str(src), str(img), f"{size // 1024}k"],
            check=True, capture_output=True, text=True,
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)  # 3 GiB of scratch we never need again
    man = Manifest(
        version=LAYOUT_VERSION,
        image=str(img),
        image_size=img.stat().st_size,
        big=_file_info(img, "big.bin", big_size, bh, bt),
        rand=_file_info(img, "rand.bin", rand_size, rh, rt),
        tree_files=TREE_FILES,
        tree_bytes=tree_bytes,
        built_s=round(time.monotonic() - t0, 1),
    )
    man_path.write_text(man.to_json())
    return man


def drop_caches(image: Path) -> str | None:
    """Make the next read cold: fsync + fadvise(DONTNEED) the image, then drop the host caches.

    Returns None, or a warning when the host-wide drop was impossible (not root).
    """
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED skips dirty pages; an unsynced image would stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot drop host caches ({exc.strerror}); cold runs only fadvise the image"
    return None


def verify_file(path: Path, info: FileInfo) -> str | None:
    """Compare the first and last MiB read through a mount with the manifest; None if equal."""
    with open(path, "rb") as f:
        head = f.read(MIB)
        f.seek(max(info.size - MIB, 0))
        tail = f.read(MIB)
    if hashlib.sha256(head).hexdigest() != info.head_sha256:
        return f"wrong bytes in the first MiB of /{info.path}"
    if hashlib.sha256(tail).hexdigest() != info.tail_sha256:
        return f"wrong bytes in the last MiB of /{info.path}"
    return None
