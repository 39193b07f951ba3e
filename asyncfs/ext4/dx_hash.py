"""Directory-index (htree) name hashes, bit for bit as the kernel's fs/ext4/hash.c.

``ext4fs_dirhash(name, hash_version, seed)`` returns ``(major, minor)``: the major hash is what
dx_root/dx_node entries are sorted by (always even: bit 0 is the htree collision marker), the
minor breaks ties for 64-bit readdir cookies.

Versions (``s_def_hash_version`` / ``dx_root_info.hash_version``): legacy (0), half-MD4 (1),
TEA (2), and their ``*_UNSIGNED`` twins (3, 4, 5). A volume whose superblock has
EXT2_FLAGS_UNSIGNED_HASH uses ``version + 3``: the only difference is whether name bytes are
sign-extended (x86 ``char``) or not before being mixed in. SipHash (6, casefold+encryption) is
not implemented: it raises NotSupportedError.

``seed`` is ``s_hash_seed`` as four little-endian u32 words; all zeros (or None) selects the
default MD4 initial vector, as the kernel does.
"""

from __future__ import annotations

from ..errors import CorruptionError, NotSupportedError

DX_HASH_LEGACY = 0
DX_HASH_HALF_MD4 = 1
DX_HASH_TEA = 2
DX_HASH_LEGACY_UNSIGNED = 3
DX_HASH_HALF_MD4_UNSIGNED = 4
DX_HASH_TEA_UNSIGNED = 5
DX_HASH_SIPHASH = 6

EXT4_HTREE_EOF_32BIT = 0x7FFFFFFF

_M = 0xFFFFFFFF
_DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_TEA_DELTA = 0x9E3779B9
_TEA_SUMS = tuple((_TEA_DELTA * i) & _M for i in range(1, 17))  # the 16 round sums
_K2 = 0o13240474631  # sqrt(2) and sqrt(3) in the MD4 round constants
_K3 = 0o15666365641


def _byte_values(name: bytes, signed: bool) -> list[int]:
    # `(int) *scp` on a signed char: bytes >= 0x80 count as negative numbers
    if signed:
        return [b - 256 if b >= 0x80 else b for b in name]
    return list(name)


def _dx_hack_hash(name: bytes, signed: bool) -> int:
    hash0, hash1 = 0x12A3FE2D, 0x37ABE8F9
    for c in _byte_values(name, signed):
        h = (hash1 + (hash0 ^ ((c * 7152373) & _M))) & _M
        if h & 0x80000000:
            h = (h - 0x7FFFFFFF) & _M
        hash1, hash0 = hash0, h
    return (hash0 << 1) & _M


def _str2hashbuf(msg: bytes, num: int, signed: bool) -> list[int]:
    """Pack up to ``num * 4`` bytes of ``msg`` into ``num`` words, padded with the length."""
    length = len(msg)
    pad = (length | (length << 8)) & _M
    pad = (pad | (pad << 16)) & _M
    out: list[int] = []
    val = pad
    chars = _byte_values(msg[: num * 4], signed)
    for i, c in enumerate(chars):
        val = (c + (val << 8)) & _M
        if i % 4 == 3:
            out.append(val)
            val = pad
    if len(out) < num:
        out.append(val)
    while len(out) < num:
        out.append(pad)
    return out


def _half_md4_transform(buf: list[int], x: list[int]) -> None:
    """Three MD4 rounds of 8 steps over 8 words (the "half" MD4), unrolled for speed:
    this runs once per 32 name bytes on every htree lookup."""
    a, b, c, d = buf
    x0, x1, x2, x3, x4, x5, x6, x7 = x
    m = _M

    # Round 1: F(x, y, z) = z ^ (x & (y ^ z)), no constant
    t = (a + (d ^ (b & (c ^ d))) + x0) & m
    a = ((t << 3) | (t >> 29)) & m
    t = (d + (c ^ (a & (b ^ c))) + x1) & m
    d = ((t << 7) | (t >> 25)) & m
    t = (c + (b ^ (d & (a ^ b))) + x2) & m
    c = ((t << 11) | (t >> 21)) & m
    t = (b + (a ^ (c & (d ^ a))) + x3) & m
    b = ((t << 19) | (t >> 13)) & m
    t = (a + (d ^ (b & (c ^ d))) + x4) & m
    a = ((t << 3) | (t >> 29)) & m
    t = (d + (c ^ (a & (b ^ c))) + x5) & m
    d = ((t << 7) | (t >> 25)) & m
    t = (c + (b ^ (d & (a ^ b))) + x6) & m
    c = ((t << 11) | (t >> 21)) & m
    t = (b + (a ^ (c & (d ^ a))) + x7) & m
    b = ((t << 19) | (t >> 13)) & m

    # Round 2: G(x, y, z) = (x & y) + ((x ^ y) & z), constant K2
    k = _K2
    t = (a + ((b & c) + ((b ^ c) & d)) + x1 + k) & m
    a = ((t << 3) | (t >> 29)) & m
    t = (d + ((a & b) + ((a ^ b) & c)) + x3 + k) & m
    d = ((t << 5) | (t >> 27)) & m
    t = (c + ((d & a) + ((d ^ a) & b)) + x5 + k) & m
    c = ((t << 9) | (t >> 23)) & m
    t = (b + ((c & d) + ((c ^ d) & a)) + x7 + k) & m
    b = ((t << 13) | (t >> 19)) & m
    t = (a + ((b & c) + ((b ^ c) & d)) + x0 + k) & m
    a = ((t << 3) | (t >> 29)) & m
    t = (d + ((a & b) + ((a ^ b) & c)) + x2 + k) & m
    d = ((t << 5) | (t >> 27)) & m
    t = (c + ((d & a) + ((d ^ a) & b)) + x4 + k) & m
    c = ((t << 9) | (t >> 23)) & m
    t = (b + ((c & d) + ((c ^ d) & a)) + x6 + k) & m
    b = ((t << 13) | (t >> 19)) & m

    # Round 3: H(x, y, z) = x ^ y ^ z, constant K3
    k = _K3
    t = (a + (b ^ c ^ d) + x3 + k) & m
    a = ((t << 3) | (t >> 29)) & m
    t = (d + (a ^ b ^ c) + x7 + k) & m
    d = ((t << 9) | (t >> 23)) & m
    t = (c + (d ^ a ^ b) + x2 + k) & m
    c = ((t << 11) | (t >> 21)) & m
    t = (b + (c ^ d ^ a) + x6 + k) & m
    b = ((t << 15) | (t >> 17)) & m
    t = (a + (b ^ c ^ d) + x1 + k) & m
    a = ((t << 3) | (t >> 29)) & m
    t = (d + (a ^ b ^ c) + x5 + k) & m
    d = ((t << 9) | (t >> 23)) & m
    t = (c + (d ^ a ^ b) + x0 + k) & m
    c = ((t << 11) | (t >> 21)) & m
    t = (b + (c ^ d ^ a) + x4 + k) & m
    b = ((t << 15) | (t >> 17)) & m

    buf[0] = (buf[0] + a) & m
    buf[1] = (buf[1] + b) & m
    buf[2] = (buf[2] + c) & m
    buf[3] = (buf[3] + d) & m


def _tea_transform(buf: list[int], x: list[int]) -> None:
    m = _M
    b0, b1 = buf[0], buf[1]
    a, b, c, d = x
    for total in _TEA_SUMS:
        b0 = (b0 + ((((b1 << 4) + a) ^ (b1 + total) ^ ((b1 >> 5) + b)) & m)) & m
        b1 = (b1 + ((((b0 << 4) + c) ^ (b0 + total) ^ ((b0 >> 5) + d)) & m)) & m
    buf[0] = (buf[0] + b0) & m
    buf[1] = (buf[1] + b1) & m


def ext4fs_dirhash(
    name: bytes, hash_version: int, seed: tuple[int, int, int, int] | None = None
) -> tuple[int, int]:
    """``(major_hash, minor_hash)`` of ``name`` as ext4fs_dirhash() computes them.

    Raises NotSupportedError for SipHash and CorruptionError for an unknown version (the
    version comes from disk).
    """
    buf = list(_DEFAULT_SEED)
    if seed is not None and any(seed):
        buf = [w & _M for w in seed]
    minor = 0
    if hash_version in (DX_HASH_LEGACY, DX_HASH_LEGACY_UNSIGNED):
        major = _dx_hack_hash(name, signed=hash_version == DX_HASH_LEGACY)
    elif hash_version in (DX_HASH_HALF_MD4, DX_HASH_HALF_MD4_UNSIGNED):
        signed = hash_version == DX_HASH_HALF_MD4
        for off in range(0, len(name), 32):
            _half_md4_transform(buf, _str2hashbuf(name[off:], 8, signed))
        major, minor = buf[1], buf[2]
    elif hash_version in (DX_HASH_TEA, DX_HASH_TEA_UNSIGNED):
        signed = hash_version == DX_HASH_TEA
        for off in range(0, len(name), 16):
            _tea_transform(buf, _str2hashbuf(name[off:], 4, signed))
        major, minor = buf[0], buf[1]
    elif hash_version == DX_HASH_SIPHASH:
        raise NotSupportedError("ext4 SipHash directory hash (casefold+encryption) not supported")
    else:
        raise CorruptionError(f"unknown ext4 directory hash version {hash_version}")
    major &= ~1 & _M
    if major == (EXT4_HTREE_EOF_32BIT << 1) & _M:
        # the all-ones hash is reserved as the readdir end-of-directory cookie
        major = (EXT4_HTREE_EOF_32BIT - 1) << 1
    return major, minor
