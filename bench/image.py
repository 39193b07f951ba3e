"""The benchmark image: built once into bench/out/ with ``mke2fs -d``, plus the cold-cache helpers.

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
import mmap
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
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


def uncache_file(path: str | Path) -> None:
    """Drop one file's pages from the host page cache (fsync, then fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED skips dirty pages; an unsynced file would stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_caches(image: Path) -> str | None:
    """Make the next read cold: fsync + fadvise(DONTNEED) the image, then drop the host caches.

    Returns None, or a warning when the host-wide drop was impossible (not root).
    """
    uncache_file(image)
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot drop host caches ({exc.strerror}); cold runs only fadvise the image"
    return None


# ---- priming the storage under the image -----------------------------------------------------

Span = tuple[int, int]  # (byte offset in the image, length)
PRIME_CHUNK = 8 * MIB  # O_DIRECT reads this large run near the device limit from one thread
# "level/depth  entry/entries  logical_start - logical_end  physical_start - physical_end  len"
_EXTENT_RE = re.compile(
    r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+\d+\s*-\s*\d+\s+(\d+)\s*-\s*(\d+)\s+\d+")


def parse_extents(debugfs_ex: str, block: int = BLOCK) -> list[Span]:
    """The data extents (leaf entries) in ``debugfs -R "ex FILE"`` output, as byte spans.

    Index entries (``0/ 1 ... 0 - 524287 131535 524288``) name one tree block, not data, and
    have no physical range: the pattern needs ``start - end`` on the physical side.
    """
    spans = []
    for line in debugfs_ex.splitlines():
        m = _EXTENT_RE.match(line)
        if m and m.group(1) == m.group(2):  # level == depth: a leaf
            first, last = int(m.group(3)), int(m.group(4))
            spans.append((first * block, (last - first + 1) * block))
    return merge_spans(spans)


def file_extents(image: Path, path: str) -> list[Span]:
    """Where ``/path``'s data lies in the image (merged byte spans), from ``debugfs ex``."""
    r = subprocess.run(["debugfs", "-R", f"ex /{path}", str(image)],
                       capture_output=True, text=True, timeout=60)
    spans = parse_extents(r.stdout)
    if r.returncode != 0 or not spans:
        raise RuntimeError(f"debugfs ex /{path} found no extents: {r.stderr.strip()[-200:]}")
    return spans


def merge_spans(spans: Sequence[Span]) -> list[Span]:
    """Sorted, non-overlapping spans covering the same bytes (adjacent ones joined)."""
    out: list[Span] = []
    for off, length in sorted(s for s in spans if s[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out


def complement_spans(spans: Sequence[Span], size: int) -> list[Span]:
    """The bytes of ``[0, size)`` that ``spans`` do not cover."""
    out: list[Span] = []
    pos = 0
    for off, length in merge_spans(spans):
        if off > pos:
            out.append((pos, min(off, size) - pos))
        pos = max(pos, off + length)
    if pos < size:
        out.append((pos, size - pos))
    return [s for s in out if s[1] > 0]


@dataclass(frozen=True, slots=True)
class PrimeResult:
    nbytes: int
    seconds: float
    direct: bool

    @property
    def mib_s(self) -> float:
        return self.nbytes / MIB / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        how = "O_DIRECT" if self.direct else "buffered"
        return (f"storage primed: {self.nbytes / MIB:,.0f} MiB read ({how}) in "
                f"{self.seconds:.1f} s, {self.mib_s:,.0f} MiB/s")


def prime_storage(image: Path, spans: Sequence[Span], chunk: int = PRIME_CHUNK) -> PrimeResult:
    """Read ``spans`` of the image once, bypassing this kernel's page cache (O_DIRECT).

    Why: the disk under the image may itself be cached below this machine (a VM's virtual
    disk backed by a file in the host's page cache). ``drop_caches`` cannot empty that cache,
    so without this the first target to read a file after a while reads it from the real disk
    (measured: 242 MiB/s the first time, 1,800 the next) and every later target from the host's
    memory. Reading the spans first gives every target the same storage: the primed one. The
    time it took is worth recording: a slow prime means the storage below was cold.
    """
    spans = merge_spans(spans)
    direct = True
    try:
        fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # tmpfs and some FUSE filesystems refuse O_DIRECT
        fd = os.open(image, os.O_RDONLY)
        direct = False
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    total = 0
    t0 = time.monotonic()
    try:
        for off, length in spans:
            end = off + length
            pos = off - off % BLOCK
            while pos < end:
                want = min(chunk, -(-(end - pos) // BLOCK) * BLOCK)
                n = os.preadv(fd, [memoryview(buf)[:want]], pos)
                if n <= 0:
                    break  # end of the image
                total += n
                pos += n
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        buf.close()
    return PrimeResult(total, time.monotonic() - t0, direct)


def page_cache_drops() -> int | None:
    """How many times anyone has written drop_caches since boot (``/proc/vmstat``).

    Other users of a shared machine drop caches for their own cold runs; a count that grows
    during a cell (beyond our own drops) means a warm cell was not warm.
    """
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
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
