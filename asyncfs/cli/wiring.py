"""Composition: image -> block device (+ fault injection) -> page cache -> ext4 volume."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from asyncfs.cli.options import MountOptions, cache_start
from asyncfs.engine.cache import PageCache
from asyncfs.engine.volume import Volume
from asyncfs.io import FaultyDevice, open_image
from asyncfs.io.device import BlockDevice


@dataclass
class Stack:
    device: BlockDevice
    cache: PageCache
    volume: Volume
    faults: FaultyDevice | None


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
    )
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
            readahead_max=opts.readahead,
        )
        try:
            volume = await Volume.open(cache, verify_csum=opts.verify_csum,
                                       device_size=device.size)
            yield Stack(device=device, cache=cache, volume=volume, faults=faults)
        finally:
            await cache.aclose()
    finally:
        await device.aclose()
