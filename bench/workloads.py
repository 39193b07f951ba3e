"""The workloads: fio jobs, the small-file walk, and the daemon CPU/RSS watcher around them.

Each function measures one cell on an already-mounted target and returns a ``Measurement``;
mounting, cold-cache preparation and the order of cells belong to ``run.py``. fio always runs
with ``--readonly --invalidate=0`` (a warm pass must not have fio drop the cache it measures;
cold is made by ``image.drop_caches`` + a fresh mount instead) and ``--output-format=json``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench.image import FileInfo
from bench.report import FioError, FioResult, Measurement, parse_fio_json
from bench.targets import HungError, Mounted, cpu_seconds, status_kib

FIO_GRACE_S = 60.0  # beyond the job's own runtime, before we call the mount hung


@dataclass(frozen=True, slots=True)
class FioJob:
    """One fio invocation (read-only). ``argv`` is pure so the tests can check it."""

    name: str
    filename: str
    rw: str  # randread | read
    bs: str
    numjobs: int = 1
    direct: bool = False
    runtime_s: float = 5.0
    time_based: bool = True  # False: read ``size`` once, ``runtime_s`` is only a cap
    size: int | None = None
    offset: int = 0
    randrepeat: bool = True  # fio seeds each job differently either way
    ioengine: str = "psync"

    def argv(self, output: Path) -> list[str]:
        a = [
            "fio", f"--name={self.name}", f"--filename={self.filename}", f"--rw={self.rw}",
            f"--bs={self.bs}", f"--numjobs={self.numjobs}", f"--direct={int(self.direct)}",
            f"--ioengine={self.ioengine}", f"--runtime={self.runtime_s:g}",
            f"--randrepeat={int(self.randrepeat)}", "--readonly", "--invalidate=0",
            "--group_reporting", "--output-format=json", f"--output={output}",
        ]
        if self.time_based:
            a.append("--time_based")
        if self.size is not None:
            a.append(f"--size={self.size}")
        if self.offset:
            a.append(f"--offset={self.offset}")
        return a


def run_fio(job: FioJob, out_dir: Path, on_hang: Callable[[], None] | None = None) -> FioResult:
    """Run fio in its own process group (so its job processes can be killed as one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{job.name}.json"
    output.unlink(missing_ok=True)
    proc = subprocess.Popen(
        job.argv(output), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=job.runtime_s + FIO_GRACE_S)
    except subprocess.TimeoutExpired:
        if on_hang is not None:
            on_hang()  # readers blocked in a FUSE request only return once it is aborted
        _kill_group(proc)
        raise HungError(f"fio did not finish within {job.runtime_s + FIO_GRACE_S:.0f} s") from None
    except BaseException:
        _kill_group(proc)  # Ctrl-C: fio is in its own session and would run on
        raise
    if proc.returncode != 0 and not output.exists():
        raise FioError(f"fio exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
    try:
        return parse_fio_json(output.read_text())
    except FioError as exc:
        tail = err.strip().splitlines()[-1:] if err else []
        raise FioError(f"{exc} {tail}") from exc


def _kill_group(proc: subprocess.Popen[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass(slots=True)
class ProcWatch:
    """Samples a daemon's VmRSS (every ``interval`` s) and its CPU time over a ``with`` block.

    ``rss_max_mib`` is the sampled peak inside the block; ``hwm_mib`` is the kernel's VmHWM at
    the end (the peak since the daemon started: the right number for a fresh mount).
    """

    pid: int | None
    interval: float = 0.02
    cpu_s: float | None = None
    rss_max_mib: float | None = None
    hwm_mib: float | None = None
    _cpu0: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ProcWatch:
        if self.pid is None:
            return self
        with contextlib.suppress(OSError):
            self._cpu0 = cpu_seconds(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        assert self.pid is not None
        while not self._stop.is_set():
            kib = status_kib(self.pid, "VmRSS")
            if kib is not None:
                self.rss_max_mib = max(self.rss_max_mib or 0.0, kib / 1024)
            self._stop.wait(self.interval)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.pid is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        hwm = status_kib(self.pid, "VmHWM")
        self.hwm_mib = None if hwm is None else hwm / 1024
        with contextlib.suppress(OSError):
            self.cpu_s = cpu_seconds(self.pid) - self._cpu0

    @property
    def peak_mib(self) -> float | None:
        vals = [v for v in (self.rss_max_mib, self.hwm_mib) if v is not None]
        return max(vals) if vals else None


@contextlib.contextmanager
def watched(m: Mounted) -> Iterator[ProcWatch]:
    with ProcWatch(m.pid) as w:
        yield w


def fio_cell(
    m: Mounted, job: FioJob, workload: str, phase: str, out_dir: Path,
    on_hang: Callable[[], None] | None = None, hwm: bool = False,
) -> Measurement:
    """Run one fio job on a mount and turn it into a Measurement (with daemon CPU and RSS)."""
    before = m.stats()
    with watched(m) as w:
        res = run_fio(job, out_dir, on_hang)
    counters = stats_delta(before, m.stats())
    spread = ""
    if workload in ("seq1m", "memory") and res.bw_sample_min_kib is not None \
            and res.bw_sample_max_kib is not None:
        spread = (f"; 0.5 s samples {res.bw_sample_min_kib / 1024:,.0f}-"
                  f"{res.bw_sample_max_kib / 1024:,.0f} MiB/s")
    return Measurement(
        workload=workload, target=m.target, phase=phase, jobs=job.numjobs,
        iops=res.iops, mib_s=res.mib_s, lat_p99_us=res.clat_p99_us,
        seconds=res.runtime_ms / 1000.0, cpu_s=w.cpu_s, io_bytes=res.io_bytes,
        rss_peak_mib=w.peak_mib if hwm else w.rss_max_mib,
        note=f"{res.io_bytes / (1 << 20):.0f} MiB read" + spread
        + (f"; {counters}" if counters else ""),
    )


STATS_SHOWN = ("cache_hits", "cache_misses", "backend_reads", "parked_total", "evictions")


def stats_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> str:
    """The daemon's counters over one cell (asyncfs ``stats --json``), as a short note."""
    if before is None or after is None:
        return ""
    parts = [f"{k} {after[k] - before[k]:,}" for k in STATS_SHOWN if k in after and k in before]
    return ", ".join(parts)


def random_job(m: Mounted, info: FileInfo, name: str, jobs: int, runtime_s: float,
               span: int | None = None, randrepeat: bool = True) -> FioJob:
    """Random 4 KiB direct reads over the file (or its first ``span`` bytes)."""
    fname, off, size = m.file_spec(info)
    return FioJob(name, fname, "randread", "4k", numjobs=jobs, direct=True,
                  runtime_s=runtime_s, size=min(size, span or size), offset=off,
                  randrepeat=randrepeat)


def sequential_job(m: Mounted, info: FileInfo, name: str, cap_s: float,
                   span: int | None = None) -> FioJob:
    """One buffered pass of 1 MiB reads over the file: size-based, ``cap_s`` only a cap."""
    fname, off, size = m.file_spec(info)
    return FioJob(name, fname, "read", "1m", numjobs=1, direct=False, runtime_s=cap_s,
                  time_based=False, size=min(size, span or size), offset=off)


def warm_up(path: Path, span: int) -> float:
    """Read the first ``span`` bytes of a file through the mount once (1 MiB reads); seconds."""
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        left = span
        while left > 0:
            n = len(f.read(min(1 << 20, left)))
            if n == 0:
                break
            left -= n
    return time.monotonic() - t0


def small_files(m: Mounted, tree: str, expect_files: int, expect_bytes: int,
                out_dir: Path, timeout_s: float = 300.0,
                on_hang: Callable[[], None] | None = None) -> Measurement:
    """``find TREE -type f | xargs cat``, timed; the file count and byte total are checked."""
    assert m.root is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = out_dir / f"{m.target}-smallfiles.list"
    script = 'set -o pipefail; find "$1" -type f -print0 | tee "$2" | xargs -0 cat | wc -c'
    with watched(m) as w:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["bash", "-c", script, "bash", str(m.root / tree), str(listing)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if on_hang is not None:
                on_hang()
            _kill_group(proc)
            raise HungError(f"find+cat did not finish within {timeout_s:.0f} s") from None
        except BaseException:
            _kill_group(proc)
            raise
        seconds = time.monotonic() - t0
    files = listing.read_bytes().count(b"\0")
    meas = Measurement(workload="smallfiles", target=m.target, phase="cold", jobs=1,
                       seconds=seconds, files=files, cpu_s=w.cpu_s, rss_peak_mib=w.rss_max_mib,
                       note=f"{files / seconds:,.0f} files/s")
    nbytes = int(out.strip() or -1)
    if proc.returncode != 0:
        meas.error = f"find/cat failed ({proc.returncode}): {err.strip()[-200:]}"
    elif files != expect_files or nbytes != expect_bytes:
        meas.error = (f"wrong result: {files} files / {nbytes} bytes, expected "
                      f"{expect_files} / {expect_bytes}")
    return meas
