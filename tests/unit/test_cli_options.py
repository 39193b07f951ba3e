"""Mount-option grammar: every option parses, every bad one is a one-line UsageError."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncfs.cli.options import default_cache_size, parse_options, parse_size
from asyncfs.errors import UsageError


def test_sizes() -> None:
    assert parse_size("4096", "x") == 4096
    assert parse_size("64M", "x") == 64 * 2**20
    assert parse_size("1GiB", "x") == 2**30
    assert parse_size("128k", "x") == 128 * 1024


def test_full_option_set() -> None:
    o = parse_options(["partition=2,cache_size=64M", "direct_io,wait=threads,threads=4",
                       "readahead=1M,max_tasks=200,latency=1.5,nocsum,allow_other,debug,ro"])
    assert (o.partition, o.cache_size, o.direct_io, o.wait, o.threads) == (2, 64 << 20, True,
                                                                           "threads", 4)
    assert (o.readahead, o.max_tasks, o.latency_ms, o.verify_csum, o.debug) == (1 << 20, 200,
                                                                                1.5, False, True)
    assert "allow_other" in o.fuse_options("x.img")
    assert "ro" in o.fuse_options("x.img")


def test_offset_and_sizelimit() -> None:
    o = parse_options(["offset=1048576,sizelimit=64M"])
    assert (o.offset, o.sizelimit) == (1 << 20, 64 << 20)


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        ("bogus", "unknown mount option: bogus"),
        ("cache_size=lots", "malformed size for cache_size"),
        ("cache_size", "option cache_size needs a value"),
        ("wait=sometimes", "wait=sometimes"),
        ("threads=0", "out of range"),
        ("direct_io=1", "takes no value"),
        ("rw", "read-only"),
        ("partition=1,offset=0", "cannot be combined"),
        ("sizelimit=1M", "sizelimit= needs offset="),
        ("latency=-1", "latency=-1"),
        ("kernel_readahead=1G", "too large"),
        ("max_background=0", "out of range"),
        ("latency=5-2", "latency=5-2"),
    ],
)
def test_bad_options_are_one_line_errors(opt: str, message: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_options([opt])
    text = str(ei.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(("mem_kib", "expect_mib"), [
    (24 * 2**20, 256),  # a sixteenth would be 1.5 GiB: capped
    (4 * 2**20, 256),
    (3 * 2**20 + 12345, 192),  # rounded down to whole MiB
    (512 * 2**10, 64),  # a sixteenth would be 32 MiB: the floor
])
def test_default_cache_size_follows_memory(tmp_path: Path, mem_kib: int, expect_mib: int) -> None:
    """A sixteenth of MemTotal, between 64 MiB and 256 MiB. Broken variant: no cap (a big
    machine would give the daemon 1.5 GiB)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemFree:  1000 kB\nMemTotal:  {mem_kib} kB\n")
    assert default_cache_size(str(meminfo)) == expect_mib << 20


def test_default_cache_size_without_meminfo(tmp_path: Path) -> None:
    assert default_cache_size(str(tmp_path / "missing")) == 256 << 20
    (tmp_path / "odd").write_text("nothing useful\n")
    assert default_cache_size(str(tmp_path / "odd")) == 256 << 20
    assert parse_options(["cache_size=64M"]).cache_size == 64 << 20  # an explicit size wins
