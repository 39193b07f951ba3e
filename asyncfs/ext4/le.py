"""Little-endian field readers shared by the on-disk structure parsers."""


def u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "little")


def u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "little")
