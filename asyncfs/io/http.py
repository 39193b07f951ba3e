"""``HttpDevice``: one remote object (an HTTP(S) URL, or an S3 object through ``s3.py``) as a
read-only BlockDevice, fetched lazily with range GETs.

It owns the connection pool (one ``httpx.AsyncClient``, keep-alive, at most ``connections``
requests at once), the object's identity pinned at open (size, ETag, Last-Modified), retries
with backoff, the merging of adjacent fetches, the block store of recently fetched bytes, and
the counters behind ``asyncfs stats``' ``remote`` line.

The object is read in aligned blocks of ``BLOCK`` bytes: the unit of a fetch, of the in-memory
store and of the persistent cache (``diskcache.py``). A read looks its blocks up in memory,
then in the disk cache; the rest are fetched. A block already being fetched is not asked for
again: the reader parks on it until the fetch delivers it. Fetches wait for a connection in a
queue; when one frees, the oldest queued fetch leaves together with every queued fetch
contiguous with it (up to ``MAX_MERGE`` bytes), as one range GET. A fetch delivers its blocks
as their bytes arrive, so the readers of the first block of a long GET wake first.

Every request carries the pinned validators (``If-Match`` with a strong ETag, else
``If-Unmodified-Since``) and every response is checked again (status 206, its
``Content-Range`` against the pinned size, its ETag and Last-Modified against the pinned
ones), so a changed object fails the read with ``DeviceIOError`` (EIO) and one log line, and no
byte of a second version is ever returned. Once a change is seen, every later fetch fails the
same way; bytes of the pinned version already cached are still served.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import random
import re
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio

from asyncfs.errors import DeviceIOError, ImageError

log = logging.getLogger(__name__)

BLOCK = 64 * 1024  # fetch, memory-store and disk-cache unit
# Fetches at least this long are the page cache's readahead windows: the page cache keeps
# their bytes, so the memory store does not (a stream would flush the small blocks out).
STREAM_MIN = 512 * 1024
MAX_MERGE = 16 << 20  # one GET never asks for more than this
MEM_BYTES = 32 << 20  # the in-memory block store's bound
AROUND_MAX = 2 << 20  # the most a small miss fetches around itself
AROUND_HISTORY = 8  # recent misses a new one is compared with
READAHEAD_MIN = 32 << 20  # the smallest readahead window of a remote image (readahead_hint)
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_LATENCIES_KEPT = 2048
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)

Signer = Callable[[str, dict[str, str]], dict[str, str]]


class BlockStore(Protocol):
    """The persistent cache as the device uses it (``diskcache.DiskCache``)."""

    def get(self, index: int) -> bytes | None: ...

    def get_nowait(self, index: int) -> bytes | None: ...

    def has(self, index: int) -> bool: ...

    def put(self, index: int, data: bytes) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Identity:
    """What was pinned at open: reads are served from this version of the object only."""

    url: str
    size: int
    etag: str | None
    last_modified: str | None

    def validators(self) -> dict[str, str]:
        """Request headers that make the server refuse (412) any other version."""
        if self.etag and not self.etag.startswith("W/"):
            return {"If-Match": self.etag}
        if self.last_modified:
            return {"If-Unmodified-Since": self.last_modified}
        return {}


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, waiting ``base * 2**n`` (jittered, at most ``cap``) s."""

    attempts: int = 6
    base: float = 0.1
    cap: float = 4.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(self.cap, max(0.0, retry_after))
        return float(min(self.cap, self.base * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0))


class _Retryable(Exception):
    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class _Block:
    """A block being fetched: its readers park on ``done``."""

    __slots__ = ("data", "done", "error", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: str | None = None


class _Fetch:
    __slots__ = ("blocks", "first", "last", "stream")

    def __init__(self, blocks: list[_Block], stream: bool) -> None:
        self.blocks = blocks
        self.first = blocks[0].index
        self.last = blocks[-1].index
        self.stream = stream


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, float(when.timestamp()) - time.time())


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes A-B/N`` -> (A, B, N or None for ``*``); None when malformed or missing."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def describe_transport_error(err: BaseException) -> str:
    """One line for an httpx transport failure (refused, TLS, timeout, lost connection): the
    innermost cause says most (httpx wraps the ssl and socket errors)."""
    inner: BaseException = err
    for _ in range(8):
        nxt = inner.__cause__ or inner.__context__
        if nxt is None:
            break
        inner = nxt
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed ({inner.verify_message})"
    if isinstance(inner, ssl.SSLError):
        return f"TLS error ({inner.reason or inner})"
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({type(err).__name__})"
    if isinstance(inner, OSError) and inner.strerror:
        return f"{type(err).__name__}: {inner.strerror}"
    text = str(err) or str(inner) or type(inner).__name__
    return f"{type(err).__name__}: {text}".replace("\n", " ")


class HttpDevice:
    """The pinned object behind ``client``, read in ``BLOCK`` units (see the module doc)."""

    backend_name = "http"

    def __init__(
        self,
        client: httpx.AsyncClient | list[httpx.AsyncClient],
        identity: Identity,
        *,
        connections: int = 32,
        retry: RetryPolicy | None = None,
        sign: Signer | None = None,
        headers: dict[str, str] | None = None,
        cache: BlockStore | None = None,
        mem_bytes: int = MEM_BYTES,
        label: str | None = None,
    ) -> None:
        # Several small pools rather than one large one: httpcore's pool scans every
        # connection for every request it assigns, a cost that grows with the pool (it was the
        # largest item of the daemon's profile under many random readers); each GET goes to the
        # pool with the fewest requests in flight.
        self._clients = client if isinstance(client, list) else [client]
        self._load = [0] * len(self._clients)
        self.identity = identity
        self._size = identity.size
        self._label = label or identity.url.split("?", 1)[0]
        self._connections = max(1, connections)
        self._slots = trio.Semaphore(self._connections)
        self._retry = retry or RetryPolicy()
        self._sign = sign
        self._headers = dict(headers or {})
        self._cache = cache
        self._mem: OrderedDict[int, bytes] = OrderedDict()
        self._mem_bytes = 0
        self._mem_limit = mem_bytes
        self._around = 1  # blocks a small miss fetches (see _read_around)
        self._recent: deque[int] = deque(maxlen=AROUND_HISTORY)  # recent small misses
        self._inflight: dict[int, _Block] = {}
        self._unsaved: list[tuple[int, bytes]] = []  # fetched blocks for the disk cache
        self._saving = 0  # writes of them under way in worker threads
        self._queue: list[_Fetch] = []
        self._dispatching = False
        self._scopes: set[trio.CancelScope] = set()
        self._closed = False
        self.changed: str | None = None  # why the object no longer matches the pin
        self._down = False  # the last fetch gave up: the server is unreachable or failing
        self.backend_note: str | None = None
        # counters
        self.requests = 0
        self.requests_inflight = 0
        self.bytes_fetched = 0
        self.retries = 0
        self.failed_reads = 0
        self.merged = 0  # fetches that left with another one in the same GET
        self.mem_hits = 0
        self.disk_hits = 0
        self._latency: deque[float] = deque(maxlen=_LATENCIES_KEPT)
        self._ttfb: deque[float] = deque(maxlen=_LATENCIES_KEPT)
        self._rtt = 0.0  # smoothed time to first byte
        self._bw = 0.0  # smoothed body bytes/s of one GET

    # -- BlockDevice ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        got: dict[int, bytes] = {}
        want: list[int] = []
        for b in range(first, last + 1):
            data = self._mem_get(b)
            if data is None:
                want.append(b)
            else:
                got[b] = data
        if want and self._cache is not None:
            cache = self._cache
            found = await trio.to_thread.run_sync(
                lambda: {b: d for b in want if (d := cache.get(b)) is not None})
            self.disk_hits += len(found)
            got.update(found)
            want = [b for b in want if b not in found]
        if want:
            stream = length >= STREAM_MIN
            around = [] if stream else self._read_around(want)
            got.update(await self._fetch_blocks(want, stream=stream, around=around))
        return self._assemble(got, offset, length)

    def _read_around(self, want: list[int]) -> list[int]:
        """Blocks to fetch along with a small read's missing ``want``: the aligned group of
        ``_around`` blocks holding them, less what is cached or in flight. The group grows
        fourfold (up to ``AROUND_MAX`` bytes) while misses land near one of the last few (a
        directory walk alternates between inode tables, directory blocks and file data, each
        a cluster of its own) and falls back to one block when a miss lands near none of them
        (random reads), so locality costs fewer round trips and random reads no extra
        bandwidth."""
        b = want[0]
        reach = 2 * self._around
        if any(abs(b - r) <= reach for r in self._recent):
            self._around = min(self._around * 4, AROUND_MAX // BLOCK)
        else:
            self._around = 1
        self._recent.append(want[-1])
        n = self._around
        if n <= 1:
            return []
        start = b // n * n
        stop = min(start + n, (self._size + BLOCK - 1) // BLOCK)
        wanted = set(want)
        cache = self._cache
        return [i for i in range(start, stop)
                if i not in wanted and i not in self._mem and i not in self._inflight
                and (cache is None or not cache.has(i))]

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The bytes if every block is in memory or (without blocking) in the disk cache."""
        if self._closed or length <= 0 or offset < 0 or offset + length > self._size:
            return None
        got: dict[int, bytes] = {}
        for b in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1):
            data = self._mem_get(b)
            if data is None and self._cache is not None:
                data = self._cache.get_nowait(b)
                if data is not None:
                    self.disk_hits += 1
            if data is None:
                return None
            got[b] = data
        return self._assemble(got, offset, length)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()
        for blk in list(self._inflight.values()):
            self._fail(blk, f"{self._label}: device closed")
        self._queue.clear()
        for c in self._clients:
            await c.aclose()
        if self._cache is not None:
            # what was fetched is written before the cache closes (the next mount starts
            # warm with it); a write under way in a worker thread finishes first
            with trio.CancelScope(shield=True):
                while self._saving:
                    await trio.sleep(0.01)
                batch, self._unsaved = self._unsaved, []
                await trio.to_thread.run_sync(self._save, self._cache, batch)
            self._cache.close()

    def seed(self, index: int, data: bytes, rtt: float) -> None:
        """Keep block ``index``, fetched before the device existed (the open's probe)."""
        self._rtt = rtt
        self.requests += 1
        self.bytes_fetched += len(data)
        self._ttfb.append(rtt)
        self._mem_put(index, data)
        if self._cache is not None:
            try:
                self._cache.put(index, data)
            except OSError as err:
                log.warning("disk cache: cannot store block %d: %s", index, err)

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        lat = sorted(self._latency)
        ttfb = sorted(self._ttfb)

        def pct(xs: list[float], q: float) -> float:
            return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else 0.0

        out: dict[str, Any] = {
            "url": self._label,
            "size": self._size,
            "etag": self.identity.etag,
            "bytes_fetched": self.bytes_fetched,
            "requests": self.requests,
            "requests_inflight": self.requests_inflight,
            "retries": self.retries,
            "failed_reads": self.failed_reads,
            "merged_fetches": self.merged,
            "memory_hits": self.mem_hits,
            "disk_cache_hits": self.disk_hits,
            "latency_ms_p50": pct(lat, 0.5),
            "latency_ms_p90": pct(lat, 0.9),
            "latency_ms_p99": pct(lat, 0.99),
            "ttfb_ms_p50": pct(ttfb, 0.5),
            "object_changed": self.changed,
            "readahead_hint": self.readahead_hint,
        }
        if self._cache is not None:
            out.update({f"disk_cache_{k}": v for k, v in self._cache.stats().items()})
        return out

    @property
    def readahead_hint(self) -> int:
        """A readahead window that keeps the link busy: twice the bandwidth-delay product of
        what has been measured (one GET's body rate times the time to first byte), between
        ``READAHEAD_MIN`` and 64 MiB. The floor is there because a window's GETs share the
        link: each one's latency is its first byte plus the transfer of the window at a
        share of the link, so the bytes in flight must cover far more than one round trip
        (docs/io.md has the measurement)."""
        rtt = self._rtt or 0.001
        bw = self._bw or 100e6  # before any long GET: a 1 Gbit/s guess
        bdp = int(2 * bw * rtt)
        return max(READAHEAD_MIN, min(64 << 20, bdp))

    # -- internals --------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise DeviceIOError(f"read of {length} bytes at {offset}: {self._label} is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DeviceIOError(f"read of {length} bytes at {offset} is past the end of "
                                f"{self._label} ({self._size} bytes)")

    def _assemble(self, got: dict[int, bytes], offset: int, length: int) -> bytes:
        first = offset // BLOCK
        last = (offset + length - 1) // BLOCK
        if first == last:
            start = offset - first * BLOCK
            return got[first][start : start + length]
        joined = b"".join(got[b] for b in range(first, last + 1))
        start = offset - first * BLOCK
        if start == 0 and len(joined) == length:  # (block-aligned: the usual window read)
            return joined
        return joined[start : start + length]

    def _block_span(self, index: int) -> tuple[int, int]:
        start = index * BLOCK
        return start, min(start + BLOCK, self._size)

    def _mem_get(self, index: int) -> bytes | None:
        data = self._mem.get(index)
        if data is not None:
            self._mem.move_to_end(index)
            self.mem_hits += 1
        return data

    def _mem_put(self, index: int, data: bytes) -> None:
        if self._mem_limit <= 0 or index in self._mem:
            return
        self._mem[index] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > self._mem_limit:
            _, old = self._mem.popitem(last=False)
            self._mem_bytes -= len(old)

    async def _fetch_blocks(self, want: list[int], *, stream: bool,
                            around: list[int] | None = None) -> dict[int, bytes]:
        """Fetch (or join the fetch of) each block of ``want`` and start the fetch of the
        blocks ``around`` it; park until the ``want`` blocks are in."""
        if self.changed is not None:
            self.failed_reads += 1
            raise DeviceIOError(self.changed)
        waits: list[_Block] = []
        fresh: list[_Block] = []
        needed = set(want)
        for b in sorted(needed.union(around or ())):
            blk = self._inflight.get(b)
            if blk is None:
                blk = _Block(b)
                self._inflight[b] = blk
                if fresh and fresh[-1].index != b - 1:
                    self._queue.append(_Fetch(fresh, stream))
                    fresh = []
                fresh.append(blk)
            if b in needed:
                waits.append(blk)
        if fresh:
            self._queue.append(_Fetch(fresh, stream))
        self._kick()
        out: dict[int, bytes] = {}
        for blk in waits:
            await blk.done.wait()
            if blk.data is None:
                self.failed_reads += 1
                raise DeviceIOError(blk.error or f"{self._label}: fetch failed")
            out[blk.index] = blk.data
        return out

    def _kick(self) -> None:
        if not self._dispatching and self._queue and not self._closed:
            self._dispatching = True
            trio.lowlevel.spawn_system_task(self._dispatch, name="asyncfs-http-dispatch")

    async def _dispatch(self) -> None:
        try:
            # Readers woken in this scheduler pass queue their fetches first, so the
            # contiguous ones among them leave as one GET.
            await trio.lowlevel.checkpoint()
            while self._queue and not self._closed:
                await self._slots.acquire()
                if not self._queue or self._closed:
                    self._slots.release()
                    break
                fetch = self._take_merged()
                trio.lowlevel.spawn_system_task(self._run_fetch, fetch,
                                                name="asyncfs-http-fetch")
        finally:
            self._dispatching = False
        if self._queue and not self._closed:
            self._kick()

    def _take_merged(self) -> _Fetch:
        """The oldest queued fetch, joined by every queued fetch contiguous with it."""
        head = self._queue.pop(0)
        blocks = list(head.blocks)
        stream = head.stream
        limit = max(1, MAX_MERGE // BLOCK)
        grown = True
        while grown and len(blocks) < limit:
            grown = False
            for i, f in enumerate(self._queue):
                if len(blocks) + len(f.blocks) > limit:
                    continue
                if f.first == blocks[-1].index + 1:
                    blocks.extend(f.blocks)
                elif f.last == blocks[0].index - 1:
                    blocks[:0] = f.blocks
                else:
                    continue
                stream = stream and f.stream
                self.merged += 1
                del self._queue[i]
                grown = True
                break
        return _Fetch(blocks, stream)

    async def _run_fetch(self, fetch: _Fetch) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                await self._get_blocks(fetch)
            except DeviceIOError as err:
                for blk in fetch.blocks:
                    self._fail(blk, str(err))
            except Exception as err:  # a bug here must not leave readers parked
                log.exception("fetch of blocks %d-%d failed", fetch.first, fetch.last)
                for blk in fetch.blocks:
                    self._fail(blk, f"{type(err).__name__}: {err}")
            finally:
                self._scopes.discard(scope)
                self._slots.release()
        for blk in fetch.blocks:  # cancelled (closing): nobody may stay parked
            self._fail(blk, f"{self._label}: device closed")
        if self._unsaved and self._cache is not None and not self._closed:
            batch, self._unsaved = self._unsaved, []
            self._saving += 1
            try:
                await trio.to_thread.run_sync(self._save, self._cache, batch)
            finally:
                self._saving -= 1

    @staticmethod
    def _save(cache: BlockStore, batch: list[tuple[int, bytes]]) -> None:
        for index, data in batch:
            try:
                cache.put(index, data)
            except OSError as err:
                log.warning("disk cache: cannot store block %d: %s", index, err)
                return

    def _fail(self, blk: _Block, why: str) -> None:
        if blk.done.is_set():
            return
        blk.error = why
        if self._inflight.get(blk.index) is blk:
            del self._inflight[blk.index]
        blk.done.set()

    def _deliver(self, blk: _Block, data: bytes, stream: bool) -> None:
        if blk.done.is_set():
            return
        blk.data = data
        if self._inflight.get(blk.index) is blk:
            del self._inflight[blk.index]
        if not stream:
            self._mem_put(blk.index, data)
        if self._cache is not None:
            self._unsaved.append((blk.index, data))
        blk.done.set()

    async def _get_blocks(self, fetch: _Fetch) -> None:
        """Fetch the blocks of ``fetch``: one range GET, retried from the first block not yet
        delivered after a 5xx, a timeout or a lost connection."""
        pending = list(fetch.blocks)
        attempt = 0
        # While the server is down (the last fetch gave up), each fetch tries once: every
        # read still tries the server again, but a walk over a tree does not wait out the
        # whole backoff once per file.
        attempts = 1 if self._down else self._retry.attempts
        while pending:
            if self.changed is not None:
                raise DeviceIOError(self.changed)
            try:
                pending = await self._get_once(pending, fetch.stream)
                if self._down:
                    self._down = False
                    log.warning("%s answers again", self._label)
            except _Retryable as why:
                pending = [b for b in pending if not b.done.is_set()]
                attempt += 1
                if attempt >= attempts:
                    if not self._down:
                        self._down = True
                        log.error("%s: %s; gave up after %d attempts (until it answers "
                                  "again, each read tries it once)", self._label, why, attempt)
                    raise DeviceIOError(
                        f"{self._label}: bytes {pending[0].index * BLOCK}+: {why} "
                        f"(gave up after {attempt} attempts)") from None
                self.retries += 1
                delay = self._retry.delay(attempt, why.retry_after)
                log.info("%s: %s; retry %d in %.2fs", self._label, why, attempt, delay)
                await trio.sleep(delay)

    def _request_headers(self, start: int, end: int) -> dict[str, str]:
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        headers.update(self._headers)
        headers.update(self.identity.validators())
        if self._sign is not None:
            headers = self._sign(self.identity.url, headers)
        return headers

    def _mark_changed(self, why: str) -> DeviceIOError:
        if self.changed is None:
            self.changed = (f"{self._label} changed since it was mounted ({why}); "
                            "reads of bytes not cached fail with EIO")
            log.error("%s", self.changed)
        return DeviceIOError(self.changed)

    def _check_response(self, resp: httpx.Response, start: int, end: int) -> None:
        """Raise unless ``resp`` is the pinned version's bytes ``[start, end)``."""
        status = resp.status_code
        if status in (412, 404, 410, 416):
            raise self._mark_changed(f"the server answered {status} {resp.reason_phrase}")
        if status in _RETRY_STATUS:
            raise _Retryable(f"HTTP {status} {resp.reason_phrase}", _retry_after(resp))
        if status == 200:
            raise DeviceIOError(f"{self._label}: the server ignored the Range header "
                                "(answered 200 with the whole object)")
        if status != 206:
            raise DeviceIOError(f"{self._label}: HTTP {status} {resp.reason_phrase} for "
                                f"bytes {start}-{end - 1}")
        self._check_identity(resp)
        cr = parse_content_range(resp.headers.get("content-range"))
        if cr is None or cr[0] != start or cr[1] != end - 1:
            raise DeviceIOError(f"{self._label}: asked bytes {start}-{end - 1}, got "
                                f"Content-Range {resp.headers.get('content-range')!r}")
        if cr[2] is not None and cr[2] != self._size:
            raise self._mark_changed(f"size {self._size} -> {cr[2]}")

    def _check_identity(self, resp: httpx.Response) -> None:
        pin = self.identity
        etag = resp.headers.get("etag")
        if pin.etag is not None and etag is not None and etag != pin.etag:
            raise self._mark_changed(f"ETag {pin.etag} -> {etag}")
        modified = resp.headers.get("last-modified")
        if pin.last_modified is not None and modified is not None \
                and modified != pin.last_modified:
            raise self._mark_changed(f"Last-Modified {pin.last_modified} -> {modified}")

    async def _get_once(self, blocks: list[_Block], stream: bool) -> list[_Block]:
        """One GET for ``blocks`` (contiguous). Delivers each block as its bytes arrive;
        returns the blocks still to fetch (none on success), or raises ``_Retryable`` (after
        delivering what arrived whole) or ``DeviceIOError``."""
        start = self._block_span(blocks[0].index)[0]
        end = self._block_span(blocks[-1].index)[1]
        headers = self._request_headers(start, end)
        self.requests += 1
        self.requests_inflight += 1
        t0 = time.monotonic()
        i = 0
        parts: list[bytes] = []  # body bytes not yet delivered
        have = 0
        shard = self._load.index(min(self._load))
        self._load[shard] += 1
        try:
            async with self._clients[shard].stream("GET", self.identity.url,
                                                   headers=headers) as resp:
                ttfb = time.monotonic() - t0
                self._check_response(resp, start, end)
                need = self._block_span(blocks[0].index)
                n = need[1] - need[0]
                async for chunk in resp.aiter_raw():
                    # (chunks are kept as they come and joined once per block: a growing
                    # buffer cut at the front copied each byte three times)
                    parts.append(chunk)
                    have += len(chunk)
                    self.bytes_fetched += len(chunk)
                    while i < len(blocks) and have >= n:
                        joined = parts[0] if len(parts) == 1 else b"".join(parts)
                        if len(joined) == n:
                            parts, data = [], joined
                        else:
                            parts, data = [joined[n:]], joined[:n]
                        have -= n
                        self._deliver(blocks[i], data, stream)
                        i += 1
                        if i < len(blocks):
                            need = self._block_span(blocks[i].index)
                            n = need[1] - need[0]
                    if i == len(blocks) and have:
                        raise DeviceIOError(f"{self._label}: the server sent more than the "
                                            f"{end - start} bytes asked")
        except httpx.TransportError as err:
            raise _Retryable(describe_transport_error(err)) from None
        finally:
            self.requests_inflight -= 1
            self._load[shard] -= 1
        if i < len(blocks):
            raise _Retryable(f"connection closed after {i} of {len(blocks)} blocks")
        total = time.monotonic() - t0
        self._note_timing(ttfb, total, end - start)
        return []

    def _note_timing(self, ttfb: float, total: float, nbytes: int) -> None:
        self._latency.append(total)
        self._ttfb.append(ttfb)
        self._rtt = ttfb if not self._rtt else 0.8 * self._rtt + 0.2 * ttfb
        body = total - ttfb
        if nbytes >= STREAM_MIN and body > 0:
            rate = nbytes / body
            self._bw = rate if not self._bw else 0.8 * self._bw + 0.2 * rate


async def probe(
    client: httpx.AsyncClient, url: str, *, headers: dict[str, str], sign: Signer | None,
    retry: RetryPolicy, label: str,
) -> tuple[Identity, bytes, float]:
    """The first GET of a mount: ``bytes=0-(BLOCK-1)``, following redirects. Returns the
    pinned identity (at the final URL), the first block's bytes and the time to first byte.
    Anything that makes the object unusable is an ``ImageError`` of one line."""
    attempt = 0
    while True:
        h = {"Range": f"bytes=0-{BLOCK - 1}", "Accept-Encoding": "identity", **headers}
        if sign is not None:
            h = sign(url, h)
        t0 = time.monotonic()
        try:
            async with client.stream("GET", url, headers=h) as resp:
                rtt = time.monotonic() - t0
                status = resp.status_code
                # the body only of a 206 (or an error page): a 200 would be the whole object
                body = await resp.aread() if status != 200 and status not in _RETRY_STATUS \
                    else b""
        except httpx.TooManyRedirects:
            raise ImageError(f"{label}: redirect loop (more than "
                             f"{client.max_redirects} redirects)") from None
        except httpx.TransportError as err:
            why = describe_transport_error(err)
            if why.startswith("TLS") or isinstance(err, httpx.UnsupportedProtocol):
                raise ImageError(f"{label}: {why}") from None
            attempt += 1
            if attempt >= retry.attempts:
                raise ImageError(f"{label}: {why}") from None
            await trio.sleep(retry.delay(attempt))
            continue
        if status in _RETRY_STATUS:
            attempt += 1
            if attempt >= retry.attempts:
                raise ImageError(f"{label}: HTTP {status} {resp.reason_phrase} "
                                 f"(gave up after {attempt} attempts)")
            await trio.sleep(retry.delay(attempt, _retry_after(resp)))
            continue
        break
    if status == 200:
        raise ImageError(f"{label}: the server does not support range requests "
                         "(it answered a Range request with the whole object)")
    if status == 416:
        raise ImageError(f"{label}: the object is empty")
    if status != 206:
        raise ImageError(f"{label}: HTTP {status} {resp.reason_phrase}{_error_detail(body)}")
    cr = parse_content_range(resp.headers.get("content-range"))
    if cr is None or cr[0] != 0 or cr[2] is None:
        raise ImageError(f"{label}: the server's Content-Range "
                         f"{resp.headers.get('content-range')!r} gives no object size")
    size = cr[2]
    data = body
    if len(data) != min(BLOCK, size) or cr[1] != len(data) - 1:
        raise ImageError(f"{label}: asked the first {min(BLOCK, size)} bytes, got {len(data)}")
    ident = Identity(str(resp.url), size, resp.headers.get("etag"),
                     resp.headers.get("last-modified"))
    return ident, data, rtt


def _error_detail(body: bytes) -> str:
    """An S3-style ``<Code>`` from the error body, if there is one."""
    m = re.search(rb"<Code>([^<]{1,64})</Code>", body[:4096])
    return f" ({m.group(1).decode(errors='replace')})" if m else ""
