"""Backend-alone benchmark: random 4 KiB reads at queue depth 1 and 32 and 1 MiB sequential
reads through asyncfs.io, next to fio on the same image file (the device limit).

    .venv/bin/python -m bench.io_bench [--image PATH] [--size-mib 2048] [--seconds 3]

The image is laid out once with real data (holes would be served without I/O); before every
run its pages are dropped from the host cache (fsync + POSIX_FADV_DONTNEED) so buffered modes
start cold too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import trio

from asyncfs.io import open_image
from bench.image import uncache_file

Backend = Literal["uring", "threads"]


@dataclass(frozen=True)
class Workload:
    name: str
    bs: int
    depth: int
    sequential: bool


WORKLOADS = (
    Workload("rand4k-qd1", 4096, 1, False),
    Workload("rand4k-qd32", 4096, 32, False),
    Workload("seq1m-qd4", 1 << 20, 4, True),
)


def lay_out(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    print(f"laying out {size >> 20} MiB at {path}", file=sys.stderr)
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def run_fio(path: str, w: Workload, seconds: float, direct: bool) -> dict[str, float]:
    uncache_file(path)
    cmd = [
        "fio", "--name=w", f"--filename={path}", "--readonly", "--ioengine=io_uring",
        f"--direct={int(direct)}", f"--rw={'read' if w.sequential else 'randread'}",
        f"--bs={w.bs}", f"--iodepth={w.depth}", "--time_based", f"--runtime={seconds}",
        "--norandommap", "--randrepeat=0", "--output-format=json",
    ]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    job = out["jobs"][0]
    r = job["read"]
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["elapsed"]
    return {"iops": r["iops"], "mib_s": r["bw_bytes"] / (1 << 20),
            "cpu_us": cpu_s / max(r["total_ios"], 1) * 1e6}


async def run_ours(
    path: str, w: Workload, seconds: float, backend: Backend, direct: bool
) -> dict[str, float]:
    uncache_file(path)
    dev = await open_image(path, backend=backend, direct=direct)
    size = dev.size
    blocks = size // w.bs
    count = 0
    deadline = trio.current_time() + seconds
    next_seq = 0

    async def worker(seed: int) -> None:
        nonlocal count, next_seq
        rng = random.Random(seed)
        while trio.current_time() < deadline:
            if w.sequential:
                off = next_seq
                next_seq = (next_seq + w.bs) % (blocks * w.bs)
            else:
                off = rng.randrange(blocks) * w.bs
            await dev.read(off, w.bs)
            count += 1

    t0, c0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for i in range(w.depth):
            nursery.start_soon(worker, i)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await dev.aclose()
    return {"iops": count / elapsed, "mib_s": count * w.bs / elapsed / (1 << 20),
            "cpu_us": cpu / max(count, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="/var/tmp/asyncfs-io-bench.img")
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--modes", default="uring-direct,uring-buffered,threads-direct,"
                    "threads-buffered")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--fio-buffered", action="store_true", help="also run fio without O_DIRECT")
    ap.add_argument("--repeat", type=int, default=1,
                    help="interleave fio and asyncfs runs this many times; report medians")
    ap.add_argument("--json", help="write results here too")
    args = ap.parse_args()
    lay_out(args.image, args.size_mib << 20)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    chosen = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    for _ in range(args.repeat):
        for w in chosen:
            row = runs.setdefault(w.name, {})
            row.setdefault("fio-direct", []).append(run_fio(args.image, w, args.seconds, True))
            if args.fio_buffered:
                row.setdefault("fio-buffered", []).append(
                    run_fio(args.image, w, args.seconds, False))
            for mode in args.modes.split(","):
                backend, how = mode.split("-")
                assert backend in ("uring", "threads")
                row.setdefault(mode, []).append(
                    trio.run(run_ours, args.image, w, args.seconds, backend, how == "direct"))
    results = {
        wname: {mode: {k: statistics.median(r[k] for r in rs)
                       for k in ("iops", "mib_s", "cpu_us")}
                for mode, rs in row.items()}
        for wname, row in runs.items()
    }
    # cpu_us: CPU time (user + system) per read; for fio it is the whole fio process.
    print(f"{'workload':<13} {'mode':<17} {'IOPS':>9} {'MiB/s':>8} {'vs fio-direct':>13} "
          f"{'CPU us/read':>11}")
    for wname, res in results.items():
        ref = res["fio-direct"]
        for mode, r in res.items():
            print(f"{wname:<13} {mode:<17} {r['iops']:>9.0f} {r['mib_s']:>8.1f} "
                  f"{r['iops'] / ref['iops']:>12.0%} {r['cpu_us']:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
