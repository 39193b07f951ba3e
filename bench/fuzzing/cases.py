"""Fuzz cases: a :class:`Case` is a pristine image (preset, tree profile, seed) plus
*patches*, each a locator (``inode:/files/frag``, ``extblk:/dx:ETB.0``, ...), an offset
inside the located structure and the bytes written there, or a truncation. Compact and
reproducible (JSON); :func:`generate_cases` draws forged fields, random bytes, hand-made
semantic forgeries (loops, overlaps, out-of-range pointers) and truncations."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fuzzing.layout import Layout, read_region


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


def _semantic_cases(preset: str, img: Path, lay: Layout) -> list[tuple[str, str, list[Patch]]]:
    """Hand-made forgeries: loops, overlaps, out-of-range pointers, directory cycles."""
    out: list[tuple[str, str, list[Patch]]] = []
    bs = lay.block_size
    for at in lay.kinds("extblk"):
        off, _ = lay.resolve(at)
        pblk = off // bs
        raw = read_region(img, lay, at)
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
        raw = read_region(img, lay, at)
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
        root = read_region(img, lay, "dxroot:" + at.split(":")[1])
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
        raw = read_region(img, lay, at)
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
