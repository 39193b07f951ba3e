"""RecentlySeen: once per key while remembered, bounded, oldest forgotten first."""

from __future__ import annotations

from asyncfs.engine.seen import RecentlySeen


def test_once_per_key_bounded_oldest_forgotten() -> None:
    seen = RecentlySeen(3)
    assert [seen.add(k) for k in ("a", "b", "a", "c")] == [True, True, False, True]
    assert seen.add("d")  # a fourth key: "a", the oldest, is forgotten
    assert len(seen) == 3 and "a" not in seen and "d" in seen
    assert seen.add("a")  # forgotten, so it counts as new again
    assert "b" not in seen
