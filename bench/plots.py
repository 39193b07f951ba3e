"""The PNG plots of a results set (matplotlib, Agg backend): random IOPS, sequential MiB/s, the
slow-device scaling curve. Each function returns the file name it wrote, or None if the data
for that plot is absent."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the harness runs as root from a terminal or over ssh
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import NullLocator

from bench.report import SCALING_LABELS, TARGET_LABELS, Results

COLORS = {"asyncfs-async": "tab:blue", "asyncfs-threads": "tab:cyan",
          "asyncfs-async+threads": "tab:purple", "asyncfs-threads+threads": "tab:pink",
          "fuse2fs": "tab:green", "kernel": "tab:red", "raw": "tab:gray"}


def _subtitle(results: Results) -> str:
    m = results.info.machine
    q = " (--quick)" if results.info.quick else ""
    return f"{m.get('cpus', '?')} CPUs, kernel {m.get('kernel', '?')}{q}"


def _bars(ax: Axes, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Grouped bars, one colour per target; a missing value is drawn as an "n/a" label."""
    width = 0.8 / max(len(series), 1)
    top = max((v for vals in series.values() for v in vals if v is not None), default=1.0)
    for i, (t, vals) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in vals], width, label=TARGET_LABELS.get(t, t),
               color=COLORS.get(t))
        for x, v in zip(xs, vals, strict=True):
            if v is None:
                ax.text(x, top * 0.01, "n/a", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="dimgray")
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)


def plot_random(results: Results, out: Path) -> str | None:
    phases = [p for p in ("cold", "warm") if any(
        m.workload == "rand4k" and m.phase == p for m in results.measurements)]
    if not any(m.workload == "rand4k" and m.error is None for m in results.measurements):
        return None
    targets = [t for t in TARGET_LABELS if t in results.info.availability]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.4), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        jobs = sorted({m.jobs for m in results.measurements
                       if m.workload == "rand4k" and m.phase == phase})
        series = {t: [results.value("rand4k", t, phase, j, "iops") for j in jobs]
                  for t in targets if not (t == "raw" and phase == "warm")}
        _bars(ax, [f"{j} jobs" for j in jobs], series)
        ax.set_ylabel("IOPS")
        ax.set_title(f"random 4 KiB, direct=1, psync — {phase}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"asyncfs benchmark: random reads — {_subtitle(results)}", fontsize=10)
    fig.tight_layout()
    name = "bench-random.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_sequential(results: Results, out: Path) -> str | None:
    if not any(m.workload == "seq1m" and m.error is None for m in results.measurements):
        return None
    targets = [t for t in TARGET_LABELS if t in results.info.availability]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, phase in zip(axes, ("cold", "warm"), strict=True):
        series = {t: [results.value("seq1m", t, phase, 1, "mib_s")] for t in targets}
        _bars(ax, ["1 MiB reads, buffered"], series)
        ax.set_ylabel("MiB/s")
        ax.set_title(f"sequential, {phase}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"asyncfs benchmark: sequential reads of a 2 GiB file — {_subtitle(results)}",
                 fontsize=10)
    fig.tight_layout()
    name = "bench-sequential.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_scaling(results: Results, out: Path) -> str | None:
    cells = [m for m in results.measurements if m.workload == "scaling" and m.error is None]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, label in SCALING_LABELS.items():
        pts = sorted((m.jobs, m.iops or 0.0) for m in cells if m.target == t)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    one = results.value("scaling", "asyncfs-async", "latency=1", 1, "iops")
    if one:
        xs = sorted({m.jobs for m in cells})
        ax.plot(xs, [one * x for x in xs], linestyle=":", color="gray",
                label="linear from 1 reader (async)")
    ax.set_xscale("log", base=2)
    readers = sorted({m.jobs for m in cells})
    ax.set_xticks(readers, [str(n) for n in readers])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent readers (fio numjobs)")
    ax.set_ylabel("IOPS")
    ax.set_title(f"slow device: asyncfs -o latency=1, random 4 KiB misses\n{_subtitle(results)}",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    name = "bench-scaling.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_plots(results: Results, out: Path) -> list[str]:
    names = [f(results, out) for f in (plot_random, plot_sequential, plot_scaling)]
    return [n for n in names if n is not None]
