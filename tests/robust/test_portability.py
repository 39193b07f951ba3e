"""asyncfs on a CPU without AVX-512 and a kernel without io_uring, as qemu-user presents one.

``qemu-x86_64 -cpu max`` (Debian's qemu-user) emulates an x86-64 CPU whose instruction set
stops short of AVX-512 and answers ``io_uring_setup`` with ENOSYS. Under it, the ring's
smoke test (create a ring, read 4 KiB of an image, tear it down) and ``asyncfs ls``/``cat`` of
the demo image must run to the end: never SIGILL, whatever CPU the tests run on, and the
image backend falls back to threads and says why. The third-party binding asyncfs used before
its own died here with SIGILL in ``Ring()``.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfs.cli.demo import build_image

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="qemu-x86_64 emulates this architecture only")

SMOKE = """
import os, sys, trio
from asyncfs.io import open_image, uring

async def main(path):
    try:
        ring = uring.open_ring(8)
        ring.close()
        print("ring: ok")
    except uring.UringUnavailable as err:
        print(f"ring: unavailable: {err}")
    dev = await open_image(path)
    data = bytes(await dev.read(0, 4096))
    with open(path, "rb") as f:
        assert data == f.read(4096), "wrong bytes"
    print(f"backend: {dev.backend_name}: {dev.backend_note}")
    await dev.aclose()

trio.run(main, sys.argv[1])
"""


def _qemu() -> str:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is missing (mount.sh installs qemu-user)", pytrace=False)
    return qemu


@pytest.fixture(scope="module")
def demo_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo.img"
    build_image(out, big_mib=8)
    return out


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_qemu(), "-cpu", "max", *argv], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def _died(r: subprocess.CompletedProcess[str]) -> str:
    if r.returncode < 0:
        return f"killed by {signal.Signals(-r.returncode).name}: {r.stderr[-1500:]}"
    return f"exit {r.returncode}: {r.stderr[-1500:]}"


def test_ring_smoke_test_under_a_cpu_without_avx512(demo_image: Path) -> None:
    """The ring's smoke test runs to the end under qemu-user: no SIGILL, the ring set-up is
    refused with ENOSYS in one line, and the threads backend reads the image's bytes."""
    r = _run(sys.executable, "-c", SMOKE, str(demo_image))
    assert r.returncode == 0, _died(r)
    assert "ring: unavailable: the kernel has no io_uring" in r.stdout and "ENOSYS" in r.stdout
    assert "backend: threads: io_uring is unavailable" in r.stdout


@pytest.mark.parametrize("cmd", [["ls", "/"], ["cat", "/README.txt"]])
def test_cli_reads_the_demo_image_under_a_cpu_without_avx512(demo_image: Path,
                                                             cmd: list[str]) -> None:
    """``asyncfs ls`` and ``cat`` of the demo image run to the end under qemu-user, and print
    what they print natively (where the kernel gives this process a ring)."""
    asyncfs = str(Path(sys.executable).with_name("asyncfs"))
    r = _run(sys.executable, asyncfs, cmd[0], str(demo_image), cmd[1])
    assert r.returncode == 0, _died(r)
    native = subprocess.run([asyncfs, cmd[0], str(demo_image), cmd[1]], capture_output=True,
                            text=True, timeout=120, check=True)
    assert r.stdout == native.stdout and r.stdout
    assert "Traceback" not in r.stderr
    if cmd[0] == "cat":
        assert "asyncfs demo image" in r.stdout


def test_the_guard_catches_an_illegal_instruction(tmp_path: Path) -> None:
    """The guard itself can fail: a program that executes one AVX-512 instruction dies with
    SIGILL under the same emulator, so a binding that did so would be seen."""
    src = tmp_path / "avx512.c"
    src.write_text(
        "#include <immintrin.h>\n"
        "__attribute__((target(\"avx512f\"))) int main(void) {\n"
        "  volatile float a[16] = {1};\n"
        "  __m512 v = _mm512_loadu_ps((const float *)a);\n"
        "  _mm512_storeu_ps((float *)a, _mm512_add_ps(v, v));\n"
        "  return (int)a[0] - 2;\n}\n")
    exe = tmp_path / "avx512"
    subprocess.run(["gcc", "-O1", str(src), "-o", str(exe)], check=True)
    os.chmod(exe, 0o755)
    r = _run(str(exe))
    assert r.returncode == -signal.SIGILL, _died(r)
