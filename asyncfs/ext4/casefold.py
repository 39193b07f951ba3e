"""Casefolded directory names (the casefold feature, encoding utf8-12.1).

The kernel compares and hashes names in a casefolded directory by their "NFD + full case
fold" form (utf8_casefold with the nfdicf tables). Python's unicodedata gives the same form for
everything but code points that changed after Unicode 12.1. A name that is not valid UTF-8 has
no folded form and is compared byte for byte, as the kernel does outside strict mode.
"""

from __future__ import annotations

import unicodedata

from asyncfs.errors import UnsupportedFeatureError

EXT4_ENC_UTF8_12_1 = 1
ENCODING_NAMES = {EXT4_ENC_UTF8_12_1: "utf8-12.1"}


def check_encoding(s_encoding: int) -> None:
    """Refuse a casefold filesystem whose encoding is not one the kernel knows."""
    if s_encoding not in ENCODING_NAMES:
        raise UnsupportedFeatureError(f"unsupported casefold encoding {s_encoding}")


def casefold(name: bytes) -> bytes | None:
    """The folded form of ``name`` (UTF-8 bytes), or None if ``name`` is not valid UTF-8."""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    folded = unicodedata.normalize("NFD", unicodedata.normalize("NFD", text).casefold())
    return folded.encode("utf-8")


def names_match(disk: bytes, name: bytes) -> bool:
    """ext4_match in a casefolded directory."""
    if disk == name:
        return True
    a, b = casefold(disk), casefold(name)
    return a is not None and a == b
