"""A bounded set of recently seen keys, oldest forgotten first.

Used where something must happen once per key but the keys are unbounded: logging a damaged
object once (a loop of ``ls`` over a damaged directory must not grow the log without bound),
or storing a small file into the kernel's cache once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class RecentlySeen:
    """``add(key)`` is True the first time ``key`` is seen (while it is remembered)."""

    __slots__ = ("_keys", "_max")

    def __init__(self, max_keys: int) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._max = max_keys

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Hashable) -> bool:
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return True
