"""Where the structures of a pristine image live, found with ``debugfs`` (an independent
reader): locator -> (device offset, length), so a saved case survives new UUIDs,
checksums and layouts."""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


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


def read_region(img: Path, lay: Layout, at: str) -> bytes:
    off, length = lay.resolve(at)
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(length)
