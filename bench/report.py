"""The harness's pure half: fio JSON parsing, the results model, ratio tables, the markdown report.

Nothing here runs a process or touches a mount, so all of it is unit-tested
(``tests/unit/test_bench_report.py``). ``run.py`` measures, stores every number as a
``Measurement`` in ``Results`` (saved as JSON), and this module turns that into the ratios the
issue asks for and the ``docs/benchmarks-results.md`` text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

# Image backends every asyncfs target runs with (``run.py --backends``): a key without a
# suffix is asyncfs over io_uring (``-o backend=uring``), ``KEY+threads`` the same
# configuration over the thread pool (``-o backend=threads``).
BACKENDS = ("uring", "threads")


def backend_key(key: str, backend: str) -> str:
    """The target key of asyncfs configuration ``key`` over image backend ``backend``."""
    return key if backend == "uring" else f"{key}+{backend}"


# Targets of the main matrix, in table order. Keys are stable (they name JSON records and
# plot series); labels are what a reader sees.
TARGET_LABELS: dict[str, str] = {
    "asyncfs-async": "asyncfs wait=async",
    "asyncfs-threads": "asyncfs wait=threads",
    "asyncfs-async+threads": "asyncfs wait=async, threads backend",
    "asyncfs-threads+threads": "asyncfs wait=threads, threads backend",
    "fuse2fs": "fuse2fs -o ro",
    "kernel": "kernel ext4 (loop, ro)",
    "raw": "fio on image file",
}
ASYNCFS_TARGETS = ("asyncfs-async", "asyncfs-threads", "asyncfs-async+threads",
                   "asyncfs-threads+threads")
REFERENCE_TARGETS = ("kernel", "fuse2fs")

# Slow-device (latency=1) configurations; asyncfs only.
SCALING_LABELS: dict[str, str] = {
    "asyncfs-async": "wait=async",
    "asyncfs-threads4": "wait=threads,threads=4",
    "asyncfs-threads32": "wait=threads,threads=32",
    "asyncfs-async+threads": "wait=async, threads backend",
    "asyncfs-threads4+threads": "wait=threads,threads=4, threads backend",
    "asyncfs-threads32+threads": "wait=threads,threads=32, threads backend",
}

Metric = Literal["iops", "mib_s", "seconds", "rss_peak_mib", "cpu_s"]
MIB = 1024 * 1024


class FioError(Exception):
    """fio's output is missing, not JSON, or reports a job error."""


@dataclass(frozen=True, slots=True)
class FioResult:
    """One fio run, summed over its jobs (``--group_reporting`` gives one entry already)."""

    iops: float
    bw_bytes: float
    io_bytes: int
    runtime_ms: int
    lat_mean_us: float
    clat_p99_us: float | None
    usr_cpu: float
    sys_cpu: float
    # Lowest and highest bandwidth of fio's 0.5 s samples (KiB/s in its JSON), summed over
    # jobs: a pass that stalls in stretches (slow storage below, a stuck daemon) shows here.
    bw_sample_min_kib: float | None = None
    bw_sample_max_kib: float | None = None

    @property
    def mib_s(self) -> float:
        return self.bw_bytes / MIB


def _json_start(text: str) -> int:
    """Index of the JSON object in fio's output: fio may print notes before it."""
    if text.startswith("{"):
        return 0
    idx = text.find("\n{")
    if idx < 0:
        raise FioError("no JSON object in fio output")
    return idx + 1


def parse_fio_json(text: str) -> FioResult:
    """Parse ``fio --output-format=json`` output (read side only; the harness never writes)."""
    try:
        doc, _ = json.JSONDecoder().raw_decode(text, _json_start(text))
    except json.JSONDecodeError as exc:
        raise FioError(f"fio output is not JSON: {exc.msg}") from exc
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(jobs, list) or not jobs:
        raise FioError("fio output has no jobs")
    iops = bw = 0.0
    io_bytes = runtime = 0
    lat_weighted = 0.0
    ios = 0
    p99: float | None = None
    usr = sys_ = 0.0
    bw_lo = bw_hi = 0.0
    sampled = False
    for job in jobs:
        if job.get("error", 0):
            raise FioError(f"fio job {job.get('jobname', '?')} failed: error {job['error']}")
        rd = job["read"]
        iops += float(rd["iops"])
        bw += float(rd["bw_bytes"])
        io_bytes += int(rd["io_bytes"])
        runtime = max(runtime, int(rd["runtime"]))
        n = int(rd.get("total_ios", 0))
        lat_weighted += float(rd.get("lat_ns", {}).get("mean", 0.0)) * n
        ios += n
        pct = rd.get("clat_ns", {}).get("percentile", {}).get("99.000000")
        if pct is not None:
            # Across separate job entries the worst p99 is the honest summary.
            p99 = max(p99 or 0.0, float(pct) / 1000.0)
        usr += float(job.get("usr_cpu", 0.0))
        sys_ += float(job.get("sys_cpu", 0.0))
        if int(rd.get("bw_samples", 0)) > 0:
            sampled = True
            bw_lo += float(rd.get("bw_min", 0.0))
            bw_hi += float(rd.get("bw_max", 0.0))
    return FioResult(
        iops=iops,
        bw_bytes=bw,
        io_bytes=io_bytes,
        runtime_ms=runtime,
        lat_mean_us=(lat_weighted / ios / 1000.0) if ios else 0.0,
        clat_p99_us=p99,
        usr_cpu=usr,
        sys_cpu=sys_,
        bw_sample_min_kib=bw_lo if sampled else None,
        bw_sample_max_kib=bw_hi if sampled else None,
    )


@dataclass(slots=True)
class Measurement:
    """One cell of the matrix. ``error`` set means "not available" (with the reason)."""

    workload: str  # rand4k | seq1m | smallfiles | scaling | memory
    target: str
    phase: str  # cold | warm | latency=1 | stream
    jobs: int = 1
    iops: float | None = None
    mib_s: float | None = None
    seconds: float | None = None
    lat_p99_us: float | None = None
    cpu_s: float | None = None
    rss_peak_mib: float | None = None
    files: int | None = None
    io_bytes: int | None = None
    error: str | None = None
    note: str = ""
    # How the cell was prepared: storage priming, cache drop, settle time, the kernel tuning
    # read back after the mount (readahead, max_background), disturbances seen during it.
    prep: str = ""

    def value(self, metric: Metric) -> float | None:
        if self.error is not None:
            return None
        v: float | None = getattr(self, metric)
        return v


@dataclass(slots=True)
class RunInfo:
    """Everything a reader needs to trust (or reproduce) the numbers."""

    command: str
    started: str
    quick: bool
    duration_s: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)
    availability: dict[str, str] = field(default_factory=dict)  # target -> "ok" | reason
    mount_options: dict[str, str] = field(default_factory=dict)
    image: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Results:
    info: RunInfo
    measurements: list[Measurement] = field(default_factory=list)

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        return m

    def get(self, workload: str, target: str, phase: str, jobs: int = 1) -> Measurement | None:
        found = None
        for m in self.measurements:
            if (m.workload, m.target, m.phase, m.jobs) == (workload, target, phase, jobs):
                found = m  # the last one wins if a cell was measured twice
        return found

    def value(
        self, workload: str, target: str, phase: str, jobs: int, metric: Metric
    ) -> float | None:
        m = self.get(workload, target, phase, jobs)
        return None if m is None else m.value(metric)

    def cells(self, workload: str) -> list[tuple[str, int]]:
        """(phase, jobs) pairs measured for a workload, in first-seen order."""
        seen: list[tuple[str, int]] = []
        for m in self.measurements:
            if m.workload == workload and (m.phase, m.jobs) not in seen:
                seen.append((m.phase, m.jobs))
        return seen

    def to_json(self) -> str:
        return json.dumps(
            {"info": asdict(self.info), "measurements": [asdict(m) for m in self.measurements]},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Results:
        doc = json.loads(text)
        return cls(
            info=RunInfo(**doc["info"]),
            measurements=[Measurement(**m) for m in doc["measurements"]],
        )


def ratio(num: float | None, den: float | None, lower_is_better: bool = False) -> float | None:
    """num relative to den as a speed-up (>1 means num is better); None if either is missing."""
    if num is None or den is None:
        return None
    if lower_is_better:
        num, den = den, num
    if den <= 0:
        return None
    return num / den


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    target: str
    phase: str
    jobs: int
    metric: Metric

    def describe(self) -> str:
        return f"{self.target} {self.workload}/{self.phase}/{self.jobs}"


@dataclass(frozen=True, slots=True)
class Check:
    """One target of the issue: ``num/den >= bound`` (a ratio) or ``num <= bound`` (a cap)."""

    label: str
    num: Cell
    den: Cell | None
    bound: float | None  # None: reported, no target
    cap: bool = False  # num <= bound (absolute), not a ratio

    def evaluate(self, results: Results) -> CheckRow:
        n = results.value(*_cell_args(self.num))
        if self.den is None:
            measured = n
        else:
            d = results.value(*_cell_args(self.den))
            measured = ratio(n, d, lower_is_better=self.num.metric == "seconds")
        if measured is None:
            missing = [
                c.describe()
                for c in (self.num, self.den)
                if c is not None and results.value(*_cell_args(c)) is None
            ]
            return CheckRow(self.label, None, self._target_text(), "n/a", ", ".join(missing))
        if self.bound is None:
            status = "info"
        elif self.cap:
            status = "PASS" if measured <= self.bound else "FAIL"
        else:
            status = "PASS" if measured >= self.bound else "FAIL"
        return CheckRow(self.label, measured, self._target_text(), status, "")

    def _target_text(self) -> str:
        if self.bound is None:
            return "(reported)"
        if self.cap:
            return f"<= {self.bound:g} MiB"
        return f">= {self.bound:g}x"


def _cell_args(c: Cell) -> tuple[str, str, str, int, Metric]:
    return (c.workload, c.target, c.phase, c.jobs, c.metric)


@dataclass(frozen=True, slots=True)
class CheckRow:
    label: str
    measured: float | None
    target: str
    status: str  # PASS | FAIL | info | n/a
    missing: str


def issue_checks(scaling_readers: int = 32) -> list[Check]:
    """The targets of issue 6, in its order. asyncfs means wait=async unless it says threads."""
    a = "asyncfs-async"
    r = scaling_readers

    def rnd(t: str, phase: str, jobs: int) -> Cell:
        return Cell("rand4k", t, phase, jobs, "iops")

    def seq(t: str) -> Cell:
        return Cell("seq1m", t, "cold", 1, "mib_s")

    def small(t: str) -> Cell:
        return Cell("smallfiles", t, "cold", 1, "seconds")

    def slow(t: str, n: int) -> Cell:
        return Cell("scaling", t, "latency=1", n, "iops")

    return [
        Check("cold random 4 KiB, 32 jobs: asyncfs / kernel loop", rnd(a, "cold", 32),
              rnd("kernel", "cold", 32), 1.3),
        Check("cold random 4 KiB, 32 jobs: asyncfs / fuse2fs", rnd(a, "cold", 32),
              rnd("fuse2fs", "cold", 32), 1.8),
        Check("cold sequential 1 MiB: asyncfs / kernel loop", seq(a), seq("kernel"), 2.0),
        Check("cold sequential 1 MiB: asyncfs / fuse2fs", seq(a), seq("fuse2fs"), 2.0),
        Check("warm random 4 KiB, 8 jobs: asyncfs / fuse2fs", rnd(a, "warm", 8),
              rnd("fuse2fs", "warm", 8), 1.0),
        Check("many small files, cold: asyncfs / fuse2fs (time ratio)", small(a),
              small("fuse2fs"), 1.0),
        Check(f"slow device: {r} readers / 1 reader (async)", slow(a, r), slow(a, 1), 25.0),
        Check(f"slow device, {r} readers: async / threads=4", slow(a, r),
              slow("asyncfs-threads4", r), 4.0),
        Check(f"slow device, {r} readers: async / threads=32", slow(a, r),
              slow("asyncfs-threads32", r), None),
        Check("memory: 2 GiB stream, cache_size=64M, daemon peak RSS (async)",
              Cell("memory", a, "stream", 1, "rss_peak_mib"), None, 160.0, cap=True),
        Check("memory: 2 GiB stream, cache_size=64M, daemon peak RSS (threads)",
              Cell("memory", "asyncfs-threads", "stream", 1, "rss_peak_mib"), None, None),
    ]


def threads_backend_checks(results: Results | None = None) -> list[Check]:
    """asyncfs (wait=async) over the threads backend against fuse2fs: at least as fast in
    every cell the two share, reported in a table of their own. With ``results``, only the
    checks whose cells that run measured (or tried to)."""
    t = backend_key("asyncfs-async", "threads")
    rows: list[Check] = []
    for phase, jobs in (("cold", 1), ("cold", 8), ("cold", 32), ("warm", 1), ("warm", 8),
                        ("warm", 32)):
        rows.append(Check(f"threads backend, {phase} random 4 KiB, {jobs} jobs: / fuse2fs",
                          Cell("rand4k", t, phase, jobs, "iops"),
                          Cell("rand4k", "fuse2fs", phase, jobs, "iops"), 1.0))
    for phase in ("cold", "warm"):
        rows.append(Check(f"threads backend, {phase} sequential 1 MiB: / fuse2fs",
                          Cell("seq1m", t, phase, 1, "mib_s"),
                          Cell("seq1m", "fuse2fs", phase, 1, "mib_s"), 1.0))
    rows.append(Check("threads backend, many small files, cold: / fuse2fs (time ratio)",
                      Cell("smallfiles", t, "cold", 1, "seconds"),
                      Cell("smallfiles", "fuse2fs", "cold", 1, "seconds"), 1.0))
    if results is None:
        return rows
    return [c for c in rows if results.get(*_cell_args(c.num)[:4]) is not None]


@dataclass(frozen=True, slots=True)
class RatioRow:
    """One row of a side-by-side table: a value per target and asyncfs-vs-reference ratios."""

    phase: str
    jobs: int
    values: dict[str, float | None]
    ratios: dict[tuple[str, str], float | None]  # (asyncfs target, reference) -> ratio


def ratio_rows(
    results: Results, workload: str, metric: Metric, targets: Sequence[str]
) -> list[RatioRow]:
    rows = []
    for phase, jobs in results.cells(workload):
        values = {t: results.value(workload, t, phase, jobs, metric) for t in targets}
        ratios = {
            (a, ref): ratio(values.get(a), values.get(ref), lower_is_better=metric == "seconds")
            for a in ASYNCFS_TARGETS
            for ref in REFERENCE_TARGETS
            if a in targets and ref in targets
        }
        rows.append(RatioRow(phase, jobs, values, ratios))
    return rows


# ---- markdown -----------------------------------------------------------------------------


def fmt(v: float | None, metric: Metric | str = "") -> str:
    if v is None:
        return "—"
    if metric == "iops":
        return f"{v:,.0f}"
    if metric in ("mib_s", "rss_peak_mib"):
        return f"{v:,.1f}"
    if metric in ("seconds", "cpu_s"):
        return f"{v:.2f}"
    return f"{v:.2f}"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _short(t: str) -> str:
    key, _, backend = t.partition("+")
    short = {"asyncfs-async": "async", "asyncfs-threads": "threads"}.get(key, key)
    return f"{short} ({backend} backend)" if backend else short


def side_by_side(
    results: Results, workload: str, metric: Metric, targets: Sequence[str], unit: str
) -> list[str]:
    rows = ratio_rows(results, workload, metric, targets)
    if not rows:
        return ["(not measured)"]
    ratio_keys = list(rows[0].ratios)
    header = ["phase", "jobs"] + [f"{TARGET_LABELS.get(t, t)} ({unit})" for t in targets]
    header += [f"{_short(a)}/{ref}" for a, ref in ratio_keys]
    body = [
        [r.phase, str(r.jobs)]
        + [fmt(r.values[t], metric) for t in targets]
        + [fmt_ratio(r.ratios[k]) for k in ratio_keys]
        for r in rows
    ]
    return md_table(header, body)


def errors_of(results: Results) -> list[str]:
    """One line per distinct (target, reason) of the cells that could not be measured."""
    seen: dict[tuple[str, str], list[str]] = {}
    for m in results.measurements:
        if m.error is not None:
            seen.setdefault((m.target, m.error), []).append(f"{m.workload}/{m.phase}/{m.jobs}")
    return [
        f"- `{t}` ({len(cells)} cells, e.g. {cells[0]}): {reason}"
        for (t, reason), cells in seen.items()
    ]


def render_markdown(results: Results, plots: Sequence[str] = ()) -> str:
    info = results.info
    out: list[str] = [
        "# asyncfs benchmark results",
        "",
        "Generated by `bench/run.py` — see [benchmarks.md](benchmarks.md) for what each workload "
        "does. Do not edit by hand; rerun the command.",
        "",
        f"- Command: `{info.command}`",
        f"- Started: {info.started} UTC, took {info.duration_s:.0f} s"
        + (" (**--quick**: reduced matrix, short runs; not the issue's numbers)" if info.quick
           else ""),
    ]
    out += [f"- {k}: {v}" for k, v in info.machine.items()]
    out += [f"- image: {k} = {v}" for k, v in info.image.items()]
    out += ["", "## Targets", ""]
    out += md_table(
        ["target", "mount options", "available"],
        [
            [TARGET_LABELS.get(t, t), f"`{info.mount_options.get(t, '')}`" if
             info.mount_options.get(t) else "", st if st == "ok" else f"not available: {st}"]
            for t, st in info.availability.items()
        ],
    )
    if info.notes:
        out += ["", *[f"- {n}" for n in info.notes]]

    out += ["", "## Issue targets", ""]
    out += md_table(
        ["check", "measured", "target", "result"],
        [
            [
                c.label,
                (fmt(c.measured, "rss_peak_mib") + " MiB") if c.target.startswith("<=")
                or (c.measured is not None and "RSS" in c.label)
                else fmt_ratio(c.measured),
                c.target,
                c.status + (f" (missing: {c.missing})" if c.missing else ""),
            ]
            for c in (chk.evaluate(results) for chk in issue_checks())
        ],
    )
    tb = [chk.evaluate(results) for chk in threads_backend_checks(results)]
    if tb:
        out += ["", "## The threads backend against fuse2fs (asyncfs wait=async)", ""]
        out += md_table(
            ["check", "measured", "target", "result"],
            [[c.label, fmt_ratio(c.measured), c.target,
              c.status + (f" (missing: {c.missing})" if c.missing else "")] for c in tb],
        )

    main = [t for t in TARGET_LABELS if t in info.availability]
    fuse_like = [t for t in main if t != "raw"]
    out += ["", "## Random 4 KiB reads (IOPS, direct=1 on the mount, psync)", ""]
    out += side_by_side(results, "rand4k", "iops", main, "IOPS")
    out += ["", "## Sequential 1 MiB reads of the 2 GiB file (MiB/s, buffered)", ""]
    out += side_by_side(results, "seq1m", "mib_s", main, "MiB/s")
    out += ["", "## Many small files: find + read every file, cold (seconds, lower is better)", ""]
    out += side_by_side(results, "smallfiles", "seconds", fuse_like, "s")

    out += ["", "## Slow device (asyncfs -o latency=1): random 4 KiB direct=1, cache misses", ""]
    readers = sorted({m.jobs for m in results.measurements if m.workload == "scaling"})
    if readers:
        header = ["readers"]
        for lab in SCALING_LABELS.values():
            header += [f"{lab} IOPS", f"{lab} CPU s", f"{lab} RSS MiB"]
        header += ["async/threads=4", "async/threads=32"]
        body = []
        for n in readers:
            row = [str(n)]
            for t in SCALING_LABELS:
                m = results.get("scaling", t, "latency=1", n)
                row += [
                    fmt(m.value("iops") if m else None, "iops"),
                    fmt(m.value("cpu_s") if m else None, "cpu_s"),
                    fmt(m.value("rss_peak_mib") if m else None, "rss_peak_mib"),
                ]
            a = results.value("scaling", "asyncfs-async", "latency=1", n, "iops")
            row += [
                fmt_ratio(ratio(a, results.value("scaling", t, "latency=1", n, "iops")))
                for t in ("asyncfs-threads4", "asyncfs-threads32")
            ]
            body.append(row)
        out += md_table(header, body)
    else:
        out += ["(not measured)"]

    out += ["", "## Memory: streaming the 2 GiB file with cache_size=64M", ""]
    mem = [m for m in results.measurements if m.workload == "memory"]
    if mem:
        out += md_table(
            ["daemon", "peak RSS (MiB)", "CPU s", "MiB/s", "note"],
            [
                [TARGET_LABELS.get(m.target, m.target), fmt(m.value("rss_peak_mib"),
                 "rss_peak_mib"), fmt(m.value("cpu_s"), "cpu_s"), fmt(m.value("mib_s"),
                 "mib_s"), (m.error and f"not available: {m.error}") or m.note]
                for m in mem
            ],
        )
    else:
        out += ["(not measured)"]

    notes = [m for m in results.measurements
             if m.error is None and m.target.startswith("asyncfs") and m.note]
    if notes:
        out += ["", "## asyncfs cells: daemon counters and options", ""]
        out += [f"- `{m.target}` {m.workload}/{m.phase}/{m.jobs}: {m.note}" for m in notes]

    preps = [m for m in results.measurements if m.prep]
    if preps:
        out += ["", "## Preparation of each cell (storage priming, settle, kernel tuning)", ""]
        out += [f"- `{m.target}` {m.workload}/{m.phase}/{m.jobs}: {m.prep}" for m in preps]

    errs = errors_of(results)
    if errs:
        out += ["", "## Cells not measured", "", *errs]
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{p}]({p})" for p in plots]
    out.append("")
    return "\n".join(out)

