"""RequestWait, the wait for the next FUSE request, over a socket pair standing in for /dev/fuse.

A "request" is one byte on the socket; a worker that was told True reads one byte without
blocking, exactly as pyfuse3's session loop calls ``fuse_session_receive_buf`` right after the
wait. Finding nothing to read there is the bug that would block the daemon's only thread.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from asyncfs.fuse import request_wait
from asyncfs.fuse.request_wait import YIELD_EVERY, RequestWait
from tests.mutants import aholds, breaks


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    fuse_end, kernel_end = socket.socketpair()
    fuse_end.setblocking(False)
    yield fuse_end, kernel_end
    fuse_end.close()
    kernel_end.close()


class Pyfuse3Park:
    """pyfuse3's own ``_wait_fuse_readable``, in its steps: a lock so one reader at a time
    waits on the fd, ``wait_readable``, and False once the fd is closed (the session's exit)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = trio.Lock()
        self.exited = False

    async def __call__(self) -> bool:
        try:
            async with self.lock:
                if self.exited:
                    return False
                await trio.lowlevel.wait_readable(self.fd)
        except trio.ClosedResourceError:
            self.exited = True
            return False
        return True


def _wait(fuse_end: socket.socket, ready: Callable[[], bool] | None = None) -> RequestWait:
    return RequestWait(fuse_end.fileno(), Pyfuse3Park(fuse_end.fileno()), ready)


def _take(fuse_end: socket.socket) -> str:
    try:
        return "request" if fuse_end.recv(1) else "eof"
    except BlockingIOError:
        return "would block"


@pytest.mark.parametrize("variant", ["kernel", "always_parks"])
async def test_a_queued_request_is_taken_without_a_checkpoint(
        pair: tuple[socket.socket, socket.socket], variant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: going through pyfuse3's wait every time, which parks in epoll and
    checkpoints even when the request is already queued."""
    breaks(variant, monkeypatch, RequestWait, "__call__",
           "if self._ready() or self._spin():", "if False:")
    fuse_end, kernel_end = pair
    wait = _wait(fuse_end)
    kernel_end.send(b"r")

    async def check() -> None:
        with trio.testing.assert_no_checkpoints():
            assert await wait()

    assert await aholds(check) == (variant == "kernel")
    assert _take(fuse_end) == "request"


async def test_an_empty_queue_parks_until_a_request_comes(
        pair: tuple[socket.socket, socket.socket]) -> None:
    fuse_end, kernel_end = pair
    wait = _wait(fuse_end)
    got: list[str] = []

    async def worker() -> None:
        assert await wait()
        got.append(_take(fuse_end))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # parked, not spinning and not reading an empty queue
        kernel_end.send(b"r")
    assert got == ["request"]
    assert wait.waited_for == 1


@pytest.mark.parametrize("variant", ["kernel", "trusts_the_wake_up"])
async def test_a_woken_reader_asks_again_before_it_reads(
        pair: tuple[socket.socket, socket.socket], variant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader parked in wait_readable is woken by epoll, but a worker taking the fast way may
    have read that request before the woken one runs. Here ``ready`` (the queue) and the fd's
    readiness (the wake-up) are driven apart to stage exactly that.

    Broken variant: answering True as soon as pyfuse3's wait returns; the worker then reads an
    empty queue ("would block": in the daemon, a read() that blocks the only thread)."""
    breaks(variant, monkeypatch, RequestWait, "__call__",
           "if self._ready():", "if True:")
    fuse_end, kernel_end = pair
    queued = [0]
    wait = _wait(fuse_end, ready=lambda: queued[0] > 0)
    got: list[str] = []

    async def worker() -> None:
        assert await wait()
        got.append("request" if queued[0] else "would block")
        queued[0] -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        kernel_end.send(b"w")  # epoll reports the fd readable; the request is already taken
        for _ in range(5):
            await trio.sleep(0)  # the parked reader is woken and runs
        fuse_end.recv(1)
        await trio.testing.wait_all_tasks_blocked()
        queued[0] = 1
        kernel_end.send(b"r")
    assert (got == ["request"]) == (variant == "kernel"), got


@pytest.mark.parametrize("variant", ["kernel", "never_yields"])
async def test_a_full_queue_still_lets_other_tasks_run(
        variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: never yielding on the fast way; with requests always queued the worker
    then never gives trio back, and completions and signals wait forever."""
    breaks(variant, monkeypatch, RequestWait, "__call__",
           "if self._since_yield >= YIELD_EVERY:", "if False:")

    async def never() -> bool:
        raise AssertionError("the queue is never empty here")

    wait = RequestWait(-1, never, ready=lambda: True)
    others = [0]

    async def other_task() -> None:
        while True:
            await trio.sleep(0)
            others[0] += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        calls = 50 * YIELD_EVERY
        for _ in range(calls):
            assert await wait()
        ran = others[0] >= calls // YIELD_EVERY // 2  # one pass per yield
        nursery.cancel_scope.cancel()
    assert ran == (variant == "kernel"), others[0]


@pytest.mark.parametrize("variant", ["kernel", "forgets_the_close"])
async def test_after_close_every_caller_answers_false(
        pair: tuple[socket.socket, socket.socket], variant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pyfuse3.terminate() wakes the parked reader with ClosedResourceError and pyfuse3's wait
    answers False; a request still queued must not be read after that. Broken variant:
    forgetting the close, so the next caller takes the queued request at once."""
    breaks(variant, monkeypatch, RequestWait, "__call__", "self._closed = True", "pass")
    fuse_end, kernel_end = pair
    wait = _wait(fuse_end)
    answers: list[bool] = []

    async def worker() -> None:
        answers.append(await wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.notify_closing(fuse_end.fileno())
    assert answers == [False, False, False]
    kernel_end.send(b"r")
    assert (not await wait()) == (variant == "kernel")


@pytest.mark.parametrize("variant", ["kernel", "no_spin"])
async def test_a_request_arriving_during_the_spin_is_taken_without_parking(
        pair: tuple[socket.socket, socket.socket], variant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone reader's next request comes within microseconds of the reply; watching the
    empty queue that long beats parking and waking. Broken variant: no spin (the worker parks,
    a checkpoint)."""
    breaks(variant, monkeypatch, RequestWait, "__call__",
           "if self._ready() or self._spin():", "if self._ready():")
    fuse_end, kernel_end = pair
    wait = RequestWait(fuse_end.fileno(), Pyfuse3Park(fuse_end.fileno()),
                       may_spin=lambda: True, spin_s=5.0)
    later = threading.Timer(0.02, kernel_end.send, (b"r",))  # the reader, in its own thread
    later.start()

    async def check() -> None:
        with trio.testing.assert_no_checkpoints():
            assert await wait()

    try:
        assert await aholds(check) == (variant == "kernel")
    finally:
        later.join()
    assert _take(fuse_end) == "request"


def _counting(queued: list[int], calls: list[int]) -> Callable[[], bool]:
    def ready() -> bool:
        calls[0] += 1
        return queued[0] > 0
    return ready


@pytest.mark.parametrize("variant, may_spin, spin_s", [
    ("kernel", False, 1.0), ("kernel", True, 0.01),
    ("ignores_may_spin", False, 1.0), ("no_spin", True, 0.01),
])
async def test_the_spin_only_when_allowed_and_only_so_long(
        pair: tuple[socket.socket, socket.socket], variant: str, may_spin: bool, spin_s: float,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No spin while ``may_spin`` says no (the daemon: a backend read in flight, whose
    completion must not wait behind it), and a bounded one otherwise: then the worker parks.
    Broken variants: ignoring ``may_spin`` (ready() asked over and over for a second);
    no spin at all (ready() asked once or twice, also with leave to spin)."""
    breaks(variant if variant != "no_spin" else "kernel", monkeypatch, RequestWait, "_spin",
           " or self._may_spin is None or not self._may_spin()", "")
    breaks(variant if variant != "ignores_may_spin" else "kernel", monkeypatch, RequestWait,
           "__call__", "if self._ready() or self._spin():", "if self._ready():")
    fuse_end, kernel_end = pair
    queued, calls = [0], [0]
    wait = RequestWait(fuse_end.fileno(), Pyfuse3Park(fuse_end.fileno()),
                       _counting(queued, calls), may_spin=lambda: may_spin, spin_s=spin_s)
    got: list[bool] = []

    async def worker() -> None:
        got.append(await wait())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # parked
            spun_as_told = (calls[0] > 10) == may_spin
            queued[0] = 1
            kernel_end.send(b"r")
    assert got == [True]
    assert spun_as_told == (variant == "kernel"), calls[0]


def _module_with_hook() -> SimpleNamespace:
    async def original() -> bool:
        return True
    return SimpleNamespace(_wait_fuse_readable=original, __version__="test")


@pytest.mark.parametrize("hook, fds, installed", [
    (True, [7], True),
    (False, [7], False),  # a pyfuse3 without the function: keep its loop as it is
    (True, [], False),  # no session descriptor found
    (True, [7, 8], False),  # two: cannot tell which is the session's
])
def test_install_only_when_pyfuse3_and_the_descriptor_are_known(
        monkeypatch: pytest.MonkeyPatch, hook: bool, fds: list[int], installed: bool) -> None:
    module = _module_with_hook() if hook else SimpleNamespace(__version__="test")
    before: Callable[[], object] | None = getattr(module, "_wait_fuse_readable", None)
    monkeypatch.setattr(request_wait, "_fuse_fds", lambda: fds)
    no_poll = SimpleNamespace(register=lambda *a: None)
    monkeypatch.setattr(request_wait.select, "poll", lambda: no_poll)
    wait = request_wait.install(module)
    assert (wait is not None) == installed
    after = getattr(module, "_wait_fuse_readable", None)
    assert after is (wait if installed else before)
    if wait is not None:
        assert wait.park is before  # pyfuse3's own wait is kept for an empty queue
        again = request_wait.install(module)  # a second session in the same process
        assert again is not None and again.park is before


def test_installed_pyfuse3_still_has_the_hook() -> None:
    """The pinned pyfuse3 must still look the wait up by this name; a release that renames it
    would silently fall back to its own (slower) wait, so the suite says so here."""
    import pyfuse3

    assert callable(getattr(pyfuse3, "_wait_fuse_readable", None))
