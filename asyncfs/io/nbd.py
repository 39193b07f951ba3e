"""``NbdDevice``: an NBD export as a read-only BlockDevice, over one trio socket.

It owns the connection: the handshake (fixed newstyle, ``NBD_OPT_GO``, structured replies where
the server offers them), a receiver system task that matches replies to requests by cookie, and
reconnection. Many reads are in flight at once on the one connection: each reader sends its
request and parks on its own event until the receiver has put the reply's bytes straight into
the reader's buffer.

When the connection is lost (the server restarted, a reset, no reply for ``reply_timeout``
seconds) every read in flight is retried on a new connection, made as soon as the server
answers again, for up to ``reconnect_window`` seconds. After that the reads fail with one line
(``DeviceIOError``: EIO in the mount), and each later read tries the server once more, so a
mount recovers if it comes back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import struct

import trio

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io import nbdproto as p
from asyncfs.io.nbdproto import NbdAddress, ProtocolError, is_nbd_uri, parse_uri

log = logging.getLogger(__name__)

__all__ = ["NbdDevice", "is_nbd_uri"]

CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 30.0
RECONNECT_WINDOW = 15.0
_RX_BUF = 256 * 1024


class _Lost(Exception):
    """The connection went away; the read may be retried on a new one."""


class _Pending:
    __slots__ = ("buf", "done", "error", "length", "offset")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.buf = bytearray(length)  # zeros: holes in structured replies need no write
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Conn:
    """One established connection in the transmission phase."""

    def __init__(self, sock: trio.socket.SocketType, structured: bool, addr: str,
                 reply_timeout: float) -> None:
        self.sock = sock
        self.structured = structured
        self.addr = addr
        self.pending: dict[int, _Pending] = {}
        self.send_lock = trio.Lock()
        self.dead: BaseException | None = None
        self.rx = bytearray(_RX_BUF)
        self.lo = self.hi = 0
        self.reply_timeout = reply_timeout
        self.scope = trio.CancelScope()
        self.out: list[bytes] = []  # requests not yet written
        self.flushing = False

    # -- receiving -------------------------------------------------------------------------

    async def _fill(self, n: int) -> None:
        """Make at least ``n`` bytes available in ``rx[lo:hi]``."""
        if self.hi - self.lo >= n:
            return
        if self.lo:
            self.rx[: self.hi - self.lo] = self.rx[self.lo:self.hi]
            self.hi -= self.lo
            self.lo = 0
        if len(self.rx) < n:
            self.rx.extend(bytes(n - len(self.rx)))
        while self.hi < n:
            with memoryview(self.rx)[self.hi:] as view:
                got = await self.sock.recv_into(view)
            if not got:
                raise _Lost("the server closed the connection")
            self.hi += got

    async def take(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self.rx[self.lo:self.lo + n])
        self.lo += n
        return out

    async def take_into(self, view: memoryview) -> None:
        """Fill ``view`` from the stream: buffered bytes first, then straight from the socket."""
        have = min(len(view), self.hi - self.lo)
        view[:have] = self.rx[self.lo:self.lo + have]
        self.lo += have
        pos = have
        while pos < len(view):
            got = await self.sock.recv_into(view[pos:])
            if not got:
                raise _Lost("the server closed the connection")
            pos += got

    async def skip(self, n: int) -> None:
        while n:
            k = min(n, len(self.rx))
            await self.take(k)
            n -= k

    async def receive_loop(self) -> None:
        """Deliver replies until the connection fails; then fail everything pending."""
        err: BaseException
        try:
            with self.scope:
                while True:
                    await self._one_reply()
                    self._arm()
            err = _Lost(f"no reply from {self.addr} for {self.reply_timeout:g} s")
        except Exception as e:
            # Whatever the server sent, this task must not die with it (a system task's error
            # would end the whole daemon): the connection is dropped and its reads retried.
            err = e if isinstance(e, _Lost) else _Lost(str(e) or type(e).__name__)
        self.fail(err)

    def _arm(self) -> None:
        """A deadline for the next reply only while requests wait for one."""
        self.scope.deadline = (trio.current_time() + self.reply_timeout if self.pending
                               else math.inf)

    async def _one_reply(self) -> None:
        magic = struct.unpack(">I", await self.take(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = p.SIMPLE_REPLY_REST.unpack(await self.take(12))
            req = self.pending.pop(cookie, None)
            if req is None:
                raise ProtocolError(f"reply to unknown request {cookie}")
            if error:
                req.error = DeviceIOError(f"NBD read of {req.length} bytes at {req.offset} "
                                          f"failed: {p.errno_text(error)}")
            else:
                with memoryview(req.buf) as view:
                    await self.take_into(view)
            req.done.set()
            return
        if magic != p.STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic {magic:#x}")
        flags, kind, cookie, length = p.STRUCTURED_REPLY_REST.unpack(await self.take(16))
        req = self.pending.get(cookie)
        if req is None:
            raise ProtocolError(f"reply to unknown request {cookie}")
        if kind != p.REPLY_TYPE_OFFSET_DATA and length > 1 << 20:
            raise ProtocolError(f"reply chunk of type {kind} is {length} bytes long")
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            if length < 8:
                raise ProtocolError("short NBD_REPLY_TYPE_OFFSET_DATA")
            off = struct.unpack(">Q", await self.take(8))[0] - req.offset
            n = length - 8
            if off < 0 or off + n > req.length:
                raise ProtocolError("data chunk outside the request")
            with memoryview(req.buf) as view:
                await self.take_into(view[off:off + n])
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            if length != 12:
                raise ProtocolError("bad NBD_REPLY_TYPE_OFFSET_HOLE")
            off, n = struct.unpack(">QI", await self.take(12))
            off -= req.offset
            if off < 0 or off + n > req.length:
                raise ProtocolError("hole chunk outside the request")
            # the buffer started as zeros and each byte is sent at most once
        elif kind & p.REPLY_TYPE_ERROR_BIT:
            body = await self.take(length)
            err = struct.unpack_from(">I", body)[0] if len(body) >= 4 else 5
            mlen = struct.unpack_from(">H", body, 4)[0] if len(body) >= 6 else 0
            msg = body[6:6 + mlen].decode("utf-8", "replace")
            req.error = DeviceIOError(f"NBD read of {req.length} bytes at {req.offset} failed: "
                                      f"{p.errno_text(err)}{': ' + msg if msg else ''}")
        else:
            await self.skip(length)
        if flags & p.REPLY_FLAG_DONE:
            del self.pending[cookie]
            req.done.set()

    # -- sending ---------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        async with self.send_lock:
            while view:
                sent = await self.sock.send(view)
                view = view[sent:]

    async def send_request(self, data: bytes) -> None:
        """Queue one request; the first reader of a scheduler pass sends all queued ones in one
        write (each write wakes the server: one per request cost most of a cold read's CPU)."""
        self.out.append(data)
        if self.flushing:
            return
        self.flushing = True
        try:
            await trio.lowlevel.checkpoint()
            while self.out and self.dead is None:
                batch = b"".join(self.out)
                self.out.clear()
                await self.send(batch)
        finally:
            self.flushing = False

    def fail(self, err: BaseException) -> None:
        if self.dead is None:
            self.dead = err
        self.scope.cancel()
        for req in self.pending.values():
            req.error = _Lost(str(err))
            req.done.set()
        self.pending.clear()
        self.sock.close()


class NbdDevice:
    """An NBD export, read-only. ``connect`` does the handshake; reads may run concurrently."""

    backend_name = "nbd"

    def __init__(self, addr: NbdAddress, uri: str, *, reconnect_window: float,
                 reply_timeout: float) -> None:
        self.addr = addr
        self.path = uri
        self.backend_note: str | None = None
        self._size = 0
        self._min_block = 1
        self._max_block = p.DEFAULT_MAX_REQUEST
        self._conn: _Conn | None = None
        self._connect_lock = trio.Lock()
        self._cookies = itertools.count(1)
        self._closed = False
        self._gone: str | None = None  # why the last reconnect window ran out
        self.reconnect_window = reconnect_window
        self.reply_timeout = reply_timeout
        self.reconnects = 0
        self.retried = 0

    @classmethod
    async def connect(cls, uri: str, *, reconnect_window: float = RECONNECT_WINDOW,
                      reply_timeout: float = REPLY_TIMEOUT) -> NbdDevice:
        """Connect to ``uri`` and negotiate the export; ImageError (one line) on failure."""
        dev = cls(parse_uri(uri), uri, reconnect_window=reconnect_window,
                  reply_timeout=reply_timeout)
        try:
            dev._conn = await dev._handshake(first=True)
        except (OSError, _Lost, ProtocolError, trio.TooSlowError) as err:
            raise ImageError(f"{uri}: cannot connect to the NBD server: {_why(err)}") from None
        return dev

    @property
    def size(self) -> int:
        return self._size

    async def _open_socket(self) -> trio.socket.SocketType:
        a = self.addr
        if a.socket is not None:
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            try:
                await sock.connect(a.socket)
            except BaseException:
                sock.close()
                raise
            return sock
        infos = await trio.socket.getaddrinfo(a.host, a.port, type=trio.socket.SOCK_STREAM)
        last: OSError = OSError(f"no address for {a.host}")
        for family, kind, proto, _, sa in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                await sock.connect(sa)
            except OSError as err:
                sock.close()
                last = err
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            return sock
        raise last

    async def _handshake(self, *, first: bool) -> _Conn:
        with trio.fail_after(CONNECT_TIMEOUT):
            sock = await self._open_socket()
            conn = _Conn(sock, False, str(self.addr), self.reply_timeout)
            try:
                info = await self._negotiate(conn)
            except BaseException:
                sock.close()
                raise
        if first:
            self._size = info.size
            self._min_block = info.min_block
            self._max_block = max(info.min_block, info.max_block // info.min_block
                                  * info.min_block)
        elif info.size != self._size:
            sock.close()
            raise ProtocolError(f"the export's size changed from {self._size} to {info.size}")
        conn.scope.deadline = math.inf
        trio.lowlevel.spawn_system_task(conn.receive_loop, name="asyncfs-nbd-rx")
        return conn

    async def _negotiate(self, conn: _Conn) -> p.ExportInfo:
        if await conn.take(8) != p.INIT_MAGIC:
            raise ProtocolError("not an NBD server (no NBDMAGIC)")
        magic = struct.unpack(">Q", await conn.take(8))[0]
        if magic == p.OLDSTYLE_MAGIC:
            raise ProtocolError("oldstyle NBD servers are not supported")
        if magic != p.OPT_MAGIC:
            raise ProtocolError(f"bad NBD handshake magic {magic:#x}")
        sflags = struct.unpack(">H", await conn.take(2))[0]
        if not sflags & p.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("the server does not speak fixed newstyle NBD")
        cflags = p.FLAG_FIXED_NEWSTYLE | (sflags & p.FLAG_NO_ZEROES)
        await conn.send(struct.pack(">I", cflags))
        await conn.send(p.option(p.OPT_STRUCTURED_REPLY))
        rep, data = await self._opt_reply(conn, p.OPT_STRUCTURED_REPLY)
        conn.structured = rep == p.REP_ACK
        await conn.send(p.go_option(self.addr.export))
        info = p.ExportInfo()
        while True:
            rep, data = await self._opt_reply(conn, p.OPT_GO)
            if rep == p.REP_INFO:
                p.apply_info(info, data)
            elif rep == p.REP_ACK:
                break
            elif rep == p.REP_ERR_UNSUP:
                return await self._export_name(conn, sflags)
            elif rep & p.REP_ERR:
                with contextlib.suppress(OSError):
                    await conn.send(p.option(p.OPT_ABORT))  # a polite goodbye
                raise ImageError(f"{self.path}: the NBD server refused export "
                                 f"{self.addr.export!r}: {p.rep_error_text(rep, data)}")
        if info.size < 0:
            raise ProtocolError("the server sent no export size")
        return info

    async def _export_name(self, conn: _Conn, sflags: int) -> p.ExportInfo:
        """The pre-``NBD_OPT_GO`` way in, for servers that do not know it."""
        name = self.addr.export.encode()
        await conn.send(p.option(p.OPT_EXPORT_NAME, name))
        size, flags = struct.unpack(">QH", await conn.take(10))
        if not sflags & p.FLAG_NO_ZEROES:
            await conn.take(124)
        conn.structured = False
        return p.ExportInfo(size=size, flags=flags)

    async def _opt_reply(self, conn: _Conn, opt: int) -> tuple[int, bytes]:
        magic, got_opt, rep, length = p.OPT_REPLY_HEADER.unpack(await conn.take(20))
        if magic != p.REPLY_OPT_MAGIC or got_opt != opt:
            raise ProtocolError("bad option reply")
        if length > 1 << 20:
            raise ProtocolError("option reply too long")
        return rep, await conn.take(length)

    # -- reads -----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self._closed:
            raise DeviceIOError(f"read of {length} bytes at {offset}: {self.path} is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DeviceIOError(f"read of {length} bytes at {offset} is past the end of "
                                f"{self.path} ({self._size} bytes)")
        mb = self._min_block
        lo = offset // mb * mb
        hi = min(self._size, -(-(offset + length) // mb) * mb)
        if hi - lo <= self._max_block:
            buf = await self._request(lo, hi - lo)
            return buf if lo == offset and hi - lo == length else \
                memoryview(buf)[offset - lo:offset - lo + length]
        out = bytearray()
        pos = lo
        while pos < hi:
            n = min(self._max_block, hi - pos)
            out += await self._request(pos, n)
            pos += n
        return memoryview(out)[offset - lo:offset - lo + length]

    async def _request(self, offset: int, length: int) -> bytearray:
        deadline: float | None = None
        while True:
            try:
                conn = await self._connection()
            except (OSError, _Lost, ProtocolError, trio.TooSlowError, ImageError) as err:
                if self._gone is not None or self._closed:
                    raise DeviceIOError(f"{self.path}: the NBD server is gone: "
                                        f"{self._gone or _why(err)}") from None
                now = trio.current_time()
                deadline = deadline or now + self.reconnect_window
                if now >= deadline:
                    self._gone = _why(err)
                    raise DeviceIOError(f"{self.path}: the NBD server is gone: "
                                        f"{self._gone}") from None
                await trio.sleep(min(0.2, deadline - now))
                continue
            req = _Pending(offset, length)
            cookie = next(self._cookies)
            conn.pending[cookie] = req
            if len(conn.pending) == 1:
                conn._arm()
            try:
                await conn.send_request(p.request(p.CMD_READ, cookie, offset, length))
            except OSError as err:
                conn.fail(_Lost(str(err)))
            # A cancelled reader leaves its entry: the reply still arrives and is dropped.
            await req.done.wait()
            if req.error is None:
                return req.buf
            if not isinstance(req.error, _Lost):
                raise req.error
            self.retried += 1
            log.info("%s: connection lost (%s); retrying the read", self.path, req.error)

    async def _connection(self) -> _Conn:
        """The live connection, or a new one (one reconnect at a time, shared by all)."""
        conn = self._conn
        if conn is not None and conn.dead is None:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.dead is None:
                return conn
            if self._closed:
                raise _Lost("closed")
            new = await self._handshake(first=False)
            self._conn = new
            self.reconnects += 1
            if self._gone is not None:
                log.warning("%s: the NBD server is back", self.path)
            self._gone = None
            return new

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return None

    async def aclose(self) -> None:
        self._closed = True
        conn = self._conn
        self._conn = None
        if conn is not None and conn.dead is None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(OSError):
                    await conn.send(p.request(p.CMD_DISC, 0, 0, 0))
            conn.fail(_Lost("closed"))


def _why(err: BaseException) -> str:
    if isinstance(err, trio.TooSlowError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
