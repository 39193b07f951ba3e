"""``open_remote``: a URL (``http://``, ``https://``, ``s3://``) and the remote options ->
the object as a BlockDevice (``HttpDevice``), pinned, its first block read.

It owns what is shared by every remote scheme: the HTTP client (TLS verification, ``cafile``,
``insecure``, extra headers, netrc, timeouts and the pool's size), the S3 dispatch
(``s3.resolve``, in a worker thread), and the persistent cache (``diskcache.DiskCache``) set up
once the object's identity is known. ``open_image`` calls it and puts the format and window
layers on top, as for any other transport.
"""

from __future__ import annotations

import logging
import netrc
import os
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from asyncfs.errors import ImageError

if TYPE_CHECKING:  # (imported when a remote image is opened: the CLI starts faster)
    import httpx

    from asyncfs.io.diskcache import DiskCache
    from asyncfs.io.http import HttpDevice, Signer

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "s3")
MAX_REDIRECTS = 10


def is_remote_url(path: str) -> bool:
    return urllib.parse.urlsplit(path).scheme.lower() in SCHEMES and "://" in path


def redact(url: str) -> str:
    """``url`` fit for logs, stats and the mount table: no query (presigned signatures) and
    no user:password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class RemoteOptions:
    """The ``-o`` options of remote images (docs/usage.md)."""

    cafile: str | None = None
    insecure: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    endpoint: str | None = None
    cache_dir: str | None = None
    cache_dir_size: int = 4 << 30
    connections: int = 32
    retries: int = 6
    timeout: float = 30.0


def _tls(opts: RemoteOptions) -> ssl.SSLContext | bool:
    # (one context for every client of the pool: loading the CA store costs a tenth of a
    # second; an http:// URL gets it too, for a redirect to https://)
    if opts.insecure:
        return False
    try:
        return ssl.create_default_context(cafile=opts.cafile)
    except (OSError, ssl.SSLError) as err:
        raise ImageError(f"cafile={opts.cafile}: {getattr(err, 'strerror', None) or err}") \
            from None


def _netrc_auth(url: str) -> httpx.Auth | None:
    """httpx's netrc auth when ``$NETRC`` or ``~/.netrc`` names the URL's host."""
    import httpx

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    host = urllib.parse.urlsplit(url).hostname
    if not host or not os.path.isfile(path):
        return None
    try:
        if netrc.netrc(path).authenticators(host) is None:
            return None
    except (OSError, netrc.NetrcParseError) as err:
        log.warning("%s: ignored: %s", path, err)
        return None
    return httpx.NetRCAuth(path)


POOL_SHARD = 4  # connections per httpx client (see HttpDevice: several small pools)


def make_client(opts: RemoteOptions, url: str, verify: ssl.SSLContext | bool,
                connections: int | None = None) -> httpx.AsyncClient:
    import httpx

    # httpx logs every request at INFO: one log line per block fetched would flood the
    # daemon's log (the device counts requests and logs retries itself)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)

    # trust_env off: no proxy or certificate bundle is taken from the environment behind
    # the user's back; what verifies TLS is the system store, cafile= or insecure.
    return httpx.AsyncClient(
        verify=verify,
        timeout=httpx.Timeout(opts.timeout, connect=min(10.0, opts.timeout)),
        limits=httpx.Limits(max_connections=connections or opts.connections,
                            max_keepalive_connections=connections or opts.connections),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        auth=_netrc_auth(url),
    )


async def open_remote(url: str, opts: RemoteOptions | None = None) -> HttpDevice:
    """The object at ``url`` as a device; ImageError (one line) if it cannot be used."""
    from asyncfs.io.http import HttpDevice, RetryPolicy, probe

    opts = opts or RemoteOptions()
    label = redact(url) if not url.startswith("s3://") else url
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    sign: Signer | None = None
    target = url
    if scheme == "s3":
        from asyncfs.io import s3  # (botocore: only for s3://)

        s3t = await trio.to_thread.run_sync(s3.resolve, url, opts.endpoint)
        target = s3t.url
        sign = s3t.signer
        if sign is None:
            log.info("%s: no AWS credentials found; requests are anonymous", label)
    elif scheme not in ("http", "https"):
        raise ImageError(f"{url}: unsupported scheme {scheme!r} (http, https, s3)")
    headers = dict(opts.headers)
    retry = RetryPolicy(attempts=max(1, opts.retries))
    nshards = max(1, -(-opts.connections // POOL_SHARD))
    per = -(-opts.connections // nshards)
    verify = _tls(opts)
    if opts.insecure:
        log.warning("%s: TLS certificates are not verified (-o insecure)", label)
    clients = [make_client(opts, target, verify, per) for _ in range(nshards)]
    client = clients[0]
    try:
        ident, first, rtt = await probe(client, target, headers=headers, sign=sign,
                                        retry=retry, label=label)
        cache = await trio.to_thread.run_sync(_open_cache, opts, ident.url, ident.etag,
                                              ident.last_modified, ident.size, label)
        dev = HttpDevice(clients, ident, connections=opts.connections, retry=retry,
                         sign=sign, headers=headers, cache=cache, label=label)
    except BaseException:
        with trio.CancelScope(shield=True):
            for c in clients:
                await c.aclose()
        raise
    dev.seed(0, first, rtt)
    log.info("%s: %d bytes, ETag %s, Last-Modified %s, first byte after %.1f ms", label,
             ident.size, ident.etag, ident.last_modified, rtt * 1000)
    return dev


def _open_cache(opts: RemoteOptions, url: str, etag: str | None, modified: str | None,
                size: int, label: str) -> DiskCache | None:
    from asyncfs.io.diskcache import DiskCache
    from asyncfs.io.http import BLOCK

    if not opts.cache_dir:
        return None
    if not etag and not modified:
        log.warning("%s: no ETag or Last-Modified to key the disk cache by; not cached", label)
        return None
    try:
        return DiskCache(Path(opts.cache_dir), url, etag, modified, size, BLOCK,
                         opts.cache_dir_size)
    except BlockingIOError as err:
        log.warning("%s: disk cache not used: %s", label, err.strerror)
    except OSError as err:
        raise ImageError(f"cache_dir={opts.cache_dir}: {err.strerror or err}") from None
    return None


def _chain(dev: Any) -> Iterator[Any]:
    """``dev`` and the devices under it (window, format, fault layers)."""
    seen = 0
    while dev is not None and seen < 8:
        yield dev
        dev = getattr(dev, "inner", None) or getattr(dev, "_file", None)
        seen += 1


def remote_device(dev: Any) -> HttpDevice | None:
    """The HttpDevice under a device stack, if there is one."""
    from asyncfs.io.http import HttpDevice

    for d in _chain(dev):
        if isinstance(d, HttpDevice):
            return d
    return None


def remote_stats(dev: Any) -> dict[str, Any] | None:
    """``asyncfs stats``' ``remote`` entry: the HttpDevice's counters, or None."""
    found = remote_device(dev)
    return None if found is None else found.stats()
