"""The corpus itself: every preset builds, the kernel sees the source tree in it, and the
comparers find planted differences."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from asyncfs.testing import imagegen as imagegen_mod
from asyncfs.testing.imagegen import (
    ALL_FIELDS,
    PRESETS,
    SMALL_INODE_PRESETS,
    SOURCE_FIELDS,
    compare_statfs,
    compare_trees,
    image_info,
    make_image,
    make_tree,
)
from tests.imagegen import corpus_image, kernel_mount
from tests.mutants import breaks

# the kernel reference mount, device nodes and foreign owners all need root
pytestmark = pytest.mark.root

_FEATURE_CHECKS = {
    "ext2": ("!has_journal", "!extent"),
    "ext3": ("has_journal", "!extent"),
    "ext4": ("extent", "metadata_csum", "64bit", "flex_bg"),
    "ext4-128inode": ("extent",),
    "inline_data": ("inline_data",),
    "bigalloc": ("bigalloc",),
    "meta_bg": ("meta_bg", "!resize_inode"),
    "no_dir_index": ("!dir_index",),
    "ext4-old": ("!metadata_csum", "!64bit", "!flex_bg", "extent"),
    "csum_seed": ("metadata_csum_seed",),
    "gdt_csum": ("uninit_bg", "!metadata_csum"),
}


def _debugfs(img: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(img)], capture_output=True,
                          check=True).stdout.decode("utf-8", "replace")


@pytest.mark.parametrize(("variant", "preset"), [
    *[("kernel", p) for p in sorted(PRESETS)], ("no_time_rewrite", "ext4")])
def test_preset_matches_source_in_kernel(
    variant: str, preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each preset's image, mounted by the kernel, shows the source tree: names, modes,
    owners, sizes, rdev, mtimes (ns, pre-1970, post-2038), contents, link targets, xattrs.

    Broken variant: skipping make_image's timestamp rewrite leaves mtime_ns differences on
    every inode (built for ext4, from the corpus tree into a fresh image)."""
    src, img = corpus_image(preset)
    if variant != "kernel":
        breaks(variant, monkeypatch, imagegen_mod, "make_image",
               '_set_times(src, img, int(image_info(img)["Inode size"]))', "pass")
        img = imagegen_mod.make_image(src, tmp_path / "broken.img", preset)
    info = image_info(img)
    features = info["Filesystem features"].split()
    for want in _FEATURE_CHECKS.get(preset, ()):
        if want.startswith("!"):
            assert want[1:] not in features, (preset, features)
        else:
            assert want in features, (preset, features)
    assert (int(info["Inode size"]) == 128) == (preset in SMALL_INODE_PRESETS)
    with kernel_mount(img) as mnt:
        diffs = compare_trees(src, mnt, fields=SOURCE_FIELDS,
                              small_inodes=preset in SMALL_INODE_PRESETS)
        assert (diffs == []) == (variant == "kernel"), diffs[:5]
        assert len(os.listdir(mnt / "bigdir")) == 300


@pytest.mark.parametrize("preset", ["ext4", "ext4-1k", "hash-tea", "ext2-1k"])
def test_structure_is_really_there(preset: str) -> None:
    """The things the decoder tests rely on exist in the image, not just in the source:
    htree directories, a deep extent tree (1 KiB blocks), a shared xattr block, the
    new-encoding device number, in-inode nanoseconds."""
    _src, img = corpus_image(preset)
    stat_big = _debugfs(img, "stat bigdir")
    flags = int(re.search(r"Flags: (0x[0-9a-f]+)", stat_big).group(1), 16)  # type: ignore[union-attr]
    assert flags & 0x1000, "bigdir has no htree index"
    if "extent" in image_info(img)["Filesystem features"] and preset.endswith("1k"):
        ex = _debugfs(img, "ex sparse/fragmented")
        depth = int(re.search(r"\d+/\s*(\d+)", ex).group(1))  # type: ignore[union-attr]
        assert depth >= 2
    a1 = re.search(r"File ACL: (\d+)", _debugfs(img, "stat xattr/shared1"))
    a2 = re.search(r"File ACL: (\d+)", _debugfs(img, "stat xattr/shared2"))
    assert a1 and a2 and a1.group(1) == a2.group(1) != "0"
    assert "Device major/minor number: 4095:1048575" in _debugfs(img, "stat special/blk_max")


@pytest.mark.parametrize("variant", ["kernel", "names_only"])
def test_tree_is_deterministic_and_compare_finds_plants(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two trees from one seed compare equal; each planted difference is reported.

    Broken variant: a compare_trees that only compares names misses every plant but the
    removed file."""
    breaks(variant, monkeypatch, imagegen_mod, "compare_trees",
           "f = set(fields)", "f: set[str] = set()")
    compare_trees = imagegen_mod.compare_trees
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, "small", seed=3)
    make_tree(b, "small", seed=3)
    fields = SOURCE_FIELDS - {"atime"}
    assert compare_trees(a, b, fields=fields) == []
    big = b / "files" / "big"
    data = bytearray(big.read_bytes())
    data[1000] ^= 1
    st = os.stat(big)
    big.write_bytes(bytes(data))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time: content only
    os.chmod(b / "modes" / "f0640", 0o644)
    os.setxattr(b / "xattr" / "small", "user.planted", b"x")
    os.unlink(b / "links" / "rel")
    os.symlink("elsewhere", b / "links" / "rel")
    os.utime(b / "links" / "rel", ns=(0, os.lstat(a / "links" / "rel").st_mtime_ns),
             follow_symlinks=False)
    os.unlink(next(p for p in sorted((b / "bigdir").iterdir()) if p.is_file()))
    t = os.stat(b / "times" / "ns").st_mtime_ns
    os.utime(b / "times" / "ns", ns=(t, t + 1))
    os.chown(b / "owners" / "u1000_g1000", 1000, 1001)
    diffs = compare_trees(a, b, fields=fields)
    text = "\n".join(diffs)
    for needle in ("files/big: content", "modes/f0640: mode", "xattr/small: xattrs",
                   "links/rel: link", "bigdir: only in a", "times/ns: mtime_ns",
                   "owners/u1000_g1000: gid"):
        names = needle.endswith("only in a")
        assert (needle in text) == (variant == "kernel" or names), (needle, text)


def test_small_inode_time_rule() -> None:
    """small_inodes compares times as a 128-byte inode stores them (s32 seconds, no ns):
    the 128-byte preset differs from the source without it and matches with it."""
    src, img = corpus_image("ext4-128inode")
    with kernel_mount(img) as mnt:
        strict = compare_trees(src, mnt, fields={"mtime"})
        assert any("times/y2100: mtime_ns" in d for d in strict)
        assert compare_trees(src, mnt, fields={"mtime"}, small_inodes=True) == []


def test_statfs_compare(tmp_path: Path) -> None:
    """Same image twice: no statfs difference; another block size: differences."""
    _src, img = corpus_image("ext4")
    _src, img1k = corpus_image("ext4-1k")
    with kernel_mount(img) as m1, kernel_mount(img) as m2:
        assert compare_statfs(m1, m2) == []
    with kernel_mount(img) as m1, kernel_mount(img1k) as m2:
        assert any("f_bsize" in d for d in compare_statfs(m1, m2))


def test_explicit_size_and_bad_preset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    img = make_image(src, tmp_path / "img", "ext4", size="4M")
    assert img.stat().st_size == 4 << 20
    with pytest.raises(KeyError):
        make_image(src, tmp_path / "img2", "no-such-preset")


def test_two_kernel_mounts_equal_in_every_field() -> None:
    """ALL_FIELDS (ino, blocks, ctime, atime, directory sizes and link counts included) is
    usable between two views of one image: two loop mounts of it compare equal."""
    _src, img = corpus_image("ext4")
    with kernel_mount(img) as m1, kernel_mount(img) as m2:
        assert compare_trees(m1, m2, fields=ALL_FIELDS, check_atime=True) == []
        # and the source differs in exactly the fields SOURCE_FIELDS leaves out
        diffs = compare_trees(_src, m1, fields=ALL_FIELDS - SOURCE_FIELDS)
        assert any(": ino " in d for d in diffs) and any(": ctime_ns " in d for d in diffs)
