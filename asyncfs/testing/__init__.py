"""Test doubles that the tests, the benchmarks and ``-o faults`` share (like ``trio.testing``).

``devices``: block devices and file maps made of memory (``MemoryDevice``, ``GatedDevice``,
``ListFileMap``); ``faulty``: ``FaultyDevice``, which wraps a real device with latency, EIO
ranges and stalls (the cli wires it in for ``-o faults`` and ``-o latency=``); ``imagegen``:
source trees, ext2/3/4 images built from them with e2fsprogs, and tree comparers;
``treewalk``: the depth-first walk every tree reader of the tests and the bench shares.

Only the cli imports this package from inside asyncfs (the import-linter contracts in
pyproject.toml say so): the read path never depends on a test double.
"""

from asyncfs.testing.devices import (
    GatedDevice,
    ListFileMap,
    MemoryDevice,
    PendingRead,
    SlowBlockingDevice,
    contiguous_file,
    pattern,
)
from asyncfs.testing.faulty import FaultyDevice, parse_latency

__all__ = [
    "FaultyDevice",
    "GatedDevice",
    "ListFileMap",
    "MemoryDevice",
    "PendingRead",
    "SlowBlockingDevice",
    "contiguous_file",
    "parse_latency",
    "pattern",
]
