"""Mount options: the `-o` grammar, defaults and validation (a one-line UsageError if bad)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from asyncfs.errors import UsageError
from asyncfs.io.remote import RemoteOptions, redact
from asyncfs.testing import parse_latency

_SIZE_RE = re.compile(r"^(\d+)([kmgt]?)(i?b?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

# FUSE/VFS options passed straight to the kernel; the image is never writable, so "rw" is refused.
_PASSTHROUGH_FLAGS = frozenset(
    {"allow_other", "allow_root", "default_permissions", "nodev", "nosuid", "noexec",
     "dev", "suid", "exec", "noatime", "relatime", "atime", "auto_unmount"}
)
_PASSTHROUGH_VALUES = frozenset({"fsname", "subtype"})

# What only mount(8), the fstab reader or systemd's fstab generator acts on. mount(8) hands
# some of these to a mount helper with the rest (nofail, _netdev, user or users for a user
# mount; libmount records the user as user=NAME, and some versions pass that form on); the
# helper drops them, and `asyncfs mount` itself still refuses them as unknown.
MOUNT8_ONLY_FLAGS = frozenset(
    {"_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner", "group",
     "defaults"}
)


class UnknownOptionError(UsageError):
    """An option asyncfs does not have at all (as opposed to a bad value of one it has)."""


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
    # remote images (http://, https://, s3://): cafile, insecure, header, endpoint, cache_dir
    remote: RemoteOptions = field(default_factory=RemoteOptions)

    def fuse_options(self, image_name: str) -> set[str]:
        """The option set handed to ``pyfuse3.init`` (always read-only)."""
        opts = {"ro", "default_permissions", *self.fuse_flags}
        # (a presigned URL's query is a credential: keep it out of the mount table)
        image_name = redact(image_name).rsplit("/", 1)[-1] if "://" in image_name \
            else image_name.split("?", 1)[0]
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


# -- the option table: it parses ``-o`` and it writes ``asyncfs mount --help`` ----------------

Setter = Callable[[MountOptions, str, str], None]  # (options, key, value: "" for a flag)


@dataclass(frozen=True)
class Option:
    """One ``-o`` option: its name, the value it takes (a placeholder such as ``N`` or
    ``SIZE``; None for a flag), one line of help, and how it sets MountOptions."""

    name: str
    value: str | None
    help: str
    set: Setter


def _setter(attr: str, convert: Callable[[str, str], object]) -> Setter:
    def set_attr(opts: MountOptions, key: str, value: str) -> None:
        setattr(opts, attr, convert(value, key))
    return set_attr


def _int_in(lo: int, hi: int) -> Callable[[str, str], int]:
    return lambda value, key: _parse_int(value, key, lo, hi)


def _flag(attr: str, to: object = True) -> Setter:
    def set_flag(opts: MountOptions, key: str, value: str) -> None:
        setattr(opts, attr, to)
    return set_flag


def _set_sizelimit(opts: MountOptions, key: str, value: str) -> None:
    opts.sizelimit = parse_size(value, key)
    if opts.sizelimit == 0:
        raise UsageError("sizelimit=0 leaves nothing to mount")


def _set_cache_size(opts: MountOptions, key: str, value: str) -> None:
    opts.cache_size = parse_size(value, key)
    if opts.cache_size < 64 * 1024:
        raise UsageError(f"cache_size={value} is too small (at least 64K)")


def _set_wait(opts: MountOptions, key: str, value: str) -> None:
    if value not in ("async", "threads"):
        raise UsageError(f"wait={value}: expected wait=async or wait=threads")
    opts.wait = "async" if value == "async" else "threads"


def _set_readahead(opts: MountOptions, key: str, value: str) -> None:
    size = parse_size(value, key)
    if size > 64 * 2**20:
        raise UsageError(f"{key}={value} is too large (at most 64M)")
    setattr(opts, key, size)


def _set_latency(opts: MountOptions, key: str, value: str) -> None:
    opts.latency_ms, opts.latency_jitter_ms = parse_latency(value)
    if opts.latency_ms + opts.latency_jitter_ms > 60000:
        raise UsageError(f"latency={value} is out of range (at most 60000 ms)")


def _set_backend(opts: MountOptions, key: str, value: str) -> None:
    if value not in ("auto", "uring", "threads"):
        raise UsageError(f"backend={value}: expected auto, uring or threads")
    opts.backend = value  # type: ignore[assignment]


def _remote(attr: str, convert: Callable[[str, str], object] = lambda v, k: v) -> Setter:
    def set_remote(opts: MountOptions, key: str, value: str) -> None:
        setattr(opts.remote, attr, convert(value, key))
    return set_remote


def _set_insecure(opts: MountOptions, key: str, value: str) -> None:
    opts.remote.insecure = True


def _add_header(opts: MountOptions, key: str, value: str) -> None:
    name, colon, text = value.partition(":")
    if not colon or not name.strip() or any(c in name for c in " \t\r\n"):
        raise UsageError(f"header={value}: expected header=Name: value")
    if any(c in text for c in "\r\n"):
        raise UsageError("header=: a header value cannot hold a line break")
    opts.remote.headers.append((name.strip(), text.strip()))


def _refuse_rw(opts: MountOptions, key: str, value: str) -> None:
    raise UsageError("asyncfs mounts are read-only: option rw is not supported")


def _pass_flag(opts: MountOptions, key: str, value: str) -> None:
    opts.fuse_flags.add(key)


def _pass_value(opts: MountOptions, key: str, value: str) -> None:
    opts.fuse_values[key] = value


def _ignore(opts: MountOptions, key: str, value: str) -> None:
    pass


_size = parse_size
OPTIONS: tuple[Option, ...] = (
    Option("partition", "N", "mount partition N of a whole-disk image (as /dev/sdaN)",
           _setter("partition", _int_in(1, 256))),
    Option("offset", "BYTES", "the filesystem starts at this byte of the image",
           _setter("offset", _size)),
    Option("sizelimit", "BYTES", "with offset=: the filesystem is this long", _set_sizelimit),
    Option("cache_size", "SIZE", "the page cache's ceiling (default: 1/8 of memory, 64M-2G)",
           _set_cache_size),
    Option("direct_io", None, "FUSE direct I/O: every read reaches asyncfs",
           _flag("direct_io")),
    Option("wait", "async|threads", "how a reader waits for a page under I/O", _set_wait),
    Option("threads", "N", "worker threads (wait=threads, the threads backend)",
           _setter("threads", _int_in(1, 1024))),
    Option("readahead", "SIZE", "largest readahead window per open file (0: none)",
           _set_readahead),
    Option("kernel_readahead", "SIZE", "the kernel's readahead for this mount (root only)",
           _set_readahead),
    Option("max_background", "N", "readahead READs the kernel keeps in flight (root only)",
           _setter("max_background", _int_in(1, 1024))),
    Option("max_tasks", "N", "FUSE requests served at once",
           _setter("max_tasks", _int_in(1, 10000))),
    Option("min_tasks", "N", "idle FUSE workers kept for the next burst",
           _setter("min_tasks", _int_in(1, 10000))),
    Option("spin", "USEC", "watch an empty request queue this long before parking",
           _setter("spin_us", _int_in(0, 1000))),
    Option("latency", "MS|LO-HI", "fault injection: add this delay to every device read",
           _set_latency),
    Option("faults", None, "allow `asyncfs fault` on this mount (tests, benchmarks)",
           _flag("faults")),
    Option("backend", "auto|uring|threads", "the image backend (auto: io_uring, else threads)",
           _set_backend),
    Option("odirect", None, "every image read O_DIRECT (default: large reads only)",
           _flag("odirect", True)),
    Option("buffered", None, "every image read through the host page cache",
           _flag("odirect", False)),
    Option("nocsum", None, "do not verify metadata_csum checksums", _flag("verify_csum", False)),
    Option("debug", None, "debug logging", _flag("debug")),
    Option("cafile", "PATH", "remote images: trust this CA bundle for https://",
           _remote("cafile")),
    Option("insecure", None, "remote images: do not verify TLS certificates", _set_insecure),
    Option("header", "NAME:VALUE", "remote images: send this header (repeatable)", _add_header),
    Option("endpoint", "URL", "s3:// images: the S3 endpoint", _remote("endpoint")),
    Option("cache_dir", "DIR", "remote images: a persistent cache of fetched blocks",
           _remote("cache_dir")),
    Option("cache_dir_size", "SIZE", "remote images: the persistent cache's bound",
           _remote("cache_dir_size", _size)),
    Option("connections", "N", "remote images: connections to the server",
           _remote("connections", _int_in(1, 256))),
    Option("retries", "N", "remote images: tries per request before EIO",
           _remote("retries", _int_in(1, 100))),
    Option("ro", None, "read-only (always)", _ignore),
    Option("rw", None, "refused: asyncfs mounts are read-only", _refuse_rw),
    *(Option(flag, None, "passed to FUSE/the kernel", _pass_flag)
      for flag in sorted(_PASSTHROUGH_FLAGS)),
    *(Option(key, "TEXT", "passed to FUSE/the kernel", _pass_value)
      for key in sorted(_PASSTHROUGH_VALUES)),
)
_BY_NAME = {o.name: o for o in OPTIONS}


def options_help() -> str:
    """Every ``-o`` option, one line each, from the table that parses them."""
    def left(o: Option) -> str:
        return o.name if o.value is None else f"{o.name}={o.value}"

    width = max(len(left(o)) for o in OPTIONS) + 2
    return "mount options (-o OPT[,OPT...]; sizes take K, M, G, T):\n" + "\n".join(
        f"  {left(o):<{width}}{o.help}" for o in OPTIONS)


def _apply(opts: MountOptions, item: str) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    option = _BY_NAME.get(key)
    if option is None:
        raise UnknownOptionError(f"unknown mount option: {item}")
    if option.value is None:
        if sep and option.set is not _refuse_rw:
            raise UsageError(f"option {key} takes no value")
    elif not sep or not value:
        raise UsageError(f"option {key} needs a value ({key}=...)")
    option.set(opts, key, value)


def concerns_mount8_only(item: str) -> bool:
    """True for an option that means something to mount(8) and nothing to asyncfs."""
    key, sep, _ = item.partition("=")
    if key in MOUNT8_ONLY_FLAGS:
        return not sep or key == "user"
    return key.startswith(("x-", "X-")) or (key == "comment" and bool(sep))


def is_known_option(item: str) -> bool:
    """Whether ``item`` names an asyncfs option (its value may still be bad)."""
    try:
        _apply(MountOptions(), item.strip())
    except UnknownOptionError:
        return False
    except UsageError:
        pass
    return True
