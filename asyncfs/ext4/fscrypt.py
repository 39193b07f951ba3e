"""Names of encrypted files as the kernel shows them without the key (fs/crypto/fname.c).

A directory entry of an encrypted directory holds ciphertext. Without the key the kernel
presents each name as the base64url encoding (no padding) of ``struct fscrypt_nokey_name``:
the entry's directory hash (major, minor; zeros outside hashed readdir), then the ciphertext
(up to 149 bytes), and for longer ciphertexts the SHA-256 of the rest. Encrypted symlinks
store ``le16 length`` + ciphertext and read back as the same encoding with a zero hash.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from asyncfs.errors import CorruptionError

NOKEY_BYTES = 149
NOKEY_NAME_MAX = 8 + NOKEY_BYTES + 32


def nokey_name(cipher: bytes, major: int = 0, minor: int = 0) -> bytes:
    """The no-key presentation of one encrypted name."""
    head = struct.pack("<II", major & 0xFFFFFFFF, minor & 0xFFFFFFFF)
    if len(cipher) <= NOKEY_BYTES:
        raw = head + cipher
    else:
        raw = head + cipher[:NOKEY_BYTES] + hashlib.sha256(cipher[NOKEY_BYTES:]).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def is_dot_or_dotdot(name: bytes) -> bool:
    return name in (b".", b"..")


def symlink_target(data: bytes, max_size: int) -> bytes:
    """The no-key target of an encrypted symlink whose stored bytes are ``data``."""
    if len(data) < 2:
        raise CorruptionError("encrypted symlink too short")
    (length,) = struct.unpack_from("<H", data, 0)
    if length == 0 or length + 2 > max_size or length + 2 > len(data):
        raise CorruptionError(f"encrypted symlink length {length} is invalid")
    out = nokey_name(bytes(data[2 : 2 + length]))
    if not out or out[0] == 0:
        raise CorruptionError("encrypted symlink is empty")
    return out
