"""Mount options: the `-o` grammar, defaults and validation (a one-line UsageError if bad)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from asyncfs.errors import UsageError
from asyncfs.io import parse_latency

_SIZE_RE = re.compile(r"^(\d+)([kmgt]?)(i?b?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

# FUSE/VFS options passed straight to the kernel; the image is never writable, so "rw" is refused.
_PASSTHROUGH_FLAGS = frozenset(
    {"allow_other", "allow_root", "default_permissions", "nodev", "nosuid", "noexec",
     "dev", "suid", "exec", "noatime", "relatime", "atime", "auto_unmount"}
)
_PASSTHROUGH_VALUES = frozenset({"fsname", "subtype"})


def parse_size(text: str, what: str) -> int:
    """``4096``, ``64M``, ``1GiB``, ``128k`` -> bytes (binary units, as mount tools use)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"malformed size for {what}: {text!r} (expected e.g. 4096, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _parse_int(text: str, what: str, lo: int, hi: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"malformed number for {what}: {text!r}") from None
    if not lo <= value <= hi:
        raise UsageError(f"{what}={value} is out of range ({lo}..{hi})")
    return value


# Measured (docs/benchmarks.md): a 1 GiB cache served random 4 KiB reads of a 1 GiB file on a
# second pass at ~23-25k IOPS against ~8.7k with 256 MiB, but a cache that simply fills costs
# every fresh mount a first touch of that much memory (this VM: ~2.7 s per GiB), which halved a
# cold 2 GiB stream. So ``cache_size`` is a ceiling: the cache starts at CACHE_START and grows
# past it only on refaults (a page read again soon after it was reclaimed: evidence that more
# memory turns misses into hits, mm/workingset.c). A stream never refaults and stays at the
# start; a re-read working set grows the cache up to the ceiling. The default ceiling is an
# eighth of the machine's memory, between 64 MiB and 2 GiB.
CACHE_START = 256 << 20
CACHE_MAX_DEFAULT = 2 << 30
CACHE_MIN_DEFAULT = 64 << 20


def default_cache_size(meminfo: str = "/proc/meminfo") -> int:
    """The default ``cache_size`` (the ceiling): an eighth of the machine's memory, between
    64 MiB and 2 GiB (the daemon never takes a large share of a small machine). CACHE_START
    where the memory size cannot be read (no room to grow without knowing the machine)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
            else:
                return CACHE_START
    except (OSError, ValueError, IndexError):
        return CACHE_START
    share = (total // 8) & ~((1 << 20) - 1)  # whole MiB
    return max(CACHE_MIN_DEFAULT, min(CACHE_MAX_DEFAULT, share))


def cache_start(cache_size: int) -> int:
    """Where a cache with ceiling ``cache_size`` starts: CACHE_START, or the whole ceiling if
    that is smaller (an explicit small ``cache_size`` is a fixed bound, as before)."""
    return min(cache_size, CACHE_START)


@dataclass
class MountOptions:
    """Everything ``-o`` can set; defaults are the measured ones documented in docs/usage.md."""

    partition: int | None = None
    offset: int | None = None
    sizelimit: int | None = None
    cache_size: int = field(default_factory=default_cache_size)
    direct_io: bool = False
    wait: Literal["async", "threads"] = "async"
    threads: int = 16
    # Measured (docs/benchmarks.md): cold sequential reads gain ~1.8x from 128K to 16M on the
    # O_DIRECT backend; 8M keeps a window's I/O within a small cache's budget.
    readahead: int = 8 * 2**20
    kernel_readahead: int = 1 * 2**20
    max_background: int = 64
    max_tasks: int = 99
    # idle FUSE workers kept: fewer means a worker started and ended around every burst of
    # misses (cold random, 32 jobs: ~10k IOPS at 1, 12-13k at 16; docs/benchmarks.md)
    min_tasks: int = 16
    spin_us: int = 50  # watch an empty request queue this long before parking (0: never)
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    faults: bool = False
    backend: Literal["auto", "uring", "threads"] = "auto"
    odirect: bool | None = None
    verify_csum: bool = True
    debug: bool = False
    fuse_flags: set[str] = field(default_factory=set)
    fuse_values: dict[str, str] = field(default_factory=dict)

    def fuse_options(self, image_name: str) -> set[str]:
        """The option set handed to ``pyfuse3.init`` (always read-only)."""
        opts = {"ro", "default_permissions", *self.fuse_flags}
        values = {"fsname": f"asyncfs:{image_name}", "subtype": "asyncfs", **self.fuse_values}
        opts.update(f"{k}={v}" for k, v in values.items())
        return opts


def parse_options(groups: list[str]) -> MountOptions:
    """Parse every ``-o`` argument (each a comma-separated list) into one MountOptions."""
    opts = MountOptions()
    for group in groups:
        for item in group.split(","):
            item = item.strip()
            if item:
                _apply(opts, item)
    if opts.partition is not None and opts.offset is not None:
        raise UsageError("partition= and offset= cannot be combined")
    if opts.sizelimit is not None and opts.offset is None:
        raise UsageError("sizelimit= needs offset=")
    return opts


def _apply(opts: MountOptions, item: str) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    has_value = bool(sep)

    def need_value() -> str:
        if not has_value or not value:
            raise UsageError(f"option {key} needs a value ({key}=...)")
        return value

    def no_value() -> None:
        if has_value:
            raise UsageError(f"option {key} takes no value")

    if key == "partition":
        opts.partition = _parse_int(need_value(), key, 1, 256)
    elif key == "offset":
        opts.offset = parse_size(need_value(), key)
    elif key == "sizelimit":
        opts.sizelimit = parse_size(need_value(), key)
        if opts.sizelimit == 0:
            raise UsageError("sizelimit=0 leaves nothing to mount")
    elif key == "cache_size":
        opts.cache_size = parse_size(need_value(), key)
        if opts.cache_size < 64 * 1024:
            raise UsageError(f"cache_size={value} is too small (at least 64K)")
    elif key == "direct_io":
        no_value()
        opts.direct_io = True
    elif key == "wait":
        v = need_value()
        if v not in ("async", "threads"):
            raise UsageError(f"wait={v}: expected wait=async or wait=threads")
        opts.wait = "async" if v == "async" else "threads"
    elif key == "threads":
        opts.threads = _parse_int(need_value(), key, 1, 1024)
    elif key in ("readahead", "kernel_readahead"):
        size = parse_size(need_value(), key)
        if size > 64 * 2**20:
            raise UsageError(f"{key}={value} is too large (at most 64M)")
        setattr(opts, key, size)
    elif key == "max_background":
        opts.max_background = _parse_int(need_value(), key, 1, 1024)
    elif key == "max_tasks":
        opts.max_tasks = _parse_int(need_value(), key, 1, 10000)
    elif key == "min_tasks":
        opts.min_tasks = _parse_int(need_value(), key, 1, 10000)
    elif key == "spin":
        opts.spin_us = _parse_int(need_value(), key, 0, 1000)
    elif key == "latency":
        opts.latency_ms, opts.latency_jitter_ms = parse_latency(need_value())
        if opts.latency_ms + opts.latency_jitter_ms > 60000:
            raise UsageError(f"latency={value} is out of range (at most 60000 ms)")
    elif key == "faults":
        no_value()
        opts.faults = True
    elif key == "backend":
        v = need_value()
        if v not in ("auto", "uring", "threads"):
            raise UsageError(f"backend={v}: expected auto, uring or threads")
        opts.backend = v  # type: ignore[assignment]
    elif key in ("odirect", "buffered"):
        no_value()
        opts.odirect = key == "odirect"
    elif key == "nocsum":
        no_value()
        opts.verify_csum = False
    elif key == "debug":
        no_value()
        opts.debug = True
    elif key == "ro":
        no_value()
    elif key == "rw":
        raise UsageError("asyncfs mounts are read-only: option rw is not supported")
    elif key in _PASSTHROUGH_FLAGS:
        no_value()
        opts.fuse_flags.add(key)
    elif key in _PASSTHROUGH_VALUES:
        opts.fuse_values[key] = need_value()
    else:
        raise UsageError(f"unknown mount option: {item}")
