"""The NBD wire protocol, as far as a read-only client needs it: the NBD URIs, the fixed-newstyle
handshake messages (``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_GO``, ``NBD_OPT_EXPORT_NAME``), and
requests and replies (simple and structured) of the transmission phase.

Pure encoding and decoding; ``nbd.py`` owns the sockets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from asyncfs.errors import ImageError

DEFAULT_PORT = 10809
INIT_MAGIC = b"NBDMAGIC"
OPT_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_OPT_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_UNKNOWN = REP_ERR | 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_DISC = 2

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR_BIT = 1 << 15

# Without a block-size reply, the protocol promises requests up to 32 MiB are accepted.
DEFAULT_MAX_REQUEST = 32 << 20

OPT_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY_REST = struct.Struct(">IQ")  # error, cookie (after the magic)
STRUCTURED_REPLY_REST = struct.Struct(">HHQI")  # flags, type, cookie, length (after magic)

_ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
                75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}


class ProtocolError(Exception):
    """The server said something the protocol does not allow: the connection is dropped."""


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an NBD export is: a unix socket path, or a TCP host and port; and its name."""

    export: str
    socket: str | None = None
    host: str = ""
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://",
                            "nbd+tcp://"))


def parse_uri(uri: str) -> NbdAddress:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``; ImageError with a
    one-line reason for anything else."""
    u = urlsplit(uri)
    if u.scheme in ("nbds", "nbds+unix"):
        raise ImageError(f"{uri}: NBD over TLS (nbds) is not supported")
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = parse_qs(u.query)
    if u.scheme == "nbd+unix":
        if u.netloc:
            raise ImageError(f"{uri}: an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=)")
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise ImageError(f"{uri}: nbd+unix needs ?socket=PATH")
        return NbdAddress(export, socket=sockets[0])
    if u.scheme not in ("nbd", "nbd+tcp"):
        raise ImageError(f"{uri}: not an NBD URI")
    try:
        port = u.port or DEFAULT_PORT
    except ValueError:
        raise ImageError(f"{uri}: bad port") from None
    if not u.hostname:
        raise ImageError(f"{uri}: no host (nbd://HOST[:PORT]/EXPORT)")
    return NbdAddress(export, host=u.hostname, port=port)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", OPT_MAGIC, opt, len(data)) + data


def go_option(export: str) -> bytes:
    name = export.encode()
    return option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1,
                                                                             INFO_BLOCK_SIZE))


def request(cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length)


@dataclass(slots=True)
class ExportInfo:
    """What ``NBD_OPT_GO`` (or ``NBD_OPT_EXPORT_NAME``) told about the export."""

    size: int = -1
    flags: int = 0
    min_block: int = 1
    max_block: int = DEFAULT_MAX_REQUEST


def apply_info(info: ExportInfo, data: bytes) -> None:
    """Fold one ``NBD_REP_INFO`` payload into ``info`` (unknown kinds are ignored)."""
    if len(data) < 2:
        raise ProtocolError("short NBD_REP_INFO")
    kind = struct.unpack_from(">H", data)[0]
    if kind == INFO_EXPORT:
        if len(data) < 12:
            raise ProtocolError("short NBD_INFO_EXPORT")
        info.size, info.flags = struct.unpack_from(">QH", data, 2)
    elif kind == INFO_BLOCK_SIZE and len(data) >= 14:
        mn, _pref, mx = struct.unpack_from(">III", data, 2)
        if mn and mn & (mn - 1) == 0 and mn <= 65536:
            info.min_block = mn
        if mx >= max(mn, 512):
            info.max_block = min(mx, DEFAULT_MAX_REQUEST)


def rep_error_text(rep: int, data: bytes) -> str:
    """A one-line reading of an error reply to an option."""
    names = {1: "unsupported", 2: "refused by policy", 3: "invalid", 4: "unsupported on this "
             "platform", 5: "TLS required", 6: "unknown export", 7: "server shutting down",
             8: "block size required", 9: "too big"}
    text = names.get(rep & ~REP_ERR, f"error {rep:#x}")
    msg = data.decode("utf-8", "replace").strip()
    return f"{text}: {msg}" if msg else text


def errno_text(err: int) -> str:
    return _ERRNO_NAMES.get(err, f"error {err}")
