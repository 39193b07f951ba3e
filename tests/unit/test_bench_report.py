"""The benchmark harness's pure parts: fio JSON parsing, ratios, issue checks, the report.

fio itself is real here (tiny jobs on a tmp file, well under a second each); nothing mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report, targets, workloads
from bench.report import (
    FioError,
    Measurement,
    Results,
    RunInfo,
    issue_checks,
    parse_fio_json,
    ratio,
    ratio_rows,
    render_markdown,
)
from bench.targets import find_daemon_pid, status_kib
from bench.workloads import FioJob, ProcWatch, run_fio, stats_delta
from tests.mutants import breaks, holds

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(4 << 20))
    return p


def _fio(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "out.json"
    subprocess.run(
        ["fio", "--output-format=json", f"--output={out}", "--readonly", "--invalidate=0",
         *args],
        check=False, capture_output=True,
    )
    return out.read_text()


@needs_fio
@pytest.mark.parametrize("variant", ["kernel", "bw_kib"])
def test_parse_real_fio_group_reporting(
    tmp_path: Path, data_file: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: reading ``bw`` (KiB/s) instead of ``bw_bytes`` gives 1/1024 the MiB/s."""
    breaks(variant, monkeypatch, report, "parse_fio_json",
           'bw += float(rd["bw_bytes"])', 'bw += float(rd["bw"])')
    text = _fio(tmp_path, "--name=t", f"--filename={data_file}", "--rw=randread", "--bs=4k",
                "--numjobs=2", "--ioengine=psync", "--group_reporting", "--size=4M")
    res = report.parse_fio_json(text)
    doc = json.loads(text)["jobs"][0]["read"]
    assert res.io_bytes == 2 * (4 << 20) == doc["io_bytes"]  # each job reads the file once
    assert res.iops == pytest.approx(doc["iops"])
    assert (res.mib_s == pytest.approx(doc["bw_bytes"] / (1 << 20))) == (variant == "kernel")
    assert res.runtime_ms == doc["runtime"]
    assert res.clat_p99_us is not None and res.clat_p99_us > 0


@needs_fio
@pytest.mark.parametrize("variant", ["kernel", "first_job_only"])
def test_parse_sums_separate_job_entries(
    tmp_path: Path, data_file: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --group_reporting fio lists each job; the totals are sums.

    Broken variant: taking ``jobs[0]`` only reports half the IOPS of two jobs.
    """
    breaks(variant, monkeypatch, report, "parse_fio_json",
           "for job in jobs:", "for job in jobs[:1]:")
    text = _fio(tmp_path, "--name=t", f"--filename={data_file}", "--rw=read", "--bs=64k",
                "--numjobs=2", "--ioengine=psync", "--size=4M")
    jobs = json.loads(text)["jobs"]
    assert len(jobs) == 2
    res = report.parse_fio_json(text)
    summed = res.iops == pytest.approx(sum(j["read"]["iops"] for j in jobs))
    assert summed == (variant == "kernel")
    if variant != "kernel":
        return
    assert res.io_bytes == 2 * (4 << 20)
    assert res.runtime_ms == max(j["read"]["runtime"] for j in jobs)


_FIO_ERROR_BROKEN = {
    "whole_text_json": ("doc, _ = json.JSONDecoder().raw_decode(text, _json_start(text))",
                        "doc = json.loads(text)"),
    "error_ignored": ('if job.get("error", 0):', "if False:"),
}


@needs_fio
@pytest.mark.parametrize("variant", ["kernel", *_FIO_ERROR_BROKEN])
def test_failed_fio_job_raises_even_after_leading_notes(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fio writes "fio: ..." notes into the output file before the JSON, and a job error in it.

    Broken variant: json.loads(text) on the whole output fails on the notes, or a parser that
    ignores ``error`` reports 0 IOPS as a measurement.
    """
    if variant != "kernel":
        breaks(variant, monkeypatch, report, "parse_fio_json", *_FIO_ERROR_BROKEN[variant])
    text = _fio(tmp_path, "--name=x", f"--filename={tmp_path}/missing/f", "--rw=read",
                "--bs=4k", "--size=1M")
    assert not text.startswith("{")  # the notes this test is about
    try:
        report.parse_fio_json(text)
        why = "measured"
    except FioError as e:
        why = str(e)
    assert ("error 2" in why) == (variant == "kernel"), why


@needs_fio
@pytest.mark.parametrize("variant", ["kernel", "average_for_both"])
def test_parse_keeps_the_bandwidth_sample_spread(
    tmp_path: Path, data_file: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slowest and fastest 0.5 s sample of a pass (a stall shows as a tiny minimum).

    Broken variant: reading ``bw`` (the average) for both reports no spread at all.
    """
    breaks(variant, monkeypatch, report, "parse_fio_json",
           'bw_lo += float(rd.get("bw_min", 0.0))\n'
           '            bw_hi += float(rd.get("bw_max", 0.0))',
           'bw_lo += float(rd.get("bw", 0.0))\n            bw_hi += float(rd.get("bw", 0.0))')
    text = _fio(tmp_path, "--name=t", f"--filename={data_file}", "--rw=read", "--bs=64k",
                "--ioengine=psync", "--time_based", "--runtime=700ms", "--bwavgtime=50")
    doc = json.loads(text)["jobs"][0]["read"]
    res = report.parse_fio_json(text)
    assert doc["bw_samples"] >= 2
    lo, hi = res.bw_sample_min_kib, res.bw_sample_max_kib
    assert lo is not None and hi is not None
    spread = lo == doc["bw_min"] and hi == doc["bw_max"] and lo < hi
    assert spread == (variant == "kernel"), (lo, hi)
    short = _fio(tmp_path, "--name=s", f"--filename={data_file}", "--rw=read", "--bs=1m",
                 "--ioengine=psync", "--size=1M")
    if json.loads(short)["jobs"][0]["read"]["bw_samples"] == 0:
        assert parse_fio_json(short).bw_sample_min_kib is None


def test_parse_rejects_garbage() -> None:
    with pytest.raises(FioError):
        parse_fio_json("fio: something went wrong\n")
    with pytest.raises(FioError):
        parse_fio_json('{"jobs": []}')


@pytest.mark.parametrize("variant", ["kernel", "not_inverted"])
def test_ratio_inverts_times_and_tolerates_missing(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: not inverting for lower-is-better makes a faster asyncfs look slower."""
    breaks(variant, monkeypatch, report, "ratio", "num, den = den, num", "pass")
    inverted = report.ratio(1.0, 1.5, lower_is_better=True) == pytest.approx(1.5)
    assert inverted == (variant == "kernel")
    if variant != "kernel":
        return
    assert ratio(300.0, 100.0) == 3.0
    assert ratio(1.0, 1.5, lower_is_better=True) == pytest.approx(1.5)
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None


def _results(cells: list[Measurement]) -> Results:
    return Results(RunInfo(command="bench/run.py", started="now", quick=False,
                           availability={"asyncfs-async": "ok", "fuse2fs": "ok", "kernel": "ok",
                                         "asyncfs-threads": "not built"}),
                   cells)


def _check(results: Results, label_part: str) -> tuple[float | None, str]:
    for c in issue_checks():
        if label_part in c.label:
            row = c.evaluate(results)
            return row.measured, row.status
    raise AssertionError(label_part)


def _approx(row: tuple[float | None, str], value: float, status: str) -> bool:
    return row[0] is not None and row[0] == pytest.approx(value) and row[1] == status


_CHECK_BROKEN = {
    "inverted_ratio": ("ratio(n, d,", "ratio(d, n,"),
    "missing_passes": ("if measured is None:", "if measured is None:\n        return CheckRow("
                       'self.label, None, self._target_text(), "PASS", "")'),
}


@pytest.mark.parametrize("variant", ["kernel", *_CHECK_BROKEN])
def test_issue_checks_pass_fail_and_na(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variants: dividing kernel by asyncfs (inverted ratio), or passing a missing cell."""
    if variant != "kernel":
        breaks(variant, monkeypatch, report.Check, "evaluate", *_CHECK_BROKEN[variant])
    res = _results([
        Measurement("rand4k", "asyncfs-async", "cold", 32, iops=21000.0),
        Measurement("rand4k", "kernel", "cold", 32, iops=15000.0),
        Measurement("rand4k", "fuse2fs", "cold", 32, iops=12000.0),
        Measurement("smallfiles", "asyncfs-async", "cold", 1, seconds=1.0),
        Measurement("smallfiles", "fuse2fs", "cold", 1, seconds=1.5),
        Measurement("memory", "asyncfs-async", "stream", 1, rss_peak_mib=170.0),
        Measurement("scaling", "asyncfs-async", "latency=1", 1, iops=900.0),
        Measurement("scaling", "asyncfs-async", "latency=1", 32, iops=18000.0),
        Measurement("scaling", "asyncfs-threads4", "latency=1", 32,
                    error="mount: latency not supported"),
    ])

    def check() -> None:
        assert _approx(_check(res, "32 jobs: asyncfs / kernel"), 1.4, "PASS")
        assert _approx(_check(res, "32 jobs: asyncfs / fuse2fs"), 1.75, "FAIL")
        assert _approx(_check(res, "many small files"), 1.5, "PASS")
        assert _check(res, "peak RSS (async)") == (170.0, "FAIL")
        assert _approx(_check(res, "32 readers / 1 reader"), 20.0, "FAIL")
        assert _check(res, "async / threads=4") == (None, "n/a")  # measured with an error
        assert _check(res, "cold sequential 1 MiB: asyncfs / kernel")[1] == "n/a"

    assert holds(check) == (variant == "kernel")


def test_ratio_rows_side_by_side() -> None:
    res = _results([
        Measurement("seq1m", "asyncfs-async", "cold", 1, mib_s=600.0),
        Measurement("seq1m", "kernel", "cold", 1, mib_s=300.0),
        Measurement("seq1m", "fuse2fs", "cold", 1, mib_s=200.0),
        Measurement("seq1m", "asyncfs-threads", "cold", 1, error="not built"),
        Measurement("seq1m", "kernel", "warm", 1, mib_s=5000.0),
    ])
    rows = ratio_rows(res, "seq1m", "mib_s",
                      ["asyncfs-async", "asyncfs-threads", "fuse2fs", "kernel"])
    assert [(r.phase, r.jobs) for r in rows] == [("cold", 1), ("warm", 1)]
    cold = rows[0]
    assert cold.ratios[("asyncfs-async", "kernel")] == 2.0
    assert cold.ratios[("asyncfs-async", "fuse2fs")] == 3.0
    assert cold.ratios[("asyncfs-threads", "kernel")] is None
    assert rows[1].ratios[("asyncfs-async", "kernel")] is None


def test_markdown_report_and_json_round_trip() -> None:
    res = _results([
        Measurement("rand4k", "asyncfs-async", "cold", 32, iops=21000.0),
        Measurement("rand4k", "kernel", "cold", 32, iops=15000.0),
        Measurement("rand4k", "asyncfs-threads", "cold", 32, error="not built"),
    ])
    again = Results.from_json(res.to_json())
    assert again == res
    md = render_markdown(again, ["bench-random.png"])
    assert "| cold | 32 | 21,000 | — |" in md
    assert "1.40x" in md
    assert "not available: not built" in md
    assert "![bench-random.png](bench-random.png)" in md


@pytest.mark.parametrize("variant", ["kernel", "fio_default_invalidate"])
def test_fio_job_argv_is_read_only_and_keeps_the_cache(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: fio's default invalidate=1 drops the cache a warm pass is measuring."""
    breaks(variant, monkeypatch, FioJob, "argv", '"--invalidate=0",', "")
    job = FioJob("w", "/m/f", "read", "1m", time_based=False, runtime_s=3, size=1 << 20)
    argv = job.argv(Path("/o.json"))
    assert {"--readonly", "--group_reporting", "--output-format=json"} <= set(argv)
    assert ("--invalidate=0" in argv) == (variant == "kernel")
    assert "--time_based" not in argv and "--size=1048576" in argv
    assert not any(a.startswith("--offset") for a in argv)
    raw = FioJob("r", "/img", "randread", "4k", numjobs=32, direct=True, offset=4096)
    assert {"--time_based", "--offset=4096", "--direct=1", "--numjobs=32"} <= set(
        raw.argv(Path("/o.json")))


@needs_fio
def test_run_fio_end_to_end(tmp_path: Path, data_file: Path) -> None:
    res = run_fio(FioJob("e2e", str(data_file), "read", "1m", time_based=False,
                         runtime_s=5, size=4 << 20), tmp_path)
    assert res.io_bytes == 4 << 20


@pytest.mark.parametrize("variant", ["kernel", "rss_at_the_end"])
def test_daemon_pid_by_mountpoint_argv_and_rss_watch(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon is the process with the mount point as one argument (a decoy whose argument
    is ``/x/mnt2`` is there for substring matching to take); its RSS peak is seen.

    Broken variant: a watcher that reads VmRSS only at the end misses the 64 MiB peak that
    was freed before it.
    """
    breaks(variant, monkeypatch, ProcWatch, "_sample", "while not self._stop.is_set():",
           "self._stop.wait()\n    for _ in range(1):")
    mnt = tmp_path / "mnt"
    code = ("import sys, time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); "
            "time.sleep(0.6); del b; time.sleep(30)")
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              f"{mnt}2"])
    proc = subprocess.Popen([sys.executable, "-c", code, str(mnt)])
    try:
        deadline = time.monotonic() + 5
        while find_daemon_pid(mnt) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert find_daemon_pid(mnt) == proc.pid
        with ProcWatch(proc.pid, interval=0.01) as w:
            time.sleep(1.2)
        peak_seen = w.rss_max_mib is not None and w.rss_max_mib >= 64
        assert peak_seen == (variant == "kernel"), w.rss_max_mib
        assert w.hwm_mib is not None and w.hwm_mib >= 64
        now = status_kib(proc.pid, "VmRSS")
        assert now is not None and now / 1024 < 64  # the peak really was transient
        assert w.cpu_s is not None and w.cpu_s >= 0
    finally:
        for p in (proc, decoy):
            p.kill()
            p.wait()


@pytest.mark.parametrize("variant", ["kernel", "after_totals"])
def test_stats_delta_is_per_cell(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken variant: printing the ``after`` totals reports earlier cells' misses as this one's."""
    breaks(variant, monkeypatch, workloads, "stats_delta",
           "{after[k] - before[k]:,}", "{after[k]:,}")
    before = {"cache_hits": 10, "cache_misses": 5, "backend_reads": 5, "uptime_s": 1}
    after = {"cache_hits": 15, "cache_misses": 1005, "backend_reads": 1005, "uptime_s": 9}
    got = workloads.stats_delta(before, after)
    assert (got == "cache_hits 5, cache_misses 1,000, backend_reads 1,000") == (
        variant == "kernel"), got
    assert stats_delta(None, after) == ""


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
@pytest.mark.parametrize("variant", ["kernel", "oldest"])
def test_daemon_pid_prefers_the_dev_fuse_holder(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked helper keeps its parent's argv; the daemon is the one with /dev/fuse open.

    Broken variant: "oldest process with the argv" picks the helper started first.
    """
    breaks(variant, monkeypatch, targets, "find_daemon_pid",
           "cand = (not holds_dev_fuse(int(name)), start, int(name))",
           "cand = (False, start, int(name))")
    mnt = tmp_path / "mnt"
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(mnt)])
    time.sleep(0.05)  # strictly older than the daemon
    daemon = subprocess.Popen([sys.executable, "-c",
                               "import os, time; fd = os.open('/dev/fuse', os.O_RDWR); "
                               "print('ok', flush=True); time.sleep(30)", str(mnt)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip() == "ok"
        assert (targets.find_daemon_pid(mnt) == daemon.pid) == (variant == "kernel")
    finally:
        for p in (helper, daemon):
            p.kill()
            p.wait()
