"""VM disk image benchmark (not CI): the same ext4 image mounted raw and as qcow2, and over NBD
with added latency.

    .venv/bin/python -m bench.vm_bench [--dir build/vm-bench] [--size-mib 1024] [--seconds 8]
                                       [--rounds 3] [--delay-ms 2]

As root (it drops the host caches between runs). Three measurements, repeated in interleaved
rounds and reported as the median ratio with every round's value, each with its target:

1. cold random 4 KiB reads, 32 fio jobs, qcow2 / raw IOPS (target >= 0.8);
2. a cold 1 MiB stream of the whole big file, qcow2 / raw MiB/s (target >= 0.8);
3. NBD through nbdkit's delay filter (2 ms added to every read): cold random 4 KiB reads with
   32 fio jobs / with one job (target >= 16x).

The qcow2 image is ``qemu-img convert -O qcow2`` of the raw one (no compression: the format
layer, not zlib, is measured). Every run starts with a fresh mount and dropped host caches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.image import drop_caches

MIB = 1 << 20
ASYNCFS = [sys.executable, "-m", "asyncfs"]


def sh(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.strip()}")
    return r.stdout


def build(work: Path, size_mib: int) -> tuple[Path, Path]:
    """(raw ext4 image holding big.bin of ``size_mib`` random MiB, its qcow2 conversion)."""
    raw, qcow = work / "fs.raw", work / "fs.qcow2"
    if raw.exists() and qcow.exists():
        return raw, qcow
    tree = work / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    with open(tree / "big.bin", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, raw, f"{size_mib + 64}M")
    (tree / "big.bin").unlink()
    sh("qemu-img", "convert", "-O", "qcow2", raw, qcow)
    return raw, qcow


@contextlib.contextmanager
def mounted(image: str, mnt: Path, opts: str = "") -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    sh(*ASYNCFS, "mount", image, mnt, *(["-o", opts] if opts else []))
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        time.sleep(0.2)


def fio(path: Path, rw: str, bs: str, jobs: int, seconds: float | None) -> dict[str, float]:
    """IOPS and MiB/s of one fio run on ``path`` (O_DIRECT through the mount)."""
    args = ["fio", "--name=vm", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
            f"--numjobs={jobs}", "--group_reporting", "--output-format=json",
            "--ioengine=psync"]
    if seconds is not None:
        args += [f"--runtime={seconds}", "--time_based"]
    out = json.loads(sh(*args))
    read = out["jobs"][0]["read"]
    return {"iops": float(read["iops"]), "mibs": float(read["bw"]) / 1024}


def cold(image: Path) -> None:
    drop_caches(image)


def nbd_round(raw: Path, work: Path, mnt: Path, args: argparse.Namespace
              ) -> dict[str, dict[str, float]]:
    sock = work / "nbd.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    server = subprocess.Popen(
        ["nbdkit", "-f", "-r", "-U", str(sock), "-t", "64", "--filter=delay", "file", str(raw),
         f"delay-read={args.delay_ms}ms"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res: dict[str, dict[str, float]] = {}
    try:
        while not sock.exists():
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        for jobs in (1, 32):
            cold(raw)
            # a small cache keeps the random reads cold for the whole run
            with mounted(uri, mnt, "cache_size=16M") as m:
                res[f"nbd random x{jobs}"] = fio(m / "big.bin", "randread", "4k", jobs,
                                                 args.seconds)
    finally:
        server.terminate()
        server.wait()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("build/vm-bench"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds; the median ratio is reported")
    args = ap.parse_args(argv)
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw, qcow = build(work, args.size_mib)
    mnt = work / "mnt"
    ratios: dict[str, list[float]] = {"random": [], "stream": [], "nbd": []}
    for r in range(args.rounds):
        res: dict[str, dict[str, float]] = {}
        for name, img in (("raw", raw), ("qcow2", qcow)):
            cold(img)
            with mounted(str(img), mnt) as m:
                res[f"{name} random"] = fio(m / "big.bin", "randread", "4k", 32, args.seconds)
            cold(img)
            with mounted(str(img), mnt) as m:
                res[f"{name} stream"] = fio(m / "big.bin", "read", "1M", 1, None)
        res.update(nbd_round(raw, work, mnt, args))
        print(f"round {r + 1}:")
        for k, v in res.items():
            print(f"  {k:<18} {v['iops']:>10.0f} IOPS {v['mibs']:>9.1f} MiB/s")
        ratios["random"].append(res["qcow2 random"]["iops"] / res["raw random"]["iops"])
        ratios["stream"].append(res["qcow2 stream"]["mibs"] / res["raw stream"]["mibs"])
        ratios["nbd"].append(res["nbd random x32"]["iops"] / res["nbd random x1"]["iops"])

    def show(key: str) -> str:
        vals = ratios[key]
        return (f"median {statistics.median(vals):.2f}x (rounds: "
                f"{', '.join(f'{v:.2f}' for v in vals)})")

    print(f"qcow2/raw cold random 4 KiB x32: {show('random')} (target >= 0.8)")
    print(f"qcow2/raw cold stream 1 MiB:     {show('stream')} (target >= 0.8)")
    print(f"NBD +{args.delay_ms:g} ms, 32 readers / 1 reader: {show('nbd')} (target >= 16)")
    print(f"load average: {os.getloadavg()[0]:.1f} (other work on the machine skews all of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
