"""A TCP proxy on loopback that adds latency and a bandwidth cap: the "WAN link" of the remote
image tests and of bench/remote_bench.py.

``tc qdisc ... netem`` would be the usual tool, but the test VM's kernel has no ``sch_netem``
module ("Specified qdisc kind is unknown"), so the link is emulated here: every chunk read from
one side is sent on to the other ``delay`` seconds later (one way, so a request/response round
trip costs twice that), in order; what flows from the server to the client is also paced to
``rate`` bytes a second over all connections together, as a shared link would be. Killing the
proxy drops every connection, like a lost link.

    python -m bench.netproxy --upstream 127.0.0.1:8080 --rtt-ms 20 --rate-mbit 800

prints the port it listens on (127.0.0.1) on its first line, then serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import trio

CHUNK = 256 * 1024


class Link:
    """Pacing shared by every connection in one direction."""

    def __init__(self, rate: float) -> None:
        self.rate = rate  # bytes/s; 0 = unlimited
        self.free_at = 0.0

    def slot(self, ready: float, n: int) -> float:
        """When ``n`` bytes ready at ``ready`` have left the link."""
        if not self.rate:
            return ready
        start = max(ready, self.free_at)
        self.free_at = start + n / self.rate
        return self.free_at


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float,
                link: Link) -> None:
    send, recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def reader() -> None:
        async with send:
            while True:
                try:
                    data = await src.receive_some(CHUNK)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                await send.send((trio.current_time() + delay, data))

    async def writer() -> None:
        async with recv:
            async for ready, data in recv:
                await trio.sleep_until(link.slot(ready, len(data)))
                try:
                    await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 AttributeError):
            await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _serve_one(client: trio.SocketStream, host: str, port: int, delay: float,
                     down: Link, up: Link) -> None:
    try:
        server = await trio.open_tcp_stream(host, port)
    except OSError:
        await client.aclose()
        return
    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(_pump, client, server, delay, up)
        nursery.start_soon(_pump, server, client, delay, down)


async def main(upstream: str, rtt_ms: float, rate_mbit: float, port: int) -> None:
    host, _, p = upstream.rpartition(":")
    delay = rtt_ms / 2000
    down = Link(rate_mbit * 1e6 / 8)
    up = Link(0)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, host, int(p), delay, down, up)

    await trio.serve_listeners(handler, listeners)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT on loopback")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="0: unlimited")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    if not a.upstream.startswith(("127.", "localhost:", "[::1]:")):
        sys.exit("netproxy: the upstream must be on loopback")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, a.upstream, a.rtt_ms, a.rate_mbit, a.port)
