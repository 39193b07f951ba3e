"""Mount-option grammar: every option parses, every bad one is a one-line UsageError."""

from __future__ import annotations

import pytest

from asyncfs.cli.options import parse_options, parse_size
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
