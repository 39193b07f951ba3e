"""A dict with a bound and an explicit eviction policy, for caches of parsed metadata.

``BoundedMap(capacity, policy)`` keeps at most ``capacity`` entries; inserting one more drops
the oldest. The policy says what "oldest" means:

* ``"lru"``: a hit (``get``) makes the entry the newest, so what is used keeps its place;
* ``"fifo"``: a hit changes nothing, so the oldest insert goes first, and a hit costs one
  plain dict lookup.

With ``weigh`` and ``max_weight`` the map is also bounded by the sum of its values' weights
(e.g. entries of cached listings); the newest entry is always kept, however heavy.

Values are never None (``get`` answers None for a miss). Replacing the value of a present key
keeps its place in the order, as ``dict`` does. Pure: no I/O, no awaits; the engine calls it
from its one thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Policy = Literal["lru", "fifo"]


class BoundedMap(Generic[K, V]):
    """At most ``capacity`` entries (and ``max_weight`` in weight), oldest dropped first."""

    __slots__ = ("_d", "_weigh", "capacity", "get", "max_weight", "policy", "weight")

    def __init__(
        self,
        capacity: int,
        policy: Policy,
        *,
        weigh: Callable[[V], int] | None = None,
        max_weight: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if policy not in ("lru", "fifo"):
            raise ValueError(f"unknown eviction policy {policy!r}")
        if (weigh is None) != (max_weight is None):
            raise ValueError("weigh and max_weight go together")
        self._d: OrderedDict[K, V] = OrderedDict()
        # ``get(key)``: the value of ``key`` or None. Under "fifo" it is the dict's own get, so a
        # hit on the hottest maps (attributes) costs no Python call
        self.get: Callable[[K], V | None] = (
            self._get_lru if policy == "lru" else self._d.get)
        self._weigh = weigh
        self.capacity = capacity
        self.max_weight = max_weight if max_weight is not None else 0
        self.policy: Policy = policy
        self.weight = 0  # sum of weigh(value) over the entries (0 without ``weigh``)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def keys(self) -> list[K]:
        """The keys, oldest first (the order eviction follows)."""
        return list(self._d)

    def _get_lru(self, key: K) -> V | None:
        """``get`` under "lru": a hit makes the entry the newest."""
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key``, then drop the oldest entries beyond the bounds."""
        d = self._d
        weigh = self._weigh
        if weigh is not None:
            old = d.get(key)
            if old is not None:
                self.weight -= weigh(old)
            self.weight += weigh(value)
        d[key] = value
        while len(d) > 1 and (len(d) > self.capacity or self.weight > self.max_weight):
            _, dropped = d.popitem(last=False)
            if weigh is not None:
                self.weight -= weigh(dropped)
