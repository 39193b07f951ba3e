"""Soak: mixed fio, find and cat over a mount with a tiny cache, device latency and occasional
injected EIO, for a set time; then every byte is checked against the source tree, the stats
must add up and the daemon's RSS must have stayed flat.

    .venv/bin/python -m bench.soak                    # 10 minutes
    .venv/bin/python -m bench.soak --minutes 1 --json bench/out/soak.json

Load: ``fio`` random 4 KiB reads (O_DIRECT, 2 jobs, restarted every 20 s), a ``find``
listing loop, and ``--cat-workers`` threads that read random files whole (128 KiB reads, as
``cat`` does, after dropping the kernel's cached pages with fadvise) and compare them with
the source. Every ~6 s an EIO range (4 KiB to 256 KiB, mostly inside some file's data, else
anywhere on the device) is injected for 1.5 s with ``asyncfs fault``. A read may fail with
EIO only while a range is injected (plus a short grace for requests already in flight);
a successful read must always be exact. The mount: ``-o faults,cache_size=4M,latency=1``.

Exit status 0 when every check passed; the report (``--json``) has the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from asyncfs.cli.control import fetch_stats, request
from asyncfs.cli.options import MountOptions
from asyncfs.cli.wiring import open_stack
from asyncfs.engine.cache import MAX_IO_PAGES
from asyncfs.pagecache import PAGE_SIZE
from asyncfs.testing.imagegen import SOURCE_FIELDS, compare_trees, make_image, make_tree

MOUNT_OPTS = ("faults", "cache_size=4M", "latency=1")
EIO_EVERY_S = 6.0
EIO_FOR_S = 1.5
EIO_GRACE_S = 2.0  # a request in flight when the range is cleared may still fail
CHUNK = 128 * 1024


@dataclass
class SoakReport:
    seconds: float = 0.0
    bytes_checked_during: int = 0  # by the cat workers, while the load ran
    bytes_checked_final: int = 0  # by the full comparison at the end
    files_read: int = 0
    eio_windows: int = 0
    eio_seen: int = 0
    spurious_eio: list[str] = field(default_factory=list)
    wrong_bytes: list[str] = field(default_factory=list)
    fio_runs: int = 0
    fio_failures: list[str] = field(default_factory=list)
    find_runs: int = 0
    final_diffs: list[str] = field(default_factory=list)
    stats_problems: list[str] = field(default_factory=list)
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    rss_max_kib: int = 0
    rss_samples: list[int] = field(default_factory=list)
    final_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.spurious_eio or self.wrong_bytes or self.fio_failures
                    or self.final_diffs or self.stats_problems or not self.rss_flat)

    @property
    def rss_flat(self) -> bool:
        """End RSS within 16 MiB or 15 % of the RSS after warm-up."""
        grow = self.rss_end_kib - self.rss_start_kib
        return grow <= max(16 * 1024, self.rss_start_kib * 15 // 100)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["rss_samples"] = self.rss_samples[:: max(1, len(self.rss_samples) // 20)]
        d["ok"] = self.ok
        d["rss_flat"] = self.rss_flat
        return d


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@contextlib.contextmanager
def _mount(img: Path, mnt: Path) -> Iterator[int]:
    """Mount with the soak options; yield the daemon pid; always unmount and reap."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "asyncfs", "mount", str(img), str(mnt), "-o",
                        ",".join(MOUNT_OPTS)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"mount failed: {r.stderr.strip()}")
    pid = int(fetch_stats(str(mnt))["pid"])
    try:
        yield pid
    finally:
        for _ in range(50):
            if not _is_mounted(mnt):
                break
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            time.sleep(0.1)
        if _is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)


class _Windows:
    """When EIO ranges were injected, so a worker can tell an expected EIO from a bug."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[tuple[float, float]] = []
        self._open_since: float | None = None

    def open(self) -> None:
        with self._lock:
            self._open_since = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._open_since is not None:
                self._spans.append((self._open_since, time.monotonic()))
            self._open_since = None

    def explains(self, started: float) -> bool:
        """An EIO for a request started at ``started`` (and failing now) is expected."""
        now = time.monotonic()
        with self._lock:
            if self._open_since is not None:
                return True
            return any(s <= now and started <= e + EIO_GRACE_S for s, e in self._spans)


def _regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = Path(dirpath) / n
            if stat.S_ISREG(p.lstat().st_mode):
                out.append(p.relative_to(root))
    return sorted(out)


async def _data_runs(img: Path) -> list[tuple[int, int]]:
    """(device offset, length) of every regular file's data, read with the real stack."""
    out: list[tuple[int, int]] = []
    async with open_stack(img, MountOptions()) as stack:
        vol = stack.volume
        todo = [vol.root_ino]
        seen: set[int] = set()
        while todo:
            ino = todo.pop()
            if ino in seen:
                continue
            seen.add(ino)
            attr = await vol.getattr(ino)
            if stat.S_ISDIR(attr.mode):
                off = 0
                while batch := await vol.readdir(ino, off):
                    todo += [e.ino for e in batch if e.name not in (b".", b"..")]
                    off = batch[-1].next_off
            elif stat.S_ISREG(attr.mode) and attr.size:
                fmap = await vol.file_map(ino)
                out += [(r.dev_off, r.length) for r in await fmap.map(0, attr.size)
                        if r.dev_off is not None]
    return out


def run_soak(minutes: float, work: Path, *, cat_workers: int = 3, seed: int = 0,
             profile: str = "small") -> SoakReport:
    """Build the tree and image under ``work``, mount, load, check. Never raises for a
    finding: it goes into the report."""
    rng = random.Random(seed)
    rep = SoakReport()
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    make_tree(src, profile, seed)  # type: ignore[arg-type]
    # a larger file for fio's random reads
    (src / "fio").mkdir()
    with open(src / "fio" / "rand.dat", "wb") as f:
        f.write(random.Random(seed + 1).randbytes(24 << 20))
    img = make_image(src, work / "soak.img", "ext4")
    dev_size = img.stat().st_size
    data_runs = trio.run(_data_runs, img)
    files = _regular_files(src)
    digests = {p: hashlib.sha256((src / p).read_bytes()).hexdigest()
               for p in files if (src / p).stat().st_size < (16 << 20)}
    cat_files = sorted(digests)
    mnt = work / "mnt"
    duration = minutes * 60
    windows = _Windows()
    stop = threading.Event()
    lock = threading.Lock()

    with _mount(img, mnt) as pid:
        t_start = time.monotonic()

        def cat_worker(wid: int) -> None:
            wrng = random.Random(seed * 100 + wid)
            while not stop.is_set():
                rel = wrng.choice(cat_files)
                started = time.monotonic()
                h = hashlib.sha256()
                n = 0
                try:
                    with open(mnt / rel, "rb") as f:
                        # drop the kernel's cached pages: the bytes must come from asyncfs
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        while chunk := f.read(CHUNK):
                            h.update(chunk)
                            n += len(chunk)
                except OSError as e:
                    with lock:
                        if e.errno == errno.EIO and windows.explains(started):
                            rep.eio_seen += 1
                        else:
                            rep.spurious_eio.append(f"{rel}: {e}")
                    continue
                with lock:
                    rep.files_read += 1
                    if h.hexdigest() != digests[rel]:
                        rep.wrong_bytes.append(f"{rel}: {n} bytes, digest differs")
                    else:
                        rep.bytes_checked_during += n

        def fio_worker() -> None:
            while not stop.is_set():
                left = duration - (time.monotonic() - t_start)
                if left < 2:
                    break
                r = subprocess.run(
                    ["fio", "--name=soak", f"--filename={mnt / 'fio' / 'rand.dat'}",
                     "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
                     "--numjobs=2", "--readonly", "--time_based",
                     f"--runtime={int(min(20, left))}", "--continue_on_error=read",
                     "--output-format=terse"],
                    capture_output=True, text=True, timeout=120)
                with lock:
                    rep.fio_runs += 1
                    if r.returncode != 0:
                        rep.fio_failures.append(r.stderr.strip()[-300:])

        def find_worker() -> None:
            while not stop.is_set():
                subprocess.run(["find", str(mnt), "-xdev", "-printf", "%p %s %m\n"],
                               capture_output=True, timeout=120)
                with lock:
                    rep.find_runs += 1
                stop.wait(0.5)

        def sampler() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    rep.rss_samples.append(_rss_kib(pid))
                stop.wait(1.0)

        threads = [threading.Thread(target=cat_worker, args=(i,), daemon=True)
                   for i in range(cat_workers)]
        threads += [threading.Thread(target=t, daemon=True)
                    for t in (fio_worker, find_worker, sampler)]
        for t in threads:
            t.start()
        # EIO injection in the main thread
        next_eio = time.monotonic() + EIO_EVERY_S / 2
        while time.monotonic() - t_start < duration:
            if time.monotonic() >= next_eio:
                length = rng.choice((4096, 65536, 262144))
                if data_runs and rng.random() < 0.8:  # mostly where the readers are
                    d0, dlen = rng.choice(data_runs)
                    start = (d0 + rng.randrange(max(1, dlen))) & ~4095
                else:
                    start = rng.randrange(0, dev_size - length) & ~4095
                request(str(mnt), {"op": "fault", "action": "eio", "start": start,
                                   "end": start + length})
                windows.open()
                time.sleep(EIO_FOR_S)
                request(str(mnt), {"op": "fault", "action": "clear"})
                windows.close()
                rep.eio_windows += 1
                next_eio = time.monotonic() + EIO_EVERY_S
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(180)
        rep.seconds = round(time.monotonic() - t_start, 1)
        request(str(mnt), {"op": "fault", "action": "clear"})
        time.sleep(EIO_GRACE_S)
        # every byte, every name, mode, owner, time, link and xattr, against the source
        rep.final_diffs = compare_trees(src, mnt, fields=SOURCE_FIELDS)[:20]
        rep.bytes_checked_final = sum((src / p).stat().st_size for p in files)
        rep.final_stats = st = fetch_stats(str(mnt))
        rep.stats_problems = check_stats(st, client_eio=rep.eio_seen)
        samples = rep.rss_samples
        if samples:
            warm = samples[min(len(samples) - 1, max(1, len(samples) // 5))]
            rep.rss_start_kib = warm
            rep.rss_end_kib = _rss_kib(pid)
            rep.rss_max_kib = max(samples)
    return rep


def check_stats(st: dict[str, Any], *, client_eio: int = 0) -> list[str]:
    """Relations the counters of a quiet mount must satisfy (empty list: they add up)."""
    bad: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            bad.append(f"{what} ({ {k: st.get(k) for k in keys(what)} })")

    def keys(what: str) -> list[str]:
        return [k for k in st if k in what]

    need(st["parked_now"] == 0, "parked_now == 0 at rest")
    need(st["inflight_io"] == 0, "inflight_io == 0 at rest")
    need(st["cache_bytes"] <= st["cache_limit_bytes"], "cache_bytes <= cache_limit_bytes")
    need(st["cache_bytes"] <= st["pages_cached"] * PAGE_SIZE,
         "cache_bytes <= pages_cached * PAGE_SIZE")
    need(st["readahead_used"] <= st["readahead_pages"], "readahead_used <= readahead_pages")
    need(st["backend_nowait_reads"] <= st["backend_reads"],
         "backend_nowait_reads <= backend_reads")
    need(0 < st["backend_bytes"] <= st["backend_reads"] * MAX_IO_PAGES * PAGE_SIZE,
         "0 < backend_bytes <= backend_reads * MAX_IO_PAGES * PAGE_SIZE")
    need(st["wakeups"] <= st["parked_total"], "wakeups <= parked_total")
    need(st["evictions"] > 0, "evictions > 0 (the tiny cache cycled)")
    need(st["requests_failed"] >= client_eio, "requests_failed >= EIOs the readers saw")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--cat-workers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the tree, image and mount here")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    if shutil.which("fio") is None:
        print("soak: fio is not installed", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as es:
        work = args.workdir or Path(es.enter_context(
            tempfile.TemporaryDirectory(prefix="asyncfs-soak-")))
        work.mkdir(parents=True, exist_ok=True)
        rep = run_soak(args.minutes, work, cat_workers=args.cat_workers, seed=args.seed)
    out = json.dumps(rep.summary(), indent=1, default=str)
    print(out)
    if args.json:
        args.json.write_text(out + "\n")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
