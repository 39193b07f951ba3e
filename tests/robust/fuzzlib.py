"""Image fuzzing for asyncfs: find ext4 structures in a pristine image, forge or flip them, and
walk the damaged image in-process through the Volume API with oracles for every promise of
docs/robustness.md.

A :class:`Case` is compact and reproducible: the pristine image is named by (preset, profile,
tree seed) and every patch by a *locator* (``inode:/sparse/fragmented``, ``extblk:/x:0``, ...)
plus an offset inside the located structure. Locators are resolved with ``debugfs`` on the
freshly built image, so a saved case survives layout changes, new UUIDs and new checksums.

Oracles, per case (:func:`run_case`):

* mount refuses: an ``ImageError`` (an ``AsyncfsError``) whose message is one line;
* every operation of the walk either answers or raises an ``AsyncfsError``; anything else is a
  bug ("crash");
* every operation finishes within ``op_timeout`` (trio) and the case within ``case_timeout``
  (SIGALRM, for loops that never await): else "hang"; no single trio task step holds the
  event loop for more than ``step_limit`` seconds of CPU (every other request would wait):
  else "stall";
* memory stays bounded: the process's RSS high-water mark rises by less than ``mem_limit``
  during the case (or, with ``trace_memory``, tracemalloc's peak stays below it; 10x slower):
  else "memory";
* every read returns exactly the bytes its file map names (device bytes read straight from the
  image file, inline bytes, zeros for holes), never past the device end, never short before
  EOF: else "bytes";
* every inode whose own structures (inode slot, mapping blocks, data, xattr block) the case
  did not touch looks exactly as in the pristine image (attributes, bytes, link, xattrs,
  names): else "clean".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from asyncfs.cli.options import MountOptions
from asyncfs.cli.wiring import open_stack
from asyncfs.engine.volume import Volume
from asyncfs.engine.volume_maps import ExtentFileMap, IndirectFileMap
from asyncfs.errors import AsyncfsError, NoEntryError
from asyncfs.ext4.group import inode_location
from asyncfs.types import Run
from tests.imagegen import make_image, make_tree

# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """``data`` written at ``off`` bytes into the structure named by ``at``."""

    at: str
    off: int
    data: bytes

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "off": self.off, "hex": self.data.hex()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Patch:
        return cls(d["at"], int(d["off"]), bytes.fromhex(d["hex"]))


@dataclass(frozen=True)
class Case:
    """One damaged image: a pristine image plus patches (and/or a truncation)."""

    preset: str
    structure: str  # superblock, gdt, inode, extent, dirblock, htree, xattr, symlink, truncate
    label: str
    patches: tuple[Patch, ...] = ()
    truncate: str | None = None  # "BYTES", "frac:F" of the image, or "end-N"
    nocsum: bool = False
    profile: str = "fuzz"
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "preset": self.preset, "profile": self.profile, "seed": self.seed,
            "structure": self.structure, "label": self.label, "nocsum": self.nocsum,
            "patches": [p.to_json() for p in self.patches],
        }
        if self.truncate is not None:
            d["truncate"] = self.truncate
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Case:
        return cls(
            preset=d["preset"], structure=d["structure"], label=d["label"],
            patches=tuple(Patch.from_json(p) for p in d.get("patches", ())),
            truncate=d.get("truncate"), nocsum=bool(d.get("nocsum", False)),
            profile=d.get("profile", "fuzz"), seed=int(d.get("seed", 0)),
        )

    @property
    def name(self) -> str:
        csum = "nocsum" if self.nocsum else "csum"
        return f"{self.preset}/{csum}/{self.structure}/{self.label}"


# --------------------------------------------------------------------------------------------
# pristine trees and images
# --------------------------------------------------------------------------------------------


def make_fuzz_tree(root: Path, seed: int = 0) -> None:
    """A small tree with one of every structure worth damaging, cheap to walk (~150 inodes).

    ``files/`` small, block-sized and multi-block files; ``frag`` one extent per 4 KiB data
    chunk (depth-1 extent tree at every block size); ``far`` data past 70 MiB (double/triple
    indirect on 1 KiB ext2); ``dx/`` 120 entries (an htree after e2fsck -D); ``dx_long/`` 560
    entries of 200-byte names (two htree levels with 1 KiB blocks); ``lin/`` a one-block linear
    directory; ``links/`` fast and slow symlinks; ``xattr/`` in-inode and block xattrs, a
    shared block; ``inline`` files for the inline_data preset.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "lost+found").mkdir(mode=0o700, exist_ok=True)
    files = root / "files"
    files.mkdir()
    (files / "empty").write_bytes(b"")
    (files / "one").write_bytes(b"\x5a")
    (files / "inline_small").write_bytes(b"tiny inline payload\n")
    (files / "inline_100").write_bytes(rng.randbytes(100))
    for n in (1023, 4096, 4097, 12 * 1024 + 1, 70_000):
        (files / f"f{n}").write_bytes(rng.randbytes(n))
    (files / "big").write_bytes(rng.randbytes((260 << 10) + 17))
    with open(files / "frag", "wb") as f:
        for i in range(400):
            f.seek(i * 8192)
            f.write(rng.randbytes(4096))
    with open(files / "far", "wb") as f:
        f.write(rng.randbytes(100))
        f.seek((70 << 20) + 12345)
        f.write(rng.randbytes(7000))
    with open(files / "hole_end", "wb") as f:
        f.write(rng.randbytes(4096))
        f.truncate(1 << 20)
    dx = root / "dx"
    dx.mkdir()
    for i in range(120):
        name = f"e{i:04d}_" + "n" * rng.randrange(0, 40)
        if i % 10 == 0:
            (dx / name).mkdir()
        else:
            (dx / name).write_bytes(i.to_bytes(4, "little") * (i % 5))
    dxl = root / "dx_long"
    dxl.mkdir()
    for i in range(560):
        (dxl / (f"{i:04d}_" + "L" * 195)).write_bytes(b"")
    lin = root / "lin"
    lin.mkdir()
    for i in range(8):
        (lin / f"entry{i}").write_bytes(f"lin {i}\n".encode())
    (lin / "sub").mkdir()
    (lin / "sub" / "deep").write_bytes(b"deep\n")
    links = root / "links"
    links.mkdir()
    (links / "target").write_bytes(b"target file\n")
    for length in (1, 59, 60, 500, 1000):
        os.symlink("t" * length, links / f"len{length}")
    os.symlink("../files", links / "to_dir")
    (links / "hard1").write_bytes(b"hard linked\n")
    os.link(links / "hard1", links / "hard2")
    xd = root / "xattr"
    xd.mkdir()
    (xd / "small").write_bytes(b"s")
    os.setxattr(xd / "small", "user.small", b"v1")
    os.setxattr(xd / "small", "user.empty", b"")
    (xd / "large").write_bytes(b"l")
    os.setxattr(xd / "large", "user.large", rng.randbytes(700))
    os.setxattr(xd / "large", "user.tiny", b"t")
    for fname in ("shared1", "shared2"):
        (xd / fname).write_bytes(fname.encode())
        os.setxattr(xd / fname, "user.shared_a", bytes(range(256)) + b"a" * 44)
        os.setxattr(xd / fname, "user.shared_b", b"b" * 200)
    (xd / "many").write_bytes(b"m")
    for i in range(20):
        os.setxattr(xd / "many", f"user.attr{i:02d}", f"value-{i}".encode() * (i % 4 + 1))
    os.mkdir(xd / "dir")
    os.setxattr(xd / "dir", "user.on_dir", b"d")
    stamp = 1_600_000_000
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)


FUZZ_PRESETS = ("ext4", "ext4-1k", "ext2-1k", "inline_data", "ext4-old", "bigalloc", "meta_bg")
"""Presets the campaign damages (``tests.imagegen.PRESETS`` names)."""


class ImageStore:
    """Pristine images (and their layouts and references) built once per (preset, tree)."""

    def __init__(self, base: Path | None = None) -> None:
        self._own = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="asyncfs-fuzz-"))
        self._trees: dict[tuple[str, int], Path] = {}
        self._images: dict[tuple[str, str, int], Path] = {}
        self._layouts: dict[Path, Layout] = {}
        self._refs: dict[tuple[Path, bool], Reference] = {}

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.base, ignore_errors=True)

    def tree(self, profile: str, seed: int) -> Path:
        key = (profile, seed)
        if key not in self._trees:
            src = self.base / f"src-{profile}-{seed}"
            shutil.rmtree(src, ignore_errors=True)
            if profile == "fuzz":
                make_fuzz_tree(src, seed)
            else:
                make_tree(src, profile, seed)  # type: ignore[arg-type]
            self._trees[key] = src
        return self._trees[key]

    def image(self, preset: str, profile: str = "fuzz", seed: int = 0) -> Path:
        key = (preset, profile, seed)
        if key not in self._images:
            img = self.base / f"{preset}-{profile}-{seed}.img"
            make_image(self.tree(profile, seed), img, preset)
            self._images[key] = img
        return self._images[key]

    def layout(self, img: Path) -> Layout:
        if img not in self._layouts:
            self._layouts[img] = locate(img)
        return self._layouts[img]

    def reference(self, img: Path, nocsum: bool) -> Reference:
        key = (img, nocsum)
        if key not in self._refs:
            self._refs[key] = build_reference(img, nocsum)
        return self._refs[key]


# --------------------------------------------------------------------------------------------
# locating structures (debugfs on the pristine image: an independent reader)
# --------------------------------------------------------------------------------------------


def _debugfs(img: Path, cmd: str) -> str:
    res = subprocess.run(["debugfs", "-R", cmd, str(img)], capture_output=True)
    return res.stdout.decode("utf-8", "surrogateescape")


@dataclass
class Layout:
    """Where each named structure of one pristine image lives: locator -> (offset, length)."""

    block_size: int
    inode_size: int
    desc_size: int
    size: int
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def resolve(self, at: str) -> tuple[int, int]:
        if at not in self.regions:
            raise KeyError(f"no structure {at!r} in this image")
        return self.regions[at]

    def kinds(self, prefix: str) -> list[str]:
        return sorted(k for k in self.regions if k.split(":", 1)[0] == prefix)


_FILES_WITH_MAPS = ("/files/frag", "/files/big", "/files/far", "/files/f70000",
                    "/dx", "/dx_long")
_INODES = ("<2>", "<8>", "<11>", "/files", "/files/frag", "/files/big", "/files/far",
           "/files/f4097", "/files/inline_small", "/files/inline_100", "/files/one", "/dx",
           "/dx_long", "/lin", "/lin/sub", "/links/len500", "/links/len59", "/links/len1000",
           "/links/hard1", "/xattr/small", "/xattr/large", "/xattr/many", "/xattr/shared1",
           "/xattr/dir")


def _block_list(img: Path, path: str) -> tuple[dict[str, list[int]], dict[int, int]]:
    """(mapping blocks by kind: ETB0/ETB1/IND/DIND/TIND, logical -> physical data blocks),
    from the EXTENTS/BLOCKS section of ``debugfs stat``."""
    out = _debugfs(img, f"stat {path}")
    m = re.search(r"\n(?:EXTENTS|BLOCKS):\n(.*?)(?:\nTOTAL|\Z)", out, re.S)
    meta: dict[str, list[int]] = {}
    data: dict[int, int] = {}
    if not m:
        return meta, data
    for item in re.finditer(r"\(([^)]*)\):(\d+)(?:-(\d+))?", m.group(1)):
        what, p0 = item.group(1), int(item.group(2))
        if what[0].isdigit():
            l0, _, l1 = what.partition("-")
            first = int(l0)
            last = int(l1) if l1 else first
            for i in range(min(last - first + 1, 4096)):
                data[first + i] = p0 + i
        else:
            meta.setdefault(re.sub(r"\d+$", "", what) if what.startswith("ETB") else what,
                            []).append(p0)
    return meta, data


def locate(img: Path) -> Layout:
    """Find, with debugfs/dumpe2fs, the structures the campaign damages."""
    head = _debugfs(img, "stats")
    bs = int(re.search(r"Block size:\s+(\d+)", head).group(1))  # type: ignore[union-attr]
    isz = int(re.search(r"Inode size:\s+(\d+)", head).group(1))  # type: ignore[union-attr]
    m = re.search(r"Group descriptor size:\s+(\d+)", head)
    dsz = int(m.group(1)) if m else 32
    first_data = 1 if bs == 1024 else 0
    lay = Layout(bs, isz, dsz, img.stat().st_size)
    lay.regions["sb"] = (1024, 1024)
    lay.regions["gdt"] = ((first_data + 1) * bs, bs)
    for g in range(min(4, bs // dsz)):
        lay.regions[f"gd:{g}"] = ((first_data + 1) * bs + g * dsz, dsz)
    for path in _INODES:
        out = _debugfs(img, f"imap {path}")
        m = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", out)
        if m:
            lay.regions[f"inode:{path}"] = (int(m.group(1)) * bs + int(m.group(2), 16), isz)
    for path in _FILES_WITH_MAPS:
        meta, _ = _block_list(img, path)
        for kind, pblks in meta.items():
            for i, pblk in enumerate(pblks[:3]):
                prefix = "extblk" if kind.startswith("ETB") else "indblk"
                lay.regions[f"{prefix}:{path}:{kind}.{i}"] = (pblk * bs, bs)
    for path in ("/dx", "/dx_long", "/lin", "/files", "<2>"):
        _, data = _block_list(img, path)
        if not data:
            continue
        if path in ("/dx", "/dx_long") and len(data) > 1:
            lay.regions[f"dxroot:{path}"] = (data[0] * bs, bs)
            with open(img, "rb") as f:
                f.seek(data[0] * bs)
                root = f.read(bs)
            levels = root[0x1E]
            count = struct.unpack_from("<H", root, 0x22)[0]
            lblks = [struct.unpack_from("<I", root, 0x24 + 8 * i)[0] for i in range(count)]
            kind = "dxnode" if levels else "dxleaf"
            for i, lb in enumerate(lblks[:2]):
                if lb in data:
                    lay.regions[f"{kind}:{path}:{i}"] = (data[lb] * bs, bs)
            if levels and lblks and lblks[0] in data:
                with open(img, "rb") as f:
                    f.seek(data[lblks[0]] * bs)
                    node = f.read(bs)
                leaf = struct.unpack_from("<I", node, 0x0C)[0]
                if leaf in data:
                    lay.regions[f"dxleaf:{path}:0"] = (data[leaf] * bs, bs)
        else:
            lay.regions[f"dirblk:{path}"] = (data[0] * bs, bs)
    for path in ("/links/len500", "/links/len1000"):
        _, data = _block_list(img, path)
        if 0 in data:
            lay.regions[f"symblk:{path}"] = (data[0] * bs, bs)
    for path in ("/xattr/large", "/xattr/shared1", "/xattr/many"):
        m = re.search(r"File ACL: (\d+)", _debugfs(img, f"stat {path}"))
        if m and m.group(1) != "0":
            lay.regions[f"xattrblk:{path}"] = (int(m.group(1)) * bs, bs)
    return lay


# --------------------------------------------------------------------------------------------
# generating cases
# --------------------------------------------------------------------------------------------

# (name, offset, width) of fields worth forging, per structure kind
SB_FIELDS = [
    ("s_inodes_count", 0x0, 4), ("s_blocks_count_lo", 0x4, 4), ("s_r_blocks_count", 0x8, 4),
    ("s_free_blocks", 0xC, 4), ("s_free_inodes", 0x10, 4), ("s_first_data_block", 0x14, 4),
    ("s_log_block_size", 0x18, 4), ("s_log_cluster_size", 0x1C, 4),
    ("s_blocks_per_group", 0x20, 4), ("s_clusters_per_group", 0x24, 4),
    ("s_inodes_per_group", 0x28, 4), ("s_magic", 0x38, 2), ("s_state", 0x3A, 2),
    ("s_rev_level", 0x4C, 4), ("s_first_ino", 0x54, 4), ("s_inode_size", 0x58, 2),
    ("s_feature_compat", 0x5C, 4), ("s_feature_incompat", 0x60, 4),
    ("s_feature_ro_compat", 0x64, 4), ("s_reserved_gdt_blocks", 0xCE, 2),
    ("s_journal_inum", 0xE0, 4), ("s_hash_seed", 0xEC, 4), ("s_def_hash_version", 0xFC, 1),
    ("s_desc_size", 0xFE, 2), ("s_first_meta_bg", 0x104, 4), ("s_blocks_count_hi", 0x150, 4),
    ("s_min_extra_isize", 0x15C, 2), ("s_want_extra_isize", 0x15E, 2), ("s_flags", 0x160, 4),
    ("s_log_groups_per_flex", 0x174, 1), ("s_checksum_type", 0x175, 1),
    ("s_encoding", 0x27C, 2), ("s_checksum", 0x3FC, 4),
]
GD_FIELDS = [
    ("bg_block_bitmap", 0x0, 4), ("bg_inode_bitmap", 0x4, 4), ("bg_inode_table", 0x8, 4),
    ("bg_free_blocks", 0xC, 2), ("bg_free_inodes", 0xE, 2), ("bg_used_dirs", 0x10, 2),
    ("bg_flags", 0x12, 2), ("bg_itable_unused", 0x1C, 2), ("bg_checksum", 0x1E, 2),
]
GD64_FIELDS = [("bg_inode_table_hi", 0x28, 4), ("bg_free_blocks_hi", 0x2C, 2)]
INODE_FIELDS = [
    ("i_mode", 0x0, 2), ("i_size_lo", 0x4, 4), ("i_links", 0x1A, 2), ("i_blocks_lo", 0x1C, 4),
    ("i_flags", 0x20, 4), ("i_block0", 0x28, 4), ("eh_entries", 0x2A, 2), ("eh_max", 0x2C, 2),
    ("eh_depth", 0x2E, 2), ("i_block_e0_block", 0x34, 4), ("i_block_e0_len", 0x38, 2),
    ("i_block_e0_start", 0x3C, 4), ("i_block_ind", 0x58, 4), ("i_block_dind", 0x5C, 4),
    ("i_block_tind", 0x60, 4), ("i_generation", 0x64, 4), ("i_file_acl", 0x68, 4),
    ("i_size_high", 0x6C, 4), ("i_blocks_hi", 0x74, 2), ("i_file_acl_hi", 0x76, 2),
]
INODE_LARGE_FIELDS = [("i_extra_isize", 0x80, 2), ("ibody_xattr_magic", 0xA0, 4),
                      ("ibody_e_name_len", 0xA4, 1), ("ibody_e_value_offs", 0xA6, 2),
                      ("ibody_e_value_inum", 0xA8, 4), ("ibody_e_value_size", 0xAC, 4)]
EXT_FIELDS = [
    ("eh_magic", 0x0, 2), ("eh_entries", 0x2, 2), ("eh_max", 0x4, 2), ("eh_depth", 0x6, 2),
    ("e0_block", 0xC, 4), ("e0_len", 0x10, 2), ("e0_start_hi", 0x12, 2), ("e0_start", 0x14, 4),
    ("e1_block", 0x18, 4), ("e1_len", 0x1C, 2), ("e1_start", 0x20, 4),
]
DIRENT_FIELDS = [
    ("d0_inode", 0x0, 4), ("d0_rec_len", 0x4, 2), ("d0_name_len", 0x6, 1),
    ("d0_file_type", 0x7, 1), ("d1_inode", 0xC, 4), ("d1_rec_len", 0x10, 2),
    ("d1_name_len", 0x12, 1), ("d2_inode", 0x18, 4), ("d2_rec_len", 0x1C, 2),
    ("d2_name_len", 0x1E, 1),
]
DXROOT_FIELDS = [
    ("dot_rec_len", 0x4, 2), ("dotdot_rec_len", 0x10, 2), ("reserved_zero", 0x18, 4),
    ("hash_version", 0x1C, 1), ("info_length", 0x1D, 1), ("indirect_levels", 0x1E, 1),
    ("unused_flags", 0x1F, 1), ("limit", 0x20, 2), ("count", 0x22, 2), ("block0", 0x24, 4),
    ("hash1", 0x28, 4), ("block1", 0x2C, 4), ("hash2", 0x30, 4), ("block2", 0x34, 4),
]
DXNODE_FIELDS = [
    ("fake_inode", 0x0, 4), ("fake_rec_len", 0x4, 2), ("limit", 0x8, 2), ("count", 0xA, 2),
    ("block0", 0xC, 4), ("hash1", 0x10, 4), ("block1", 0x14, 4),
]
XATTR_FIELDS = [
    ("h_magic", 0x0, 4), ("h_refcount", 0x4, 4), ("h_blocks", 0x8, 4), ("h_hash", 0xC, 4),
    ("h_checksum", 0x10, 4), ("e_name_len", 0x20, 1), ("e_name_index", 0x21, 1),
    ("e_value_offs", 0x22, 2), ("e_value_inum", 0x24, 4), ("e_value_size", 0x28, 4),
    ("e_hash", 0x2C, 4),
]

_STRUCTURE_OF = {
    "sb": "superblock", "gdt": "gdt", "gd": "gdt", "inode": "inode", "extblk": "extent",
    "indblk": "indirect", "dirblk": "dirblock", "dxroot": "htree", "dxnode": "htree",
    "dxleaf": "dirblock", "symblk": "symlink", "xattrblk": "xattr",
}


def _fields_for(at: str, lay: Layout) -> list[tuple[str, int, int]]:
    kind = at.split(":", 1)[0]
    if kind == "sb":
        return SB_FIELDS
    if kind in ("gd", "gdt"):
        return GD_FIELDS + (GD64_FIELDS if lay.desc_size >= 64 else [])
    if kind == "inode":
        return INODE_FIELDS + (INODE_LARGE_FIELDS if lay.inode_size > 128 else [])
    if kind == "extblk":
        return EXT_FIELDS
    if kind in ("dirblk", "dxleaf"):
        return DIRENT_FIELDS
    if kind == "dxroot":
        return DXROOT_FIELDS
    if kind == "dxnode":
        return DXNODE_FIELDS
    if kind == "xattrblk":
        return XATTR_FIELDS
    if kind == "indblk":
        return [(f"ptr{i}", 4 * i, 4) for i in (0, 1, 2, lay.block_size // 4 - 1)]
    return [("byte0", 0, 4), ("byte_mid", lay.block_size // 2, 4)]


def _forged_values(width: int, orig: int, rng: random.Random, lay: Layout) -> list[int]:
    top = (1 << (8 * width)) - 1
    blocks = lay.size // lay.block_size
    vals = {0, 1, top, top >> 1, orig + 1, orig - 1, orig ^ (1 << rng.randrange(8 * width)),
            rng.randrange(top + 1), orig * 2, blocks, blocks - 1, blocks + 1, 2, 5, 0x8000}
    return [v & top for v in vals if v != orig]


def _read_region(img: Path, lay: Layout, at: str) -> bytes:
    off, length = lay.resolve(at)
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(length)


def _semantic_cases(preset: str, img: Path, lay: Layout) -> list[tuple[str, str, list[Patch]]]:
    """Hand-made forgeries: loops, overlaps, out-of-range pointers, directory cycles."""
    out: list[tuple[str, str, list[Patch]]] = []
    bs = lay.block_size
    for at in lay.kinds("extblk"):
        off, _ = lay.resolve(at)
        pblk = off // bs
        raw = _read_region(img, lay, at)
        # self-loop: the block claims to be an index node pointing at itself
        loop = struct.pack("<HHHHI", 0xF30A, 1, (bs - 12) // 12, 1, 0)
        loop += struct.pack("<IIHH", 0, pblk & 0xFFFFFFFF, pblk >> 32, 0)
        out.append(("extent", f"{at}:self_loop", [Patch(at, 0, loop)]))
        ents = struct.unpack_from("<H", raw, 2)[0]
        if ents >= 2:
            b0 = struct.unpack_from("<I", raw, 12)[0]
            b1 = struct.unpack_from("<I", raw, 24)[0]
            out.append(("extent", f"{at}:overlap",
                        [Patch(at, 16, struct.pack("<H", min(b1 - b0 + 1, 0x7FFF)))]))
            out.append(("extent", f"{at}:dup_start", [Patch(at, 24, struct.pack("<I", b0))]))
            out.append(("extent", f"{at}:out_of_order",
                        [Patch(at, 12, struct.pack("<I", b1)),
                         Patch(at, 24, struct.pack("<I", b0))]))
        out.append(("extent", f"{at}:start_past_end",
                    [Patch(at, 18, struct.pack("<HI", 0, lay.size // bs - 1)),
                     Patch(at, 16, struct.pack("<H", 8))]))
        out.append(("extent", f"{at}:start_huge", [Patch(at, 18, struct.pack("<HI", 0xFFFF, 7))]))
        out.append(("extent", f"{at}:len_max_uninit", [Patch(at, 16, struct.pack("<H", 0xFFFF))]))
        out.append(("extent", f"{at}:lblk_top",
                    [Patch(at, 12, struct.pack("<IH", 0xFFFFFFF0, 0x7FFF))]))
        out.append(("extent", f"{at}:points_at_sb", [Patch(at, 18, struct.pack("<HI", 0, 0))]))
    for at in [a for a in lay.kinds("inode") if a.endswith(("/files/frag", "/dx", "/dx_long"))]:
        raw = _read_region(img, lay, at)
        if struct.unpack_from("<H", raw, 0x28)[0] != 0xF30A:
            continue
        depth = struct.unpack_from("<H", raw, 0x2E)[0]
        if depth:
            # root index to the inode table block holding this inode
            off, _ = lay.resolve(at)
            itb = off // bs
            out.append(("extent", f"{at}:root_to_itable",
                        [Patch(at, 0x34 + 4, struct.pack("<IH", itb, 0))]))
            out.append(("extent", f"{at}:root_depth_up",
                        [Patch(at, 0x2E, struct.pack("<H", depth + 1))]))
            out.append(("extent", f"{at}:root_entries_max",
                        [Patch(at, 0x2A, struct.pack("<HH", 4, 4))]))
        out.append(("inode", f"{at}:size_2p62", [Patch(at, 0x4, b"\0\0\0\0"),
                                                 Patch(at, 0x6C, struct.pack("<I", 1 << 30))]))
    for at in lay.kinds("dxroot") + lay.kinds("dxnode"):
        is_root = at.startswith("dxroot")
        base = 0x20 if is_root else 0x8
        out.append(("htree", f"{at}:child_self", [Patch(at, base + 4, struct.pack("<I", 0))]))
        out.append(("htree", f"{at}:child_far",
                    [Patch(at, base + 4, struct.pack("<I", 0x7FFFFFFF))]))
        out.append(("htree", f"{at}:count_gt_limit", [Patch(at, base + 2, b"\xff\x7f")]))
        out.append(("htree", f"{at}:hash_desc",
                    [Patch(at, base + 8, struct.pack("<I", 0xFFFFFFFE)),
                     Patch(at, base + 16, struct.pack("<I", 2))]))
        if is_root:
            out.append(("htree", f"{at}:levels_3", [Patch(at, 0x1E, b"\x03")]))
            out.append(("htree", f"{at}:levels_1", [Patch(at, 0x1E, b"\x01")]))
    for at in lay.kinds("dxnode"):
        # a dx node whose first child is the first dx node itself: a loop one level down
        root = _read_region(img, lay, "dxroot:" + at.split(":")[1])
        node_lblk = struct.unpack_from("<I", root, 0x24)[0]
        out.append(("htree", f"{at}:node_to_node",
                    [Patch(at, 0xC, struct.pack("<I", node_lblk))]))
    for at in lay.kinds("dirblk") + lay.kinds("dxleaf"):
        # directory cycle: a name in this block that points at the root / at the dir itself
        out.append(("dirblock", f"{at}:entry_to_root", [Patch(at, 0x18, struct.pack("<I", 2))]))
        out.append(("dirblock", f"{at}:rec_len_zero", [Patch(at, 0x10, b"\0\0")]))
        out.append(("dirblock", f"{at}:rec_len_past_block",
                    [Patch(at, 0x10, struct.pack("<H", (bs - 8) & 0xFFFC))]))
        out.append(("dirblock", f"{at}:name_len_255", [Patch(at, 0x1E, b"\xff")]))
        out.append(("dirblock", f"{at}:inode_huge", [Patch(at, 0x18, b"\xff\xff\xff\xff")]))
    for at in lay.kinds("xattrblk"):
        out.append(("xattr", f"{at}:value_size_huge",
                    [Patch(at, 0x28, b"\xff\xff\xff\x7f")]))
        out.append(("xattr", f"{at}:value_offs_past",
                    [Patch(at, 0x22, struct.pack("<H", bs - 2))]))
        out.append(("xattr", f"{at}:name_len_255", [Patch(at, 0x20, b"\xff")]))
        out.append(("xattr", f"{at}:no_terminator", [Patch(at, 0x20, b"\x01" * 0)]
                    + [Patch(at, 0x20 + 16 * i, b"\x07\x01") for i in range(1, 60)]))
        out.append(("xattr", f"{at}:value_inum", [Patch(at, 0x24, struct.pack("<I", 12))]))
    for at in lay.kinds("inode"):
        if at.endswith(("len500", "len1000")):
            out.append(("symlink", f"{at}:size_64k", [Patch(at, 0x4, struct.pack("<I", 65536))]))
            out.append(("symlink", f"{at}:blocks_zero", [Patch(at, 0x1C, b"\0\0\0\0")]))
            out.append(("symlink", f"{at}:size_huge", [Patch(at, 0x6C, b"\xff\xff\xff\x7f")]))
        if at.endswith("len59"):
            out.append(("symlink", f"{at}:fast_blocks", [Patch(at, 0x1C, b"\x08\0\0\0")]))
            out.append(("symlink", f"{at}:fast_size_big", [Patch(at, 0x4, b"\x00\x10\0\0")]))
        if at.endswith(("/dx", "/lin")):
            out.append(("inode", f"{at}:dir_size_huge",
                        [Patch(at, 0x4, b"\0\0\0\xf0"), Patch(at, 0x6C, b"\xff\xff\0\0")]))
            out.append(("inode", f"{at}:dir_as_file", [Patch(at, 0x1, b"\x81")]))
        if at.endswith("/files/big"):
            out.append(("inode", f"{at}:file_as_dir", [Patch(at, 0x1, b"\x41")]))
            out.append(("inode", f"{at}:file_as_link", [Patch(at, 0x1, b"\xa1")]))
    return out


def generate_cases(preset: str, img: Path, lay: Layout, rng: random.Random, *,
                   fields_per_region: int = 3, flips_per_region: int = 2,
                   nocsum_share: float = 0.5, profile: str = "fuzz",
                   seed: int = 0) -> list[Case]:
    """Cases for one pristine image: forged fields, random bytes, semantic forgeries,
    truncations. ``fields_per_region`` forged values are drawn per region (0: every field,
    every value); about ``nocsum_share`` of the cases run with ``-o nocsum``."""
    cases: list[Case] = []

    def add(structure: str, label: str, patches: list[Patch], trunc: str | None = None) -> None:
        cases.append(Case(preset, structure, label, tuple(patches), trunc,
                          nocsum=rng.random() < nocsum_share, profile=profile, seed=seed))

    for at in sorted(lay.regions):
        kind = at.split(":", 1)[0]
        structure = _STRUCTURE_OF.get(kind, kind)
        if at.startswith("inode:") and at.endswith(("len500", "len1000", "len59")):
            structure = "symlink"
        raw = _read_region(img, lay, at)
        forged: list[tuple[str, int, bytes]] = []
        for name, off, width in _fields_for(at, lay):
            if off + width > len(raw):
                continue
            orig = int.from_bytes(raw[off : off + width], "little")
            for v in _forged_values(width, orig, rng, lay):
                forged.append((f"{name}={v:#x}", off, v.to_bytes(width, "little")))
        if fields_per_region:
            forged = rng.sample(forged, min(fields_per_region, len(forged)))
        for label, off, data in forged:
            add(structure, f"{at}:{label}", [Patch(at, off, data)])
        for _ in range(flips_per_region):
            n = rng.choice((1, 2, 4, 16))
            patches = []
            hot = min(len(raw), 128)  # headers live at the start: bias flips there
            for _ in range(n):
                off = rng.randrange(hot) if rng.random() < 0.7 else rng.randrange(len(raw))
                patches.append(Patch(at, off, bytes([raw[off] ^ (1 << rng.randrange(8))])
                                     if rng.random() < 0.5 else rng.randbytes(1)))
            add(structure, f"{at}:flip{n}x{rng.randrange(1 << 16):04x}", patches)
    for structure, label, patches in _semantic_cases(preset, img, lay):
        add(structure, label, patches)
    for t in ("0", "1023", "2048", "4096", "frac:0.02", "frac:0.25", "frac:0.5", "end-4096",
              "end-1"):
        add("truncate", f"truncate:{t}", [], t)
    return cases


# --------------------------------------------------------------------------------------------
# building the damaged image
# --------------------------------------------------------------------------------------------


def _truncate_size(spec: str, size: int) -> int:
    if spec.startswith("frac:"):
        return int(size * float(spec[5:]))
    if spec.startswith("end-"):
        return size - int(spec[4:])
    return int(spec)


def damaged_ranges(case: Case, lay: Layout) -> list[tuple[int, int]]:
    out = []
    for p in case.patches:
        base, _length = lay.resolve(p.at)
        out.append((base + p.off, base + p.off + len(p.data)))
    return out


def build_damaged(pristine: Path, lay: Layout, case: Case, dst: Path) -> None:
    """Copy ``pristine`` to ``dst`` (sparse) and apply ``case``."""
    subprocess.run(["cp", "--sparse=always", str(pristine), str(dst)], check=True)
    with open(dst, "r+b") as f:
        for p in case.patches:
            base, length = lay.resolve(p.at)
            if p.off + len(p.data) > length:
                raise ValueError(f"patch at {p.at}+{p.off} leaves the structure")
            f.seek(base + p.off)
            f.write(p.data)
        if case.truncate is not None:
            f.truncate(_truncate_size(case.truncate, lay.size))


# --------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------

READ_CHUNK = 128 * 1024
READ_HEAD = 512 * 1024  # bytes read from the start of each file
MAX_DIR_ENTRIES = 20_000
MAX_INODES = 4_000
LOOKUPS_PER_DIR = 64
CHILDREN_PER_DIR = 64
LOG_REPEAT_LIMIT = 20  # one damaged object may be reached a few times, not once per name


@dataclass
class InodeView:
    """What the walk saw of one inode (the pristine reference stores the same)."""

    attr: Any = None
    reads: dict[int, bytes] = field(default_factory=dict)  # offset -> sha256 of bytes
    link: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None
    names: list[bytes] | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """Result of one case."""

    verdict: str  # "refused", "served", or a failure: crash/hang/memory/bytes/clean/message
    detail: str = ""
    seconds: float = 0.0
    peak_mib: float = 0.0
    log_records: int = 0
    longest_step: float = 0.0
    errors: int = 0
    inodes: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict not in ("refused", "served")


class CaseFailure(Exception):
    """An oracle caught a bug."""

    def __init__(self, verdict: str, detail: str) -> None:
        super().__init__(f"{verdict}: {detail}")
        self.verdict = verdict
        self.detail = detail


class _Hang(BaseException):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _Hang()


def _sha(b: bytes | memoryview) -> bytes:
    return hashlib.sha256(b).digest()


class Walker:
    """Walks a mounted Volume: every reachable inode once, every operation guarded."""

    def __init__(self, vol: Volume, image: Path, *, op_timeout: float,
                 check_bytes: bool = True) -> None:
        self.vol = vol
        self.op_timeout = op_timeout
        self.check_bytes = check_bytes
        self.seen: dict[int, InodeView] = {}
        self.errors = 0
        self._img = open(image, "rb")  # noqa: SIM115 - closed in close()
        self._img_size = os.fstat(self._img.fileno()).st_size

    def close(self) -> None:
        self._img.close()

    async def _op(self, view: InodeView, what: str, fn: Any, *args: Any) -> Any:
        try:
            with trio.fail_after(self.op_timeout):
                return await fn(*args)
        except AsyncfsError as e:
            msg = str(e)
            if "\n" in msg or not msg:
                raise CaseFailure("message", f"{what}: {type(e).__name__} {msg!r}") from e
            self.errors += 1
            view.errors.append(f"{what}: {type(e).__name__}")
            return None
        except trio.TooSlowError:
            raise CaseFailure("hang", f"{what} took over {self.op_timeout}s") from None
        except CaseFailure:
            raise
        except Exception as e:
            tb = "".join(traceback.format_exception(e)[-6:])
            raise CaseFailure("crash", f"{what}: {type(e).__name__}: {e}\n{tb}") from e

    def _expected(self, runs: list[Run], off: int, n: int) -> bytes | None:
        """The bytes ``runs`` name, read straight from the image; None if a run leaves the
        device (then the read must have failed)."""
        out = bytearray()
        pos = off
        for r in runs:
            if r.file_off != pos or r.length <= 0:
                raise CaseFailure("bytes", f"file map runs not contiguous at {pos}: {r}")
            if r.data is not None:
                if len(r.data) < r.length:
                    raise CaseFailure("bytes", f"inline run shorter than its length: {r}")
                out += r.data[: r.length]
            elif r.dev_off is None:
                out += bytes(r.length)
            else:
                if r.dev_off < 0 or r.dev_off + r.length > self._img_size:
                    return None
                self._img.seek(r.dev_off)
                out += self._img.read(r.length)
            pos += r.length
        if pos != off + n:
            raise CaseFailure("bytes", f"file map covers {pos - off} of {n} bytes at {off}")
        return bytes(out)

    async def _read_at(self, view: InodeView, ino: int, fh: Any, off: int, n: int,
                       size: int) -> None:
        want = max(0, min(n, size - off))
        data = await self._op(view, f"read ino {ino} @{off}", self.vol.read, fh, off, n)
        if data is None:
            return
        if len(data) != want:
            raise CaseFailure("bytes", f"ino {ino}: read({off}, {n}) gave {len(data)} bytes, "
                                       f"file size {size} wants {want}")
        if self.check_bytes and want:
            try:
                runs = await fh.fmap.map(off, want)
            except AsyncfsError:
                runs = None
            if runs is None:
                raise CaseFailure("bytes", f"ino {ino}: read at {off} succeeded, map fails")
            exp = self._expected(runs, off, want)
            if exp is None:
                raise CaseFailure("bytes", f"ino {ino}: read at {off} served bytes past the "
                                           f"device end ({runs})")
            if exp != bytes(data):
                raise CaseFailure("bytes", f"ino {ino}: read at {off} differs from the bytes "
                                           "its map names")
        view.reads[off] = _sha(data)

    async def walk(self) -> None:
        vol = self.vol
        root = InodeView()
        await self._op(root, "statfs", _async_call, vol.statfs)
        stack: list[int] = [vol.root_ino]
        while stack and len(self.seen) < MAX_INODES:
            ino = stack.pop()
            if ino in self.seen:
                continue  # hard links, and directory loops a forged entry can make
            view = InodeView()
            self.seen[ino] = view
            attr = await self._op(view, f"getattr {ino}", vol.getattr, ino)
            view.attr = attr
            names = await self._op(view, f"listxattr {ino}", vol.listxattr, ino)
            if names is not None:
                view.xattrs = {}
                for n in sorted(names)[:64]:
                    v = await self._op(view, f"getxattr {ino}", vol.getxattr, ino, n)
                    if v is not None:
                        view.xattrs[n] = _sha(v)
            if attr is None:
                continue
            mode = attr.mode
            if stat.S_ISREG(mode):
                fh = await self._op(view, f"open {ino}", vol.open, ino)
                if fh is None:
                    continue
                size = attr.size
                offs = list(range(0, min(size, READ_HEAD), READ_CHUNK))
                if size > READ_HEAD:
                    offs += [size - 4096, (size // 3) & ~4095, size - 1]
                offs.append(size)  # at EOF: empty
                for off in offs:
                    await self._read_at(view, ino, fh, max(off, 0), READ_CHUNK, size)
            elif stat.S_ISLNK(mode):
                view.link = await self._op(view, f"readlink {ino}", vol.readlink, ino)
            elif stat.S_ISDIR(mode):
                listed: list[bytes] = []
                children: list[int] = []
                off = 0
                for _ in range(MAX_DIR_ENTRIES):
                    batch = await self._op(view, f"readdir {ino} @{off}", vol.readdir, ino, off)
                    if not batch:
                        break
                    for e in batch:
                        listed.append(e.name)
                        if e.name not in (b".", b".."):
                            children.append(e.ino)
                    if batch[-1].next_off <= off:
                        raise CaseFailure("hang", f"readdir {ino}: cookie went from {off} "
                                                  f"back to {batch[-1].next_off}")
                    off = batch[-1].next_off
                    if len(listed) > MAX_DIR_ENTRIES:
                        break
                view.names = sorted(listed)
                # a big directory of alike files: visit evenly spaced ones (cost, not coverage)
                stack += children[:: max(1, len(children) // CHILDREN_PER_DIR)]
                # evenly spaced names reach every htree leaf without a lookup per entry
                for name in listed[:: max(1, len(listed) // LOOKUPS_PER_DIR)]:
                    if name in (b".", b".."):
                        continue
                    await self._op(view, f"lookup {ino}/{name!r}", vol.lookup, ino, name)
                await self._op(view, f"lookup {ino}/missing", _expect_missing, vol, ino)


async def _async_call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def _expect_missing(vol: Volume, ino: int) -> None:
    """A lookup of a name that is not there: ENOENT is the right answer, not an error."""
    with contextlib.suppress(NoEntryError):
        await vol.lookup(ino, b"no-such-name-here")


@dataclass
class Reference:
    """The pristine image as the walk sees it, and each inode's footprint on the device."""

    views: dict[int, InodeView]
    footprint: dict[int, list[tuple[int, int]]]


class _RecordingHost:
    """MapHost proxy that records the mapping blocks a file map reads."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.block_size = vol.block_size
        self.blocks_count = vol.blocks_count
        self.blocks: list[int] = []

    async def extent_block(self, ino: int, generation: int, pblk: int, depth: int) -> Any:
        self.blocks.append(pblk)
        return await self.vol.extent_block(ino, generation, pblk, depth)

    async def pointer_block(self, ino: int, pblk: int) -> Any:
        self.blocks.append(pblk)
        return await self.vol.pointer_block(ino, pblk)


async def _footprint(vol: Volume, ino: int) -> list[tuple[int, int]]:
    """Device byte ranges that make up inode ``ino``: its slot, mapping blocks, data, xattr
    block. Damage outside them must not change what the inode shows."""
    sb = vol.sb
    inode = await vol._inode(ino)
    gd = vol._gds[(ino - 1) // sb.s_inodes_per_group]
    loc = inode_location(sb, gd, ino)
    out = [(loc, loc + sb.s_inode_size)]
    bs = vol.block_size
    if inode.i_file_acl:
        out.append((inode.i_file_acl * bs, (inode.i_file_acl + 1) * bs))
    fast_link = inode.is_lnk and vol._is_fast_symlink(inode)
    if (inode.is_reg or inode.is_dir or inode.is_lnk) and not inode.has_inline_data \
            and not fast_link:
        host = _RecordingHost(vol)
        fmap: Any = (ExtentFileMap(host, inode) if inode.uses_extents
                     else IndirectFileMap(host, inode))
        runs = await fmap.map(0, inode.i_size)
        for r in runs:
            if r.dev_off is not None:
                first = r.dev_off - r.dev_off % bs
                out.append((first, r.dev_off + r.length))
        out += [(b * bs, (b + 1) * bs) for b in host.blocks]
    return out


def build_reference(img: Path, nocsum: bool) -> Reference:
    async def main() -> Reference:
        opts = MountOptions(cache_size=8 << 20, verify_csum=not nocsum)
        async with open_stack(img, opts) as stack:
            w = Walker(stack.volume, img, op_timeout=60)
            try:
                await w.walk()
            finally:
                w.close()
            bad = {ino: v.errors for ino, v in w.seen.items() if v.errors}
            if bad:
                raise RuntimeError(f"pristine image {img} has errors: {bad}")
            fp = {ino: await _footprint(stack.volume, ino) for ino in w.seen}
            return Reference(w.seen, fp)

    return trio.run(main)


def _clean_inodes(ref: Reference, case: Case, lay: Layout) -> set[int]:
    if case.truncate is not None or any(p.at.split(":")[0] in ("sb", "gdt", "gd")
                                        for p in case.patches):
        return set()
    dmg = damaged_ranges(case, lay)
    clean = set()
    for ino, fp in ref.footprint.items():
        if not any(a < e and s < b for a, b in fp for s, e in dmg):
            clean.add(ino)
    return clean


def _compare(ino: int, got: InodeView, want: InodeView) -> str | None:
    # a failed lookup of a child is the child's damage, not this directory's
    errors = [e for e in got.errors if not e.startswith("lookup ")]
    if errors:
        return f"errors {errors}"
    if got.attr != want.attr:
        return f"attr {got.attr} != {want.attr}"
    for what in ("reads", "link", "xattrs", "names"):
        if getattr(got, what) != getattr(want, what):
            return f"{what} differ"
    return None


class _StepTimer(trio.abc.Instrument):
    """Longest single trio task step: how long one request held the event loop, in CPU time
    of this thread (wall time would also count the time other processes of a busy CI machine
    took the core away)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.what = ""
        self._t = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        dt = time.thread_time() - self._t
        if dt > self.longest:
            self.longest = dt
            self.what = task.name


class _LogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.by_msg: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        key = record.getMessage()
        self.by_msg[key] = self.by_msg.get(key, 0) + 1


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(store: ImageStore, case: Case, workdir: Path, *, op_timeout: float = 10.0,
             case_timeout: float = 60.0, mem_limit_mib: float = 64.0,
             trace_memory: bool = False, step_limit: float = 1.0) -> Outcome:
    """Build the damaged image for ``case``, mount it in-process and walk it, with every
    oracle of the module docstring. Never raises for a bug in asyncfs: it is the verdict."""
    pristine = store.image(case.preset, case.profile, case.seed)
    lay = store.layout(pristine)
    ref = store.reference(pristine, case.nocsum)
    dst = workdir / "damaged.img"
    build_damaged(pristine, lay, case, dst)
    clean = _clean_inodes(ref, case, lay)
    counter = _LogCounter()
    logger = logging.getLogger("asyncfs")
    logger.addHandler(counter)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    old_propagate = logger.propagate
    logger.propagate = False
    walker: Walker | None = None
    steps = _StepTimer()
    t0 = time.monotonic()
    peak = 0.0
    outcome: Outcome

    async def main() -> Outcome:
        nonlocal walker
        opts = MountOptions(cache_size=4 << 20, verify_csum=not case.nocsum)
        try:
            with trio.fail_after(op_timeout):
                cm = open_stack(dst, opts)
                stack = await cm.__aenter__()
        except AsyncfsError as e:
            msg = str(e)
            if not msg or "\n" in msg:
                return Outcome("message", f"mount refused with {type(e).__name__} {msg!r}")
            return Outcome("refused", f"{type(e).__name__}: {msg}")
        except trio.TooSlowError:
            return Outcome("hang", "mount took too long")
        try:
            walker = Walker(stack.volume, dst, op_timeout=op_timeout)
            await walker.walk()
            for ino in sorted(clean & walker.seen.keys()):
                diff = _compare(ino, walker.seen[ino], ref.views[ino])
                if diff is not None:
                    return Outcome("clean", f"undamaged inode {ino}: {diff}")
            return Outcome("served", inodes=len(walker.seen), errors=walker.errors)
        finally:
            with trio.move_on_after(op_timeout) as cs:
                cs.shield = True
                await cm.__aexit__(None, None, None)

    if trace_memory:
        tracemalloc.start()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with _watchdog(case_timeout):
            outcome = trio.run(main, instruments=[steps])
    except CaseFailure as e:
        outcome = Outcome(e.verdict, e.detail)
    except _Hang:
        outcome = Outcome("hang", f"no answer within {case_timeout}s (a loop that never awaits?)")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        hang = any(isinstance(x, _Hang) for x in _leaves(e))
        fails = [x for x in _leaves(e) if isinstance(x, CaseFailure)]
        if fails:
            outcome = Outcome(fails[0].verdict, fails[0].detail)
        elif hang:
            outcome = Outcome("hang", f"no answer within {case_timeout}s")
        else:
            tb = "".join(traceback.format_exception(e)[-8:])
            outcome = Outcome("crash", f"{type(e).__name__}: {e}\n{tb}")
    finally:
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        logger.removeHandler(counter)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        if walker is not None:
            walker.close()
        dst.unlink(missing_ok=True)
    outcome.seconds = time.monotonic() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024
    if not trace_memory:
        peak = grew  # the process's high-water mark rose by this much during the case
    outcome.peak_mib = peak
    outcome.log_records = counter.count
    outcome.longest_step = steps.longest
    if not outcome.failed and steps.longest > step_limit:
        outcome = dataclasses.replace(
            outcome, verdict="stall",
            detail=f"one task step held the event loop {steps.longest:.2f}s ({steps.what})")
    if counter.by_msg and not outcome.failed:
        msg, n = max(counter.by_msg.items(), key=lambda kv: kv[1])
        if n > LOG_REPEAT_LIMIT:
            outcome = dataclasses.replace(outcome, verdict="logflood",
                                          detail=f"{n}x {msg!r}")
    if not outcome.failed and peak > mem_limit_mib:
        outcome = dataclasses.replace(outcome, verdict="memory",
                                      detail=f"{'traced peak' if trace_memory else 'RSS rose'}"
                                             f" {peak:.1f} MiB > {mem_limit_mib}")
    return outcome


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        out: list[BaseException] = []
        for x in e.exceptions:
            out += _leaves(x)
        return out
    return [e, *[x for x in (e.__context__, e.__cause__) if x is not None]]


# --------------------------------------------------------------------------------------------
# corpus files
# --------------------------------------------------------------------------------------------


def load_corpus(path: Path) -> list[dict[str, Any]]:
    """Entries of a corpus file: ``{"case": {...}, "bug": "...", "xfail": "..."?}``."""
    out: list[dict[str, Any]] = []
    for p in sorted(path.glob("*.json")):
        out.append({"file": p.name, **json.loads(p.read_text())})
    return out


def save_case(path: Path, case: Case, outcome: Outcome, note: str = "") -> Path:
    """Write one failing case as a small JSON file (its name from a hash of the case)."""
    path.mkdir(parents=True, exist_ok=True)
    body = json.dumps(case.to_json(), sort_keys=True)
    name = f"{case.structure}-{hashlib.sha256(body.encode()).hexdigest()[:10]}.json"
    entry = {"case": case.to_json(), "found": f"{outcome.verdict}: {outcome.detail[:400]}",
             "note": note}
    (path / name).write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
    return path / name
