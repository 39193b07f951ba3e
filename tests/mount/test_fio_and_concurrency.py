"""fio verifies, through every I/O engine, files that fio itself wrote with --verify into the
source tree before mke2fs; 32 concurrent readers all get the right bytes."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.testing.imagegen import make_image
from tests.mount.helpers import mounted, regular_files, stats

FIO_SIZE = "24M"
ENGINES = {
    "psync": ["--ioengine=psync"],
    "libaio-direct": ["--ioengine=libaio", "--direct=1", "--iodepth=16"],
    "io_uring": ["--ioengine=io_uring", "--iodepth=16"],
    "mmap": ["--ioengine=mmap"],
}


def _fio_job(path: Path, *extra: str) -> list[str]:
    return ["fio", "--name=verify", f"--filename={path}", "--bs=4k", f"--size={FIO_SIZE}",
            "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", *extra]


@pytest.fixture(scope="module")
def fio_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("fio") is None:
        pytest.fail("fio is not installed (mount.sh installs it)")
    base = tmp_path_factory.mktemp("fio")
    src = base / "src"
    (src / "fio").mkdir(parents=True)
    for name, rw in (("seq.dat", "write"), ("rand.dat", "randwrite")):
        subprocess.run(_fio_job(src / "fio" / name, f"--rw={rw}", "--do_verify=0",
                                "--ioengine=psync", "--randseed=42"),
                       check=True, capture_output=True)
    return make_image(src, base / "fio.img", "ext4")


@pytest.fixture(scope="module")
def fio_mount(fio_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted(fio_image, tmp_path_factory.mktemp("fiomnt") / "mnt") as mnt:
        yield mnt


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize(("name", "rw"), [("seq.dat", "read"), ("rand.dat", "randread")])
def test_fio_verifies_through_the_mount(fio_mount: Path, engine: str, name: str,
                                        rw: str) -> None:
    r = subprocess.run(_fio_job(fio_mount / "fio" / name, f"--rw={rw}", "--readonly",
                                "--randseed=42", *ENGINES[engine]),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "verify failed" not in r.stdout + r.stderr
    assert " err= 0" in r.stdout


def test_every_request_goes_through_asyncfs_request_wait(fio_mount: Path) -> None:
    """With the pinned pyfuse3, the session loop takes its requests through RequestWait (the
    wait that skips epoll when a request is already queued); were pyfuse3's own wait left in
    place, the daemon would report no counts. RequestWait's own variants are built in
    tests/unit/test_fuse_request_wait.py."""
    before = stats(fio_mount)
    jobs, ios = 8, 100
    r = subprocess.run(_fio_job(fio_mount / "fio" / "rand.dat", "--rw=randread", "--readonly",
                                "--direct=1", f"--numjobs={jobs}", f"--io_size={ios * 4}k",
                                "--ioengine=psync"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    after = stats(fio_mount)
    keys = ("requests_taken_at_once", "requests_waited_for")
    assert all(after[k] is not None for k in keys), after
    taken = sum(after[k] - before[k] for k in keys)
    assert taken >= jobs * ios  # at least one request per read, plus opens and lookups


def test_32_concurrent_readers_get_correct_bytes(ext4_image: Path, small_tree: Path,
                                                 tmp_path: Path) -> None:
    files = regular_files(small_tree)[:8]
    sources = {p.relative_to(small_tree): p.read_bytes() for p in files}
    errors: list[str] = []
    reads = [0]
    lock = threading.Lock()
    with mounted(ext4_image, tmp_path / "mnt", "cache_size=1M") as mnt:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(60):
                rel = rng.choice(list(sources))
                want = sources[rel]
                off = rng.randrange(0, max(1, len(want)))
                n = rng.choice([1, 511, 4096, 65536, 131072, 1 << 20])
                fd = os.open(mnt / rel, os.O_RDONLY)
                try:
                    got = os.pread(fd, n, off)
                finally:
                    os.close(fd)
                if got != want[off : off + n]:
                    with lock:
                        errors.append(f"{rel} @{off}+{n}: {hashlib.sha1(got).hexdigest()}")
                with lock:
                    reads[0] += 1

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []
    assert reads[0] == 32 * 60
