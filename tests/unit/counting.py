"""Counting the reads a real backend starts by callback, for the page-cache-over-backend tests
of both backends (io_uring and threads)."""

from __future__ import annotations

from typing import Any


def count_callback_reads(dev: Any, kind: str) -> list[int]:
    """Wrap ``dev``'s callback reads so each started read's length is recorded: reads into the
    frames (``kind="into"``), or, with ``submit_read_into`` hidden from the cache, through the
    bounce buffer (``"bounce"``). Returns the list the lengths go into."""
    started: list[int] = []
    if kind == "into":
        real_into = dev.submit_read_into

        def counting_into(offset: int, views: list[memoryview], callback: Any,
                          delay: float = 0.0) -> bool:
            ok: bool = real_into(offset, views, callback, delay)
            if ok:
                started.append(sum(map(len, views)))
            return ok

        dev.submit_read_into = counting_into
        return started
    dev.submit_read_into = None
    real = dev.submit_read

    def counting(offset: int, length: int, callback: Any) -> bool:
        ok: bool = real(offset, length, callback)
        if ok:
            started.append(length)
        return ok

    dev.submit_read = counting
    return started
