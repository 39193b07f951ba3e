"""The NBD client against real servers: qemu-nbd (raw and qcow2, on a unix socket and on
127.0.0.1) and nbdkit (file plugin; delay filter for latency, error filter for faults, simple
replies with --no-sr). Servers are killed and restarted under reads in flight. Each invariant
is also run against a deliberately broken variant of the client, which must fail it."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from asyncfs.errors import DeviceIOError, ImageError
from asyncfs.io import nbd as nbdmod
from asyncfs.io.nbd import NbdDevice
from asyncfs.io.open import open_image
from tests.mutants import mutant

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("nbdkit") is None,
    reason="qemu-nbd/nbdkit missing (packages qemu-utils, nbdkit)")

MIB = 1 << 20


class Server:
    """One NBD server process; ``restart`` brings it back on the same address."""

    def __init__(self, argv: list[str], sock: Path | None = None, port: int | None = None
                 ) -> None:
        self.argv = argv
        self.sock = sock
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.sock.unlink()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.argv[0]} exited"
            with contextlib.suppress(OSError):
                if self.sock is not None:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.sock))
                else:
                    socket.create_connection(("127.0.0.1", self.port or 0), 1).close()
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.argv} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def uri(self) -> str:
        if self.sock is not None:
            return f"nbd+unix:///exp?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/exp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def qemu_nbd(image: Path, fmt: str, *, sock: Path | None = None) -> Iterator[Server]:
    where = ["-k", str(sock)] if sock is not None else ["-b", "127.0.0.1", "-p",
                                                        str(port := free_port())]
    srv = Server(["qemu-nbd", "-r", "--persistent", "-f", fmt, "-x", "exp", "-t", *where,
                  str(image)], sock=sock, port=None if sock is not None else port)
    try:
        yield srv
    finally:
        srv.kill()


@contextlib.contextmanager
def nbdkit(image: Path, sock: Path, *flags: str, params: tuple[str, ...] = ()
           ) -> Iterator[Server]:
    """nbdkit's file plugin; ``flags`` before the plugin (``--filter=``), filter ``params``
    after it."""
    srv = Server(["nbdkit", "-f", "-r", "-U", str(sock), "-e", "exp", "-t", "64", *flags,
                  "file", str(image), *params], sock=sock)
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 MiB: random bytes, then a hole the server may send as a structured hole."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("nbd") / "disk.raw"
    with open(path, "wb") as f:
        f.write(rng.randbytes(3 * MIB + 777))
        f.truncate(6 * MIB)
    return path


async def read_concurrently(dev: NbdDevice, want: bytes, n: int = 64) -> None:
    rng = random.Random(11)

    async def one(off: int, length: int) -> None:
        assert bytes(await dev.read(off, length)) == want[off:off + length], (off, length)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            off = rng.randrange(len(want))
            nursery.start_soon(one, off, min(rng.randrange(1, 200_000), len(want) - off))


@pytest.mark.parametrize("where", ["unix", "tcp"])
@pytest.mark.parametrize("variant", ["real", "holes-as-garbage"])
async def test_qemu_nbd_raw_reads_exactly(disk: Path, tmp_path: Path, where: str, variant: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-nbd on a unix socket and on 127.0.0.1, with structured replies (data and hole
    chunks): whole-disk and concurrent unaligned reads match the file. Broken variant: hole
    chunks filled with 0xff instead of left zero."""
    if variant != "real":
        monkeypatch.setattr(nbdmod._Conn, "_one_reply", mutant(
            nbdmod._Conn, "_one_reply", "        off -= req.offset\n",
            "        off -= req.offset\n        req.buf[off:off + n] = b'\\xff' * n\n"))
    want = disk.read_bytes()
    with qemu_nbd(disk, "raw", sock=tmp_path / "s" if where == "unix" else None) as srv:
        dev = await NbdDevice.connect(srv.uri)
        try:
            assert dev.size == len(want)
            assert dev._conn is not None and dev._conn.structured
            got = b"".join([bytes(await dev.read(o, MIB)) for o in range(0, len(want), MIB)])
            assert (got == want) == (variant == "real")
            if variant == "real":
                await read_concurrently(dev, want)
        finally:
            await dev.aclose()


async def test_qcow2_over_nbd_and_simple_replies(disk: Path, tmp_path: Path) -> None:
    """A qcow2 image served by qemu-nbd raw (``-f raw``: the client reads the qcow2 format
    itself) and decoded (``-f qcow2``), and nbdkit with structured replies turned off (simple
    replies only)."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(disk), str(img)],
                   check=True)
    want = disk.read_bytes()
    with qemu_nbd(img, "raw", sock=tmp_path / "q") as srv:
        dev = await open_image(srv.uri)
        try:
            assert type(dev).__name__ == "Qcow2Device" and dev.size == len(want)
            assert bytes(await dev.read(0, len(want))) == want
        finally:
            await dev.aclose()
    with qemu_nbd(img, "qcow2") as srv:  # the server decodes it; TCP on 127.0.0.1
        dev = await open_image(srv.uri)
        try:
            assert isinstance(dev, NbdDevice)
            await read_concurrently(dev, want)
        finally:
            await dev.aclose()
    with nbdkit(disk, tmp_path / "k", "--no-sr") as srv:
        dev = await NbdDevice.connect(srv.uri)
        try:
            assert dev._conn is not None and not dev._conn.structured
            await read_concurrently(dev, want)
        finally:
            await dev.aclose()


async def _serial(dev: NbdDevice, offset: int, length: int) -> bytearray:
    async with dev._connect_lock:
        return await NbdDevice._request(dev, offset, length)


@pytest.mark.parametrize("variant", ["real", "one-at-a-time"])
async def test_many_reads_in_flight_on_one_connection(
        disk: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 100 ms added to every read (nbdkit delay filter), 16 concurrent readers finish in
    far less than 16 x 100 ms: their requests are all in flight at once on the one
    connection. Broken variant: one request at a time."""
    if variant != "real":
        monkeypatch.setattr(nbdmod, "_serial", _serial, raising=False)
        monkeypatch.setattr(NbdDevice, "read", mutant(
            NbdDevice, "read", "buf = await self._request(lo, hi - lo)",
            "buf = await _serial(self, lo, hi - lo)"))
    want = disk.read_bytes()
    with nbdkit(disk, tmp_path / "d", "--filter=delay", params=("delay-read=100ms",)) as srv:
        dev = await NbdDevice.connect(srv.uri)
        try:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(_check, dev, want, i * 65536, 4096)
            took = trio.current_time() - start
            assert (took < 0.8) == (variant == "real"), took
        finally:
            await dev.aclose()


async def _check(dev: NbdDevice, want: bytes, off: int, n: int) -> None:
    assert bytes(await dev.read(off, n)) == want[off:off + n]


@pytest.mark.parametrize("variant", ["real", "no-retry"])
async def test_server_killed_mid_read_reconnects_and_retries(
        disk: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 reads in flight (200 ms each), the server SIGKILLed under them and restarted 300 ms
    later on the same socket: every read completes with the right bytes on a new connection.
    Broken variant: a lost connection fails the read instead of retrying it."""
    if variant != "real":
        monkeypatch.setattr(NbdDevice, "_request", mutant(
            NbdDevice, "_request",
            "if not isinstance(req.error, _Lost):\n            raise req.error",
            "if True:\n            raise DeviceIOError(str(req.error))"))
    want = disk.read_bytes()
    with nbdkit(disk, tmp_path / "r", "--filter=delay", params=("delay-read=200ms",)) as srv:
        dev = await NbdDevice.connect(srv.uri, reconnect_window=10)
        results: list[bool] = []

        async def reader(off: int) -> None:
            try:
                got = bytes(await dev.read(off, 8192))
            except DeviceIOError:
                results.append(False)
                return
            results.append(got == want[off:off + 8192])

        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for i in range(16):
                        nursery.start_soon(reader, i * 100_000)
                    await trio.sleep(0.1)
                    srv.kill()
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(srv.start)
            assert len(results) == 16
            assert all(results) == (variant == "real"), results
            if variant == "real":
                assert dev.reconnects == 1 and dev.retried >= 16
        finally:
            await dev.aclose()


@pytest.mark.parametrize("variant", ["real", "retry-forever"])
async def test_server_gone_for_good_is_one_line_eio(
        disk: Path, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server killed and never restarted: reads in flight and new reads fail with one
    line naming the server within the reconnect window; nothing hangs. Broken variant: the
    window never runs out (the read would hang)."""
    if variant != "real":
        monkeypatch.setattr(NbdDevice, "_request", mutant(
            NbdDevice, "_request", "now + self.reconnect_window", "now + 3600"))
    with qemu_nbd(disk, "raw", sock=tmp_path / "g") as srv:
        dev = await NbdDevice.connect(srv.uri, reconnect_window=1.0)
        try:
            assert len(bytes(await dev.read(0, 4096))) == 4096
            srv.kill()
            outcome = "hang"
            with trio.move_on_after(3):
                try:
                    await dev.read(MIB, 4096)
                    outcome = "read"
                except DeviceIOError as err:
                    assert "gone" in str(err) and "\n" not in str(err), err
                    outcome = "eio"
            assert (outcome == "eio") == (variant == "real"), outcome
            if variant == "real":
                start = trio.current_time()
                with pytest.raises(DeviceIOError, match="gone"):
                    await dev.read(0, 4096)
                assert trio.current_time() - start < 0.5  # later reads fail fast
        finally:
            await dev.aclose()


async def test_server_errors_are_eio_and_not_retried(disk: Path, tmp_path: Path) -> None:
    """nbdkit's error filter failing every read while a trigger file exists: reads fail at
    once with EIO (an error the server reports is not a lost connection), and succeed again
    once the trigger is gone, on the same connection."""
    trigger = tmp_path / "fail-now"
    want = disk.read_bytes()
    with nbdkit(disk, tmp_path / "e", "--filter=error",
                params=("error-pread=EIO", "error-pread-rate=100%",
                        f"error-pread-file={trigger}")) as srv:
        dev = await NbdDevice.connect(srv.uri)
        try:
            assert bytes(await dev.read(4096, 4096)) == want[4096:8192]
            trigger.touch()
            with trio.fail_after(5), pytest.raises(DeviceIOError, match="EIO"):
                await dev.read(8192, 4096)
            trigger.unlink()
            assert bytes(await dev.read(8192, 4096)) == want[8192:12288]
            assert dev.reconnects == 0
        finally:
            await dev.aclose()


async def test_connection_errors_are_one_line(disk: Path, tmp_path: Path) -> None:
    """No server, an unknown export, a bad URI: ImageError, one line, at once."""
    with trio.fail_after(15):
        with pytest.raises(ImageError, match="cannot connect"):
            await open_image(f"nbd+unix:///exp?socket={tmp_path / 'none'}")
        with pytest.raises(ImageError, match="cannot connect"):
            await open_image(f"nbd://127.0.0.1:{free_port()}/exp")
        with qemu_nbd(disk, "raw", sock=tmp_path / "u") as srv, \
                pytest.raises(ImageError, match="unknown export"):
            await open_image(srv.uri.replace("/exp?", "/other?"))
        for bad in ("nbd+unix:///exp", "nbds://h/e", "nbd:///e"):
            with pytest.raises(ImageError) as exc:
                await open_image(bad)
            assert "\n" not in str(exc.value)
