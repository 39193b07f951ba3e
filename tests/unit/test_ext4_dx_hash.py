"""ext4fs_dirhash against e2fsprogs (debugfs dx_hash) and against real htree images."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncfs.errors import AsyncfsError, CorruptionError, NotSupportedError
from asyncfs.ext4 import dx_hash
from asyncfs.ext4.dx_hash import (
    DX_HASH_HALF_MD4,
    DX_HASH_LEGACY,
    DX_HASH_LEGACY_UNSIGNED,
    DX_HASH_SIPHASH,
    DX_HASH_TEA,
    DX_HASH_TEA_UNSIGNED,
    ext4fs_dirhash,
)
from tests.mutants import breaks
from tests.unit.volume_walk import fails_unless_kernel

VARIANTS = ["kernel", "broken"]

_HASH_LINE = re.compile(rb"Hash of .* is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)")

# bytes debugfs's command-line parser passes through unchanged inside one argument
_SAFE = bytes(b for b in range(0x21, 0x100) if b not in b"\"\\#'")


def debugfs_hashes(
    tmp: Path, queries: list[tuple[bytes, int, bytes]]
) -> list[tuple[int, int]]:
    """Reference hashes for (name, version, 16-byte seed) via one ``debugfs -f`` run."""
    script = b""
    for name, version, seed in queries:
        opt = b"" if not any(seed) else b" -s " + str(uuid.UUID(bytes=seed)).encode()
        script += b"dx_hash -h %d%s %s\n" % (version, opt, name)
    path = tmp / "dx_hash.debugfs"
    path.write_bytes(script)
    out = subprocess.run(
        ["debugfs", "-f", str(path), "/dev/null"], capture_output=True, check=True
    ).stdout
    found = [(int(a, 16), int(b, 16)) for a, b in _HASH_LINE.findall(out)]
    assert len(found) == len(queries), out[-500:]
    return found


def seed_words(seed: bytes) -> tuple[int, int, int, int]:
    a, b, c, d = struct.unpack("<4I", seed)
    return a, b, c, d


@pytest.mark.parametrize("variant", VARIANTS)
def test_known_vectors(tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed names (ASCII, high bytes, every length class around the 16/32-byte blocks).

    Broken variant: str2hashbuf padding with zeros instead of the length pattern changes
    every half-MD4/TEA hash of a name whose length is not a multiple of 4."""
    breaks(variant, monkeypatch, dx_hash, "_str2hashbuf", "pad = (pad | (pad << 16)) & _M",
           "pad = 0")
    names = [b"a", b"hello", b"." * 15, b"x" * 16, b"y" * 17, b"z" * 31, b"q" * 32, b"w" * 33,
             b"n\xe9\xff", bytes(range(0x80, 0xFF)), b"k" * 255]
    seeds = [bytes(16), uuid.UUID("5574ee30-e0c1-44d4-916f-0beeba886e88").bytes]
    queries = [(n, v, s) for n in names for v in range(6) for s in seeds]
    ref = debugfs_hashes(tmp_path, queries)
    with fails_unless_kernel(variant):
        for (n, v, s), want in zip(queries, ref, strict=True):
            assert ext4fs_dirhash(n, v, seed_words(s)) == want, (n, v, s)


@pytest.mark.parametrize("variant", VARIANTS)
def test_signedness_matters(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """High bytes hash differently signed vs unsigned; pure ASCII does not.

    Broken variant: treating bytes as unsigned in the signed versions makes 0 == 3."""
    breaks(variant, monkeypatch, dx_hash, "_byte_values", "if signed:", "if False:")
    for signed, unsigned in ((0, 3), (1, 4), (2, 5)):
        assert ext4fs_dirhash(b"abc", signed) == ext4fs_dirhash(b"abc", unsigned)
        with fails_unless_kernel(variant):
            assert ext4fs_dirhash(b"\xe9t\xe9", signed) != ext4fs_dirhash(b"\xe9t\xe9", unsigned)


def test_zero_seed_is_default() -> None:
    """An all-zero s_hash_seed means the default vector; any non-zero word replaces it."""
    assert ext4fs_dirhash(b"n", DX_HASH_TEA, (0, 0, 0, 0)) == ext4fs_dirhash(b"n", DX_HASH_TEA)
    assert ext4fs_dirhash(b"n", DX_HASH_TEA, (0, 0, 0, 1)) != ext4fs_dirhash(b"n", DX_HASH_TEA)


def test_major_is_even_and_never_eof() -> None:
    for v in range(6):
        for i in range(300):
            major, _ = ext4fs_dirhash(b"%d" % i, v)
            assert major % 2 == 0
            assert major != 0xFFFFFFFE


def test_bad_versions() -> None:
    with pytest.raises(NotSupportedError):
        ext4fs_dirhash(b"a", DX_HASH_SIPHASH)
    with pytest.raises(CorruptionError):
        ext4fs_dirhash(b"a", 7)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(st.binary(min_size=1, max_size=255).map(
        lambda b: bytes(_SAFE[x % len(_SAFE)] for x in b).replace(b"-", b"_", 1)),
        min_size=1, max_size=10),
    seed=st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16)),
)
def test_random_names_match_debugfs(tmp_path: Path, names: list[bytes], seed: bytes) -> None:
    """Random names of every length, random seeds, all six versions, against debugfs."""
    queries = [(n, v, seed) for n in names for v in range(6)]
    ref = debugfs_hashes(tmp_path, queries)
    for (n, v, s), want in zip(queries, ref, strict=True):
        assert ext4fs_dirhash(n, v, seed_words(s)) == want, (n, v)


@given(name=st.binary(max_size=300), version=st.integers(-5, 300),
       seed=st.tuples(*[st.integers(0, 2**32 - 1)] * 4))
def test_arbitrary_input_raises_only_project_errors(
    name: bytes, version: int, seed: tuple[int, int, int, int]
) -> None:
    try:
        major, minor = ext4fs_dirhash(name, version, seed)
    except AsyncfsError:
        return
    assert 0 <= major < 2**32 and 0 <= minor < 2**32


_LEAF = re.compile(rb"(\d+) 0x([0-9a-f]{8})-([0-9a-f]{8}) \((\d+)\) (\S+)")
_INDEX = re.compile(rb"Entry #\d+: Hash 0x([0-9a-f]{8}), block (\d+)")


@pytest.mark.parametrize(
    ("alg", "flags", "version", "variant"),
    [("legacy", 1, DX_HASH_LEGACY, "kernel"), ("legacy", 2, DX_HASH_LEGACY_UNSIGNED, "kernel"),
     ("half_md4", 1, DX_HASH_HALF_MD4, "kernel"), ("half_md4", 2, 4, "kernel"),
     ("tea", 1, DX_HASH_TEA, "kernel"), ("tea", 2, DX_HASH_TEA_UNSIGNED, "kernel"),
     ("tea", 2, DX_HASH_TEA_UNSIGNED, "broken")],
)
def test_real_htree_placement(
    tmp_path: Path, alg: str, flags: int, version: int, variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Build an htree (e2fsck -D) with the given hash and signedness over names with high
    bytes; every name must sit in the leaf block whose on-disk index range covers our hash.

    Broken variant: ignoring the unsigned flag (version - 3) misplaces names in the
    *_unsigned cases."""
    breaks(variant, monkeypatch, dx_hash, "ext4fs_dirhash", "buf = list(_DEFAULT_SEED)\n",
           "buf = list(_DEFAULT_SEED)\n    hash_version -= 3 if 3 <= hash_version <= 5 else 0\n")
    if variant != "kernel":  # this module calls it by the name it imported
        monkeypatch.setitem(globals(), "ext4fs_dirhash", dx_hash.ext4fs_dirhash)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    names = [b"n\xe9\xff%d" % i for i in range(150)] + [b"plain%d" % i for i in range(150)]
    for n in names:
        open(os.path.join(os.fsencode(src / "d"), n), "wb").close()
    img = tmp_path / "img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", "-d", str(src), str(img),
                    "8M"], check=True, capture_output=True)
    subprocess.run(["tune2fs", "-E", f"hash_alg={alg}", str(img)], check=True,
                   capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", f"ssv flags {flags}", str(img)], check=True,
                   capture_output=True)
    subprocess.run(["e2fsck", "-fyD", str(img)], capture_output=True)
    seed_line = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True,
                               check=True).stdout
    m = re.search(rb"Directory Hash Seed:\s+(\S+)", seed_line)
    assert m is not None
    seed = seed_words(uuid.UUID(m.group(1).decode()).bytes)
    out = subprocess.run(["debugfs", "-R", "htree d", str(img)], capture_output=True,
                         check=True).stdout
    assert b"Hash Version: %d" % (version % 3) in out
    index = [(int(h, 16), int(b)) for h, b in _INDEX.findall(out.split(b"\n\n")[0])]
    assert len(index) >= 2
    seen = 0
    blocks = re.split(rb"Reading directory block (\d+), phys \d+\n", out)
    with fails_unless_kernel(variant):
        for blk_s, body in zip(blocks[1::2], blocks[2::2], strict=True):
            blk = int(blk_s)
            lo = max(h for h, b in index if b == blk)
            higher = [h for h, b in index if h > lo]
            hi = min(higher) if higher else 2**32
            for _ino, hh, mm, _rl, name in _LEAF.findall(body):
                major, minor = ext4fs_dirhash(name, version, seed)
                assert (major, minor) == (int(hh, 16), int(mm, 16)), name
                assert lo <= major < hi + 1, (name, hex(major), hex(lo), hex(hi))
                seen += 1
        assert seen == len(names)
