"""Remote images: asyncfs over HTTP against httpfs2 + fuse2fs, through an emulated WAN link.

nginx serves one ext4 image on 127.0.0.1; ``bench/netproxy.py`` in front of it adds the round
trip (``--rtt-ms``, 20 by default) and caps the link (``--rate-mbit``). Both stacks read the
image through that same proxy:

- asyncfs: ``asyncfs mount http://127.0.0.1:PROXY/img/bench.img MNT``
- httpfs2 (Debian package) exposes the image as a file, and fuse2fs mounts that file.

Workloads, each on fresh mounts (cold caches on both sides):

1. ``find`` over the tree, then read 1,000 small files (one reader);
2. random 4 KiB reads of a large file by 32 fio jobs (``--fadvise_hint=1``: no kernel
   readahead), ``--seconds`` long;
3. a cold sequential read of the large file (``dd bs=1M``), against the link's bandwidth as
   curl measures it through the same proxy.

As root: ``.venv/bin/python -m bench.remote_bench`` (about 3 minutes). Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.remote_servers import delay_proxy, nginx  # noqa: E402

WORK = Path("/var/tmp/asyncfs-remote-bench")
ASYNCFS = [sys.executable, "-m", "asyncfs"]


def build_image(files: int, big_mib: int) -> Path:
    img = WORK / "root" / "bench.img"
    stamp = WORK / f"built-{files}-{big_mib}"
    if img.exists() and stamp.exists():
        return img
    tree = WORK / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    rng = random.Random(42)
    for i in range(files + files // 5):
        d = tree / "small" / f"d{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(rng.randbytes(rng.randrange(512, 12 * 1024)))
    with open(tree / "big.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))
    img.parent.mkdir(parents=True, exist_ok=True)
    size = big_mib + files * 16 // 1024 + 64
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(img), f"{size}M"],
                   check=True)
    shutil.rmtree(tree)
    for old in WORK.glob("built-*"):
        old.unlink()
    stamp.touch()
    return img


def unmount(mnt: Path) -> None:
    for _ in range(50):
        r = subprocess.run(["umount", str(mnt)], capture_output=True)
        if r.returncode == 0 or not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@contextlib.contextmanager
def asyncfs_mount(url: str, mnt: Path, *opts: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [*ASYNCFS, "mount", url, str(mnt)]
    if opts:
        cmd += ["-o", ",".join(opts)]
    subprocess.run(cmd, check=True)
    try:
        yield mnt
    finally:
        unmount(mnt)


@contextlib.contextmanager
def httpfs2_fuse2fs(url: str, base: Path) -> Iterator[Path]:
    h, m = base / "httpfs2", base / "fuse2fs"
    h.mkdir(parents=True, exist_ok=True)
    m.mkdir(parents=True, exist_ok=True)
    # single-threaded (-s): httpfs2 keeps one connection, which concurrent FUSE threads would
    # interleave requests on
    subprocess.run(["httpfs2", "-c", "/dev/null", url, str(h), "-s"], check=True)
    try:
        image = h / url.rsplit("/", 1)[1]
        for _ in range(100):
            if image.exists():
                break
            time.sleep(0.05)
        subprocess.run(["fuse2fs", "-o", "ro,fakeroot", str(image), str(m)], check=True,
                       capture_output=True)
        try:
            yield m
        finally:
            unmount(m)
    finally:
        unmount(h)


def walk_and_read(mnt: Path, n: int) -> tuple[float, int]:
    t = time.monotonic()
    found = subprocess.run(["find", str(mnt), "-type", "f"], check=True, capture_output=True,
                           text=True).stdout.split("\n")
    small = sorted(p for p in found if "/small/" in p)[:n]
    total = 0
    for p in small:
        with open(p, "rb") as f:
            total += len(f.read())
    return time.monotonic() - t, len(small)


def fio_random(path: Path, seconds: float, jobs: int) -> float:
    out = subprocess.run(
        ["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k",
         f"--numjobs={jobs}", f"--runtime={seconds}", "--time_based", "--group_reporting",
         "--ioengine=psync", "--fadvise_hint=1", "--invalidate=0", "--output-format=json",
         "--verify_state_save=0"],
        check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def sequential(path: Path) -> float:
    size = path.stat().st_size
    t = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)
    return size / (time.monotonic() - t) / 1e6


def link_rate(url: str, nbytes: int) -> float:
    t = time.monotonic()
    subprocess.run(["curl", "-sf", "-o", "/dev/null", "-r", f"0-{nbytes - 1}", url],
                   check=True)
    return nbytes / (time.monotonic() - t) / 1e6


def run(args: argparse.Namespace) -> dict[str, float]:
    img = build_image(args.files, args.big_mib)
    # asyncfs raises its FUSE connection's max_background (readahead and buffered reads
    # in flight) through fusectl, as the main benchmark does: mount it where the host has not
    fusectl = Path("/sys/fs/fuse/connections")
    if not os.path.ismount(fusectl):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(fusectl)], check=False)
    res: dict[str, float] = {"loadavg_start": os.getloadavg()[0]}
    mnts = WORK / "mnt"
    with nginx(WORK / "nginx", img.parent) as srv, \
            delay_proxy(srv.port, args.rtt_ms, args.rate_mbit) as port:
        url = f"http://127.0.0.1:{port}/compat/{img.name}"
        t = time.monotonic()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", "-r", "0-0", url], check=True)
        res["curl_first_byte_ms"] = (time.monotonic() - t) * 1000
        res["link_MBps"] = link_rate(url, min(img.stat().st_size, 256 << 20))
        print(f"link: {res['link_MBps']:.1f} MB/s, a 1-byte GET in "
              f"{res['curl_first_byte_ms']:.1f} ms (curl, new connection)", flush=True)
        for name, stack in (("asyncfs", lambda: asyncfs_mount(url, mnts / "a")),
                            ("httpfs2+fuse2fs", lambda: httpfs2_fuse2fs(url, mnts / "h"))):
            with stack() as m:
                secs, n = walk_and_read(m, args.files)
            res[f"{name}_walk_s"] = secs
            print(f"{name}: find + read {n} small files: {secs:.2f} s", flush=True)
            with stack() as m:
                iops = fio_random(m / "big.bin", args.seconds, 32)
            res[f"{name}_rand_iops"] = iops
            print(f"{name}: random 4 KiB, 32 jobs: {iops:.0f} IOPS", flush=True)
            if name == "asyncfs" or not args.skip_slow_seq:
                with stack() as m:
                    mbps = sequential(m / "big.bin")
                res[f"{name}_seq_MBps"] = mbps
                print(f"{name}: cold sequential: {mbps:.1f} MB/s", flush=True)
    res["loadavg_end"] = os.getloadavg()[0]
    res["walk_speedup"] = res["httpfs2+fuse2fs_walk_s"] / res["asyncfs_walk_s"]
    res["rand_speedup"] = res["asyncfs_rand_iops"] / max(res["httpfs2+fuse2fs_rand_iops"], 1e-9)
    res["seq_of_link"] = res["asyncfs_seq_MBps"] / res["link_MBps"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--skip-slow-seq", action="store_true",
                    help="skip httpfs2+fuse2fs's sequential read (slow)")
    args = ap.parse_args()
    res = run(args)
    print(json.dumps(res, indent=1, sort_keys=True))
    print(f"walk: {res['walk_speedup']:.1f}x httpfs2+fuse2fs (target 3x); random 4 KiB: "
          f"{res['rand_speedup']:.1f}x (target 10x); sequential: {res['seq_of_link']:.0%} "
          f"of the link (target 80%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
