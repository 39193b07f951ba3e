"""Composition: image -> block device (+ fault injection) -> page cache -> ext4 volume."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from asyncfs.cli.options import MountOptions, cache_start
from asyncfs.engine.cache import PageCache
from asyncfs.engine.volume import Volume
from asyncfs.io import open_image
from asyncfs.io.device import BlockDevice
from asyncfs.io.remote import remote_device
from asyncfs.testing import FaultyDevice


@dataclass
class Stack:
    device: BlockDevice
    cache: PageCache
    volume: Volume
    faults: FaultyDevice | None
    backend: str  # the image backend that serves ("uring" or "threads")
    backend_note: str | None  # why, where it is not the one asked for (io_uring refused)


@asynccontextmanager
async def open_stack(image: str | os.PathLike[str], opts: MountOptions) -> AsyncIterator[Stack]:
    """Open everything a mount (or ``asyncfs ls/cat``) reads through; close it all on exit."""
    device: BlockDevice = await open_image(
        image,
        backend=opts.backend,
        direct=opts.odirect,
        partition=opts.partition,
        offset=opts.offset,
        sizelimit=opts.sizelimit,
        threads=opts.threads,
        remote=opts.remote,
    )
    backend = str(getattr(device, "backend_name", type(device).__name__))
    backend_note = getattr(device, "backend_note", None)
    faults: FaultyDevice | None = None
    try:
        if opts.latency_ms or opts.latency_jitter_ms or opts.faults:
            faults = FaultyDevice(device, latency_ms=opts.latency_ms,
                                  latency_jitter_ms=opts.latency_jitter_ms)
            device = faults
        cache = PageCache(
            device,
            cache_bytes=cache_start(opts.cache_size),
            cache_max_bytes=opts.cache_size,
            wait_mode=opts.wait,
            threads=opts.threads,
            readahead_max=_readahead(device, opts.readahead),
        )
        try:
            volume = await Volume.mount(cache, verify_csum=opts.verify_csum,
                                        device_size=device.size)
            yield Stack(device=device, cache=cache, volume=volume, faults=faults,
                        backend=backend, backend_note=backend_note)
        finally:
            await cache.aclose()
    finally:
        await device.aclose()


def _readahead(device: BlockDevice, configured: int) -> int:
    """A remote object's window is at least its bandwidth-delay product (its
    ``readahead_hint``), so a stream keeps the link busy; ``readahead=0`` stays off."""
    remote = remote_device(device)
    if remote is None or configured <= 0:
        return configured
    return max(configured, remote.readahead_hint)
