"""asyncfs's own io_uring binding (``asyncfs.io._uring``): built for the architecture's
baseline, it holds every buffer a read targets until that read is reaped (and for good if the
ring closes first), holds delayed reads back in the kernel, and the backend falls back to
threads, saying why, wherever no ring can be had."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

from asyncfs.errors import ImageError
from asyncfs.io import ThreadDevice, UringDevice, open_image
from asyncfs.io import uring as uring_mod
from tests.unit.uring_build import beyond_baseline, compile_so, mutant_binding

try:
    from asyncfs.io import _uring
except ImportError as err:  # the suite needs it built: mount.sh installs liburing-dev
    pytest.fail(f"asyncfs.io._uring was not built ({err}); run ./mount.sh --setup",
                pytrace=False)

DATA = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def data_fd(tmp_path: Path) -> int:
    path = tmp_path / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def _reap_until(ring: object, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += ring.reap()  # type: ignore[attr-defined]
        time.sleep(0.001)
    return got


def _resizable(buf: bytearray) -> bool:
    try:
        buf.append(0)
    except BufferError:
        return False
    buf.pop()
    return True


AVX512_SNIPPET = """
#include <immintrin.h>
__attribute__((target("avx512f"))) void add16(float *a, const float *b) {
    _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)));
}
"""


@pytest.mark.parametrize("variant", ["kernel", "avx512"])
def test_binding_uses_no_instruction_beyond_the_baseline(tmp_path: Path, variant: str) -> None:
    """Every extension module the project builds (today the binding alone) disassembles to
    baseline instructions only: an x86-64 CPU without AVX or AVX-512 runs it.

    Broken variant: a module with one AVX-512 function (what the old third-party wheel
    carried); the check must see it."""
    import asyncfs

    built = sorted(Path(asyncfs.__file__).parent.rglob("*.so"))
    assert built, "no extension module was built"
    if variant == "avx512":
        built = [compile_so(AVX512_SNIPPET, tmp_path / "avx512.so")]
    offending = {str(so): beyond_baseline(so)[:3] for so in built if beyond_baseline(so)}
    if os.uname().machine == "x86_64":
        assert (offending == {}) == (variant == "kernel"), offending


@pytest.mark.parametrize("variant", ["kernel", "no-release", "release-at-prep"])
def test_read_holds_its_buffer_until_reaped(tmp_path: Path, data_fd: int, variant: str) -> None:
    """While a read is in the kernel its buffer cannot be resized (or freed); once its
    completion is reaped the buffer is free again: no export outlives its read.

    Broken variants: the reap never releasing the export (every read leaks one, as the old
    third-party binding's ``Iovec`` did); the export released as soon as the read is
    prepared (the kernel could write into memory that has moved)."""
    mod: ModuleType = _uring
    if variant == "no-release":
        mod = mutant_binding(tmp_path, "        rd_unlink(self, r);\n        rd_release(r);",
                             "        rd_unlink(self, r);")
    elif variant == "release-at-prep":
        mod = mutant_binding(tmp_path, "r->iov1.iov_len = (size_t)r->buf1.len;\n        return r;",
                             "r->iov1.iov_len = (size_t)r->buf1.len;\n"
                             "        PyBuffer_Release(&r->buf1); r->nbuf = 0;\n        return r;")
    ring = mod.Ring(8)
    buf = bytearray(4096)
    ok = True
    for i in range(50):
        assert ring.readv(data_fd, buf, 4096, i + 1)
        held = not _resizable(buf)
        ring.submit()
        got = _reap_until(ring, 1)
        ok = (ok and held and got == [(i + 1, 4096)] and bytes(buf) == DATA[4096:8192]
              and _resizable(buf))
        buf[:] = bytes(4096)
    ring.close()
    assert ok == (variant == "kernel")


@pytest.mark.parametrize("variant", ["kernel", "release-at-close"])
def test_close_keeps_the_buffers_of_reads_still_in_the_kernel(tmp_path: Path, data_fd: int,
                                                              variant: str) -> None:
    """A read still in the kernel when the ring is torn down keeps its buffer exported for
    good (the kernel may still write there), and ``close`` says how many.

    Broken variant: close releasing the buffers of every read not reaped."""
    mod: ModuleType = _uring
    if variant != "kernel":
        mod = mutant_binding(
            tmp_path, "    Py_ssize_t abandoned = self->nlive;",
            "    for (rd_t *x = self->live.next; x != &self->live;) {\n"
            "        rd_t *nx = x->next; rd_release(x); x = nx;\n    }\n"
            "    Py_ssize_t abandoned = self->nlive;")
    ring = mod.Ring(8)
    buf = bytearray(4096)
    assert ring.readv(data_fd, buf, 0, 1, 30.0)  # held back 30 s in the kernel
    ring.submit()
    assert ring.reap() == [] and ring.in_kernel == 1
    assert ring.close() == 1 and ring.closed
    assert _resizable(buf) == (variant != "kernel")


@pytest.mark.parametrize("variant", ["kernel", "no-delay"])
def test_delay_holds_the_read_back_in_the_kernel(tmp_path: Path, data_fd: int,
                                                 variant: str) -> None:
    """A read given a delay completes no sooner than the delay, with its bytes; the delay
    costs the caller nothing but the one call.

    Broken variant: the linked timeout never prepared."""
    mod: ModuleType = _uring
    if variant != "kernel":
        mod = mutant_binding(tmp_path, "    if (delay > 0) {\n        double whole",
                             "    if (0) {\n        double whole")
    ring = mod.Ring(8)
    buf = bytearray(100)
    start = time.monotonic()
    assert ring.readv(data_fd, [memoryview(buf)[:40], memoryview(buf)[40:]], 7, 9, 0.3)
    ring.submit()
    time.sleep(0.05)
    early = ring.reap()
    got = early + _reap_until(ring, 1 - len(early))
    waited = time.monotonic() - start
    ring.close()
    assert got == [(9, 100)] and bytes(buf) == DATA[7:107]
    assert (early == [] and waited >= 0.3) == (variant == "kernel"), (early, waited)


def test_cancel_delays_ends_every_pending_delay(data_fd: int) -> None:
    """``cancel_delays`` ends the delays at once: their reads complete with ECANCELED, the
    completions of the timeouts and of the cancel itself are never listed, and reads without
    a delay are untouched."""
    ring = _uring.Ring(16)
    bufs = [bytearray(512) for _ in range(4)]
    for i, b in enumerate(bufs[:3]):
        assert ring.readv(data_fd, b, 0, i + 1, 60.0)
    assert ring.readv(data_fd, bufs[3], 512, 4)
    ring.submit()
    assert ring.cancel_delays()
    ring.submit()
    got = sorted(_reap_until(ring, 4))
    assert got == [(1, -errno.ECANCELED), (2, -errno.ECANCELED), (3, -errno.ECANCELED),
                   (4, 512)]
    assert ring.in_kernel == 0 and _reap_until(ring, 1, timeout=0.1) == []
    assert ring.close() == 0


def test_full_queue_and_bad_arguments_are_refused_cleanly(data_fd: int) -> None:
    """A full submission queue prepares nothing and says so (False) instead of raising, and
    bad arguments raise before anything is exported or queued."""
    ring = _uring.Ring(2)
    bufs = [bytearray(64) for _ in range(3)]
    assert ring.readv(data_fd, bufs[0], 0, 1) and ring.readv(data_fd, bufs[1], 0, 2)
    assert not ring.readv(data_fd, bufs[2], 0, 3) and _resizable(bufs[2])
    assert ring.prepared == 2 and ring.submit() == 2
    assert sorted(_reap_until(ring, 2)) == [(1, 64), (2, 64)]
    with pytest.raises(ValueError, match="reserved"):
        ring.readv(data_fd, bufs[0], 0, 0)
    with pytest.raises(BufferError, match="not writable"):
        ring.readv(data_fd, b"read-only", 0, 5)
    with pytest.raises(ValueError, match="1 to"):
        ring.readv(data_fd, [], 0, 5)
    with pytest.raises(ValueError, match="delay"):
        ring.readv(data_fd, bufs[0], 0, 5, -1.0)
    assert ring.in_kernel == 0 and ring.prepared == 0
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.readv(data_fd, bufs[0], 0, 5)


async def test_no_binding_falls_back_to_threads_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the binding was not built (no compiler or no liburing headers at install),
    ``backend=auto`` serves through threads and keeps the reason; ``backend=uring`` is a
    one-line error."""
    path = tmp_path / "img"
    path.write_bytes(DATA)
    monkeypatch.setattr(uring_mod, "_uring", None)
    monkeypatch.setattr(uring_mod, "_IMPORT_ERROR", "No module named 'asyncfs.io._uring'",
                        raising=False)
    dev = await open_image(path)
    assert isinstance(dev, ThreadDevice)
    assert dev.backend_note is not None and "was not built" in dev.backend_note
    assert bytes(await dev.read(0, 4096)) == DATA[:4096]
    await dev.aclose()
    with pytest.raises(ImageError, match=r"backend=uring: io_uring is unavailable: .*not built"):
        await open_image(path, backend="uring")


SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.mark.parametrize("setting", ["1", "2"])
async def test_kernel_refusing_io_uring_falls_back_to_threads(tmp_path: Path,
                                                              setting: str) -> None:
    """With ``kernel.io_uring_disabled`` set, ``auto`` never fails: at 2 (no one may) it
    serves through threads, saying why, and ``uring`` is a one-line error naming the cause;
    at 1 (only CAP_SYS_ADMIN or the ``io_uring_group``) root still gets its ring."""
    if not SYSCTL.exists() or os.geteuid() != 0:
        pytest.skip("needs root and a kernel with kernel.io_uring_disabled (6.6 or newer)")
    path = tmp_path / "img"
    path.write_bytes(DATA)
    old = SYSCTL.read_text().strip()
    try:
        SYSCTL.write_text(setting)
        dev = await open_image(path)
        refused = isinstance(dev, ThreadDevice)
        note = getattr(dev, "backend_note", None)
        assert bytes(await dev.read(4096, 4096)) == DATA[4096:8192]
        await dev.aclose()
        if refused:
            with pytest.raises(ImageError) as info:
                await open_image(path, backend="uring")
    finally:
        SYSCTL.write_text(old)
    if setting == "2":
        assert refused and note is not None and "forbidden" in note and "EPERM" in note
        assert "\n" not in str(info.value) and "EPERM" in str(info.value)
    else:  # 1 lets root (CAP_SYS_ADMIN) have a ring
        assert not refused and isinstance(dev, UringDevice)
