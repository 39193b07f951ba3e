"""The HTTP device (``asyncfs/io/http.py``) and the persistent cache (``diskcache.py``) against
a scripted object server (``httpx.MockTransport``: the test decides each answer, so 503s,
connections lost mid-body, a changed object and a busy pool happen exactly when asked). The
real servers (nginx, moto, a delay proxy) are in ``tests/mount/test_remote.py``.

Invariant tests run against the real code and against a deliberately broken variant named in
their docstring (``tests.mutants.breaks``: the source with one rule removed), which must fail them.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io import diskcache as diskcache_mod
from asyncfs.io import http as http_mod
from asyncfs.io.diskcache import DiskCache
from asyncfs.io.http import BLOCK, HttpDevice, RetryPolicy, probe
from tests.mutants import breaks

VARIANTS = ["kernel", "broken"]
SIZE = 40 * BLOCK + 1234  # a short last block
URL = "http://objects.test/disk.img"
FAST = RetryPolicy(attempts=5, base=0.001, cap=0.01)


class _Body(httpx.AsyncByteStream):
    """A body sent in 16 KiB pieces that, with ``keep``, stops with a lost connection after
    that many bytes."""

    def __init__(self, body: bytes, keep: int | None = None) -> None:
        self.body = body
        self.keep = keep

    async def __aiter__(self) -> AsyncIterator[bytes]:
        end = len(self.body) if self.keep is None else self.keep
        for i in range(0, end, 16384):
            yield self.body[i : min(end, i + 16384)]
        if self.keep is not None:
            raise httpx.ReadError("connection reset by peer")


class ObjectServer:
    """One object behind range GETs, with knobs for what goes wrong."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.etag = '"v1"'
        self.modified = "Mon, 07 Dec 2026 10:00:00 GMT"
        self.honour_validators = True
        self.send_etag = True
        self.ignore_range = False
        self.fail: list[int] = []  # statuses to answer next, in order
        self.cut: list[int] = []  # bodies to cut after this many bytes, in order
        self.ranges: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None  # requests wait for it while set

    def change(self, data: bytes, etag: str = '"v2"') -> None:
        self.data, self.etag = data, etag

    async def handler(self, req: httpx.Request) -> httpx.Response:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            return httpx.Response(self.fail.pop(0), headers={"Retry-After": "0"})
        im = req.headers.get("if-match")
        if self.honour_validators and im is not None and im != self.etag:
            return httpx.Response(412)
        headers = {"Last-Modified": self.modified}
        if self.send_etag:
            headers["ETag"] = self.etag
        rng = req.headers.get("range")
        if self.ignore_range or rng is None:
            return httpx.Response(200, headers=headers, stream=_Body(self.data))
        a, b = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        b = min(b, len(self.data) - 1)
        self.ranges.append((a, b + 1))
        body = self.data[a : b + 1]
        headers["Content-Range"] = f"bytes {a}-{b}/{len(self.data)}"
        keep = self.cut.pop(0) if self.cut else None
        return httpx.Response(206, headers=headers, stream=_Body(body, keep))


def data_of(seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(SIZE)


async def open_dev(srv: ObjectServer, *, connections: int = 8, cache: DiskCache | None = None,
                   cache_dir: Path | None = None, retry: RetryPolicy = FAST) -> HttpDevice:
    client = httpx.AsyncClient(transport=httpx.MockTransport(srv.handler),
                               follow_redirects=True, max_redirects=5)
    ident, first, rtt = await http_mod.probe(client, URL, headers={}, sign=None, retry=retry,
                                             label=URL)
    if cache_dir is not None:
        cache = DiskCache(cache_dir, ident.url, ident.etag, ident.last_modified, ident.size,
                          BLOCK, 1 << 30)
    dev = HttpDevice(client, ident, connections=connections, retry=retry, cache=cache,
                     label=URL)
    dev.seed(0, first, rtt)
    return dev


async def test_reads_equal_the_object_at_any_offset() -> None:
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv)
    rng = random.Random(3)
    try:
        assert dev.size == SIZE
        for _ in range(60):
            off = rng.randrange(SIZE)
            n = rng.randrange(1, min(SIZE - off, 5 * BLOCK) + 1)
            assert await dev.read(off, n) == data[off : off + n]
        assert await dev.read(SIZE - 7, 7) == data[-7:]
        with pytest.raises(DeviceIOError, match="past the end"):
            await dev.read(SIZE - 1, 2)
    finally:
        await dev.aclose()


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_changed_object_fails_reads_never_mixes_versions(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is replaced under the mount by a server that ignores If-Match: reads of
    blocks fetched before still give the old bytes, any other read fails with DeviceIOError,
    and no byte of the new version is ever returned.

    Broken variant: ``_check_identity`` not comparing the response's ETag with the pinned
    one (new bytes are returned)."""
    breaks(variant, monkeypatch, HttpDevice, "_check_identity",
           "if pin.etag is not None and etag is not None and etag != pin.etag:", "if False:")
    old = data_of(1)
    new = data_of(2)
    srv = ObjectServer(old)
    srv.honour_validators = False
    dev = await open_dev(srv)
    try:
        assert await dev.read(0, 3 * BLOCK) == old[: 3 * BLOCK]
        srv.change(new)
        seen_new = failed = 0
        for blk in range(3, 12):
            try:
                got = await dev.read(blk * BLOCK, BLOCK)
            except DeviceIOError:
                failed += 1
                continue
            seen_new += got != old[blk * BLOCK : (blk + 1) * BLOCK]
        assert await dev.read(BLOCK, 100) == old[BLOCK : BLOCK + 100]  # cached: old version
    finally:
        await dev.aclose()
    right = seen_new == 0 and failed == 9 and dev.changed is not None and '"v2"' in dev.changed
    assert right == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_requests_carry_the_pinned_etag(variant: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GET carries ``If-Match`` with the pinned ETag, so a server that sends no ETag
    on its answers still refuses (412) bytes of another version.

    Broken variant: ``validators`` sending no header."""
    breaks(variant, monkeypatch, http_mod.Identity, "validators",
           "return {\"If-Match\": self.etag}", "return {}")
    old, new = data_of(1), data_of(2)
    srv = ObjectServer(old)
    dev = await open_dev(srv)
    srv.send_etag = False
    srv.modified = "Tue, 08 Dec 2026 10:00:00 GMT"
    dev.identity = http_mod.Identity(dev.identity.url, SIZE, dev.identity.etag, None)
    srv.change(new)
    try:
        got: bytes | str = await dev.read(5 * BLOCK, 10)
    except DeviceIOError as err:
        got = str(err)
    finally:
        await dev.aclose()
    right = isinstance(got, str) and "changed since it was mounted" in got
    assert right == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_5xx_is_retried_with_backoff(variant: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """503, 502 and 500 in a row, then the bytes: the read succeeds after three retries.

    Broken variant: ``_check_response`` not treating 5xx as retryable (the read fails)."""
    breaks(variant, monkeypatch, HttpDevice, "_check_response",
           "if status in _RETRY_STATUS:", "if False:")
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv)
    try:
        srv.fail = [503, 502, 500]
        right = (await dev.read(7 * BLOCK + 5, 2 * BLOCK) == data[7 * BLOCK + 5 : 9 * BLOCK + 5]
                 and dev.retries == 3)
    except DeviceIOError:
        right = False
    finally:
        await dev.aclose()
    assert right == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_giving_up_fails_the_read_then_later_reads_try_once(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that exhausts its attempts fails its read; while the server stays down each
    later fetch tries once (a walk over many files does not wait out the backoff per file);
    the first answer ends that, and the bytes are right.

    Broken variant: ``_get_blocks`` giving every fetch its full attempts while down."""
    breaks(variant, monkeypatch, HttpDevice, "_get_blocks",
           "attempts = 1 if self._down else self._retry.attempts",
           "attempts = self._retry.attempts")
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv)
    try:
        srv.fail = [503] * FAST.attempts
        with pytest.raises(DeviceIOError, match="gave up after 5 attempts"):
            await dev.read(9 * BLOCK, 10)
        assert dev.retries == FAST.attempts - 1
        srv.fail = [503] * 3
        tried = len(srv.fail)
        try:
            await dev.read(20 * BLOCK, 10)
            once = False
        except DeviceIOError:
            once = tried - len(srv.fail) == 1
        srv.fail = []
        assert await dev.read(9 * BLOCK, 10) == data[9 * BLOCK : 9 * BLOCK + 10]
        assert not dev._down
    finally:
        await dev.aclose()
    assert once == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_lost_connection_resumes_after_the_blocks_delivered(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET of 6 blocks loses its connection 2.5 blocks into the body: the two whole blocks
    are delivered, the retry asks for the other four only, and the read is exact.

    Broken variant: the retry asking for every block again (``pending`` not trimmed)."""
    breaks(variant, monkeypatch, HttpDevice, "_get_blocks",
           "pending = [b for b in pending if not b.done.is_set()]", "pass")
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv)
    try:
        srv.cut = [2 * BLOCK + BLOCK // 2]
        got = await dev.read(10 * BLOCK, 6 * BLOCK)
    finally:
        await dev.aclose()
    assert got == data[10 * BLOCK : 16 * BLOCK]
    right = srv.ranges[-2:] == [(10 * BLOCK, 16 * BLOCK), (12 * BLOCK, 16 * BLOCK)]
    assert right == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_readers_of_a_block_in_flight_park_on_its_fetch(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty readers of one block while it is being fetched: one GET, all get the bytes.

    Broken variant: ``_fetch_blocks`` not looking for the fetch in flight."""
    breaks(variant, monkeypatch, HttpDevice, "_fetch_blocks",
           "blk = self._inflight.get(b)", "blk = None")
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv, connections=32)
    got: list[bytes] = []
    try:
        srv.gate = trio.Event()
        before = len(srv.ranges)

        async def reader(i: int) -> None:
            got.append(await dev.read(20 * BLOCK + i, 100))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(reader, i)
            await trio.testing.wait_all_tasks_blocked()
            srv.gate.set()
    finally:
        await dev.aclose()
    assert sorted(got) == sorted(data[20 * BLOCK + i : 20 * BLOCK + i + 100] for i in range(20))
    assert (len(srv.ranges) - before == 1) == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_adjacent_fetches_waiting_for_a_connection_leave_as_one_get(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connection, busy: eight reads of adjacent blocks queue behind it and then go out as
    one range GET.

    Broken variant: ``_take_merged`` not merging."""
    breaks(variant, monkeypatch, HttpDevice, "_take_merged",
           "grown = True\n    while", "grown = False\n    while")
    monkeypatch.setattr(http_mod, "AROUND_MAX", BLOCK)  # (no read-around: only the merge)
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv, connections=1)
    out: dict[int, bytes] = {}
    try:
        srv.gate = trio.Event()
        before = len(srv.ranges)

        async def reader(blk: int) -> None:
            out[blk] = await dev.read(blk * BLOCK, BLOCK)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 30)  # takes the connection
            await trio.testing.wait_all_tasks_blocked()
            for blk in (13, 11, 14, 12, 17, 15, 16, 18):
                nursery.start_soon(reader, blk)
            await trio.testing.wait_all_tasks_blocked()
            srv.gate.set()
    finally:
        await dev.aclose()
    for blk, got in out.items():
        assert got == data[blk * BLOCK : (blk + 1) * BLOCK]
    right = (srv.ranges[before:] == [(30 * BLOCK, 31 * BLOCK), (11 * BLOCK, 19 * BLOCK)]
             and dev.merged == 7)
    assert right == (variant == "kernel")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_server_without_range_support_is_refused(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 to the first Range request is refused in one line, before the whole object is
    read. Broken variant: ``probe`` accepting the 200."""
    breaks(variant, monkeypatch, http_mod, "probe", "if status == 200:", "if False:")
    srv = ObjectServer(data_of())
    srv.ignore_range = True
    try:
        await open_dev(srv)
        why = ""
    except ImageError as err:
        why = str(err)
    assert ("does not support range requests" in why) == (variant == "kernel")


async def test_a_redirect_loop_is_refused_in_one_line() -> None:
    def loop(req: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "/a" if req.url.path == "/b" else "/b"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(loop), follow_redirects=True,
                               max_redirects=5)
    with pytest.raises(ImageError, match="redirect loop") as err:
        await probe(client, URL, headers={}, sign=None, retry=FAST, label=URL)
    assert "\n" not in str(err.value)
    await client.aclose()


async def test_the_probe_retries_then_pins_size_etag_and_date() -> None:
    srv = ObjectServer(data_of())
    srv.fail = [503, 503]
    dev = await open_dev(srv)
    try:
        assert (dev.identity.size, dev.identity.etag) == (SIZE, '"v1"')
        assert dev.identity.last_modified == srv.modified
        assert dev.identity.validators() == {"If-Match": '"v1"'}
        weak = http_mod.Identity(URL, 1, 'W/"x"', srv.modified)
        assert weak.validators() == {"If-Unmodified-Since": srv.modified}
    finally:
        await dev.aclose()


@pytest.mark.parametrize("variant", VARIANTS)
async def test_disk_cache_starts_warm_and_drops_a_corrupt_block(
    variant: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A second device over the same cache directory reads everything without a GET; a
    block changed on disk fails its checksum, the object's cache is dropped and the block
    fetched again, so the bytes stay exact.

    Broken variant: ``_verify`` not checking the CRC (the corrupt byte is returned)."""
    breaks(variant, monkeypatch, DiskCache, "_verify",
           "if len(data) != want or crc32c.crc32c(data) != crc:", "if len(data) != want:")
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv, cache_dir=tmp_path)
    try:
        assert await dev.read(0, SIZE) == data
    finally:
        await dev.aclose()
    dev = await open_dev(srv, cache_dir=tmp_path)
    before = len(srv.ranges)
    try:
        assert await dev.read(0, SIZE) == data
        assert len(srv.ranges) == before
    finally:
        await dev.aclose()
    (obj,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    with open(obj / "data", "r+b") as f:
        f.seek(5 * BLOCK + 17)
        f.write(bytes([data[5 * BLOCK + 17] ^ 0xFF]))
    dev = await open_dev(srv, cache_dir=tmp_path)
    try:
        got = await dev.read(5 * BLOCK, BLOCK)
        stats = dev.stats()
    finally:
        await dev.aclose()
    right = got == data[5 * BLOCK : 6 * BLOCK] and stats["disk_cache_corrupt"] == 1
    assert right == (variant == "kernel")


async def test_disk_cache_keys_by_identity_and_drops_a_stale_directory(tmp_path: Path) -> None:
    """A new ETag is a new directory (the old bytes are never found); a directory whose
    meta.json does not match its identity is emptied; a cache in use by another mount is
    not shared."""
    args: tuple[Any, ...] = (URL + "?X-Amz-Signature=1", '"v1"', None, SIZE, BLOCK, 1 << 30)
    a = DiskCache(tmp_path, *args)
    a.put(3, b"x" * BLOCK)
    with pytest.raises(BlockingIOError):
        DiskCache(tmp_path, *args)
    a.close()
    same = DiskCache(tmp_path, URL + "?X-Amz-Signature=2", '"v1"', None, SIZE, BLOCK, 1 << 30)
    assert same.get(3) == b"x" * BLOCK  # the query (a signature) is not the identity
    same.close()
    other = DiskCache(tmp_path, URL, '"v2"', None, SIZE, BLOCK, 1 << 30)
    assert other.dir != a.dir and other.get(3) is None
    other.close()
    meta = a.dir / "meta.json"
    meta.write_text(meta.read_text().replace(str(SIZE), str(SIZE + 1)))
    again = DiskCache(tmp_path, *args)
    assert again.get(3) is None and again.dropped == 1
    again.close()


async def test_disk_cache_stays_within_its_bound(tmp_path: Path) -> None:
    small = 8 * BLOCK
    old = DiskCache(tmp_path, URL + "/old", '"o"', None, SIZE, BLOCK, small)
    for i in range(6):
        old.put(i, bytes(BLOCK))
    old.close()
    new = DiskCache(tmp_path, URL, '"n"', None, SIZE, BLOCK, small)
    for i in range(20):
        new.put(i, bytes(BLOCK))
    assert new.stored == 8 and not old.dir.exists()  # the old object was evicted for room
    new.close()
    assert diskcache_mod.cache_key(URL, '"n"', None, SIZE) == new.dir.name


async def test_small_misses_read_around_only_where_misses_cluster() -> None:
    """Small misses near each other (a directory walk) fetch a growing aligned group of
    blocks (four times larger at each, up to AROUND_MAX), served from memory after; misses
    far apart (random reads) fetch their own block only."""
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv)
    try:
        before = len(srv.ranges)
        for blk in (4, 5, 6, 8):
            assert await dev.read(blk * BLOCK + 100, 200) == data[blk * BLOCK + 100 :
                                                                 blk * BLOCK + 300]
        near = srv.ranges[before:]
        hits = dev.mem_hits
        assert await dev.read(9 * BLOCK, 10) == data[9 * BLOCK : 9 * BLOCK + 10]
        assert dev.mem_hits == hits + 1  # read around before it was asked
    finally:
        await dev.aclose()
    dev = await open_dev(srv)
    try:
        before = len(srv.ranges)
        for blk in (30, 1, 20, 36):
            await dev.read(blk * BLOCK, 10)
        far = srv.ranges[before:]
    finally:
        await dev.aclose()
    # 4 alone; 5 near it: the group of 4 blocks (6 and 7 then hit); 8 near 5: the group of
    # 16 (block 0 is the probe's), as two runs
    assert near == [(4 * BLOCK, 5 * BLOCK), (5 * BLOCK, 8 * BLOCK), (1 * BLOCK, 4 * BLOCK),
                    (8 * BLOCK, 16 * BLOCK)]
    assert far == [(b * BLOCK, (b + 1) * BLOCK) for b in (30, 1, 20, 36)]


async def test_readahead_hint_follows_the_bandwidth_delay_product() -> None:
    dev = await open_dev(ObjectServer(data_of()))
    try:
        dev._rtt, dev._bw = 0.001, 100e6
        assert dev.readahead_hint == http_mod.READAHEAD_MIN
        dev._rtt, dev._bw = 0.1, 250e6  # 25 MB in flight: a 50 MB window
        assert dev.readahead_hint == 50_000_000
        dev._rtt = 2.0
        assert dev.readahead_hint == 64 << 20
    finally:
        await dev.aclose()


async def test_stats_count_requests_bytes_retries_and_latency() -> None:
    data = data_of()
    srv = ObjectServer(data)
    dev = await open_dev(srv)
    try:
        srv.fail = [503]
        await dev.read(BLOCK, 4 * BLOCK)
        s = dev.stats()
    finally:
        await dev.aclose()
    assert s["requests"] == 3 and s["retries"] == 1 and s["requests_inflight"] == 0
    assert s["bytes_fetched"] == 5 * BLOCK
    assert s["latency_ms_p50"] >= 0 and s["url"] == URL and s["object_changed"] is None


def test_remote_mount_options() -> None:
    from asyncfs.cli.options import parse_options
    from asyncfs.errors import UsageError

    opts = parse_options(["cafile=/etc/ca.pem,insecure,header=X-Trace: 1",
                          "header=Authorization: Bearer abc,endpoint=http://127.0.0.1:9000",
                          "cache_dir=/var/cache/a,cache_dir_size=1G,connections=8,retries=3"])
    r = opts.remote
    assert (r.cafile, r.insecure, r.endpoint, r.cache_dir) == (
        "/etc/ca.pem", True, "http://127.0.0.1:9000", "/var/cache/a")
    assert r.headers == [("X-Trace", "1"), ("Authorization", "Bearer abc")]
    assert (r.cache_dir_size, r.connections, r.retries) == (1 << 30, 8, 3)
    for bad in ("header=NoColon", "header=Bad Name: x", "connections=0", "retries=0",
                "insecure=1", "cafile="):
        with pytest.raises(UsageError):
            parse_options([bad])
    name = "disk.img?X-Amz-Signature=abc"  # (what the daemon passes for a presigned URL)
    assert "fsname=asyncfs:disk.img" in opts.fuse_options(name)
    assert "fsname=asyncfs:disk.img" in opts.fuse_options("https://u:p@h/d/disk.img?x=1")
