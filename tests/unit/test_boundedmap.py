"""The bounded map behind the volume's metadata caches (pagecache/boundedmap.py): eviction
order per policy, the weight bound, replacement in place; and the policy of every map of
engine/metacache.py."""

from __future__ import annotations

import pytest

from asyncfs.engine.metacache import MetaCache
from asyncfs.pagecache.boundedmap import BoundedMap
from tests.mutants import breaks

VARIANTS = ["kernel", "broken"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lru_evicts_the_least_recently_used(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit makes an entry the newest: after a, b, c and a hit on a, inserting d drops b.

    Broken variant: ``get`` that never moves the entry (FIFO under the "lru" name): a goes
    first although it was just used."""
    breaks(variant, monkeypatch, BoundedMap, "_get_lru",
           "self._d.move_to_end(key)", "pass")
    m: BoundedMap[str, int] = BoundedMap(3, "lru")
    for i, k in enumerate("abc"):
        m.put(k, i)
    assert m.get("a") == 0
    m.put("d", 3)
    ok = m.keys() == ["c", "a", "d"] and "b" not in m
    assert ok == (variant == "kernel"), m.keys()
    assert len(m) == 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_fifo_evicts_the_oldest_insert(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hit changes nothing: after a, b, c and a hit on a, inserting d drops a.

    Broken variant: a map that treats every policy as "lru": the hit keeps a, b goes."""
    breaks(variant, monkeypatch, BoundedMap, "__init__",
           'self._get_lru if policy == "lru" else self._d.get', "self._get_lru")
    m: BoundedMap[str, int] = BoundedMap(3, "fifo")
    for i, k in enumerate("abc"):
        m.put(k, i)
    assert m.get("a") == 0
    assert m.get("zz") is None
    m.put("d", 3)
    ok = m.keys() == ["b", "c", "d"] and "a" not in m
    assert ok == (variant == "kernel"), m.keys()


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_replacing_a_value_keeps_its_place(policy: str) -> None:
    """Storing a present key again replaces the value where it stands (as ``dict`` does)."""
    m: BoundedMap[str, int] = BoundedMap(2, policy)  # type: ignore[arg-type]
    m.put("a", 1)
    m.put("b", 2)
    m.put("a", 10)
    m.put("c", 3)
    assert m.keys() == ["b", "c"] and m.get("a") is None


@pytest.mark.parametrize("variant", ["kernel", "broken", "broken-replace"])
def test_weight_bound_keeps_the_newest(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``weigh``, entries go oldest first until the total weight fits, but the newest
    entry stays however heavy; a replaced value's weight is taken off.

    Broken variants: an eviction loop that may empty the map (the heavy newest entry is
    dropped as soon as it is stored); a replacement that never takes the old value's weight
    off (the total drifts up and evicts what fits)."""
    if variant == "broken":
        breaks(variant, monkeypatch, BoundedMap, "put", "while len(d) > 1 and", "while d and")
    elif variant == "broken-replace":
        breaks(variant, monkeypatch, BoundedMap, "put", "self.weight -= weigh(old)", "pass")
    m: BoundedMap[int, list[int]] = BoundedMap(10, "lru", weigh=len, max_weight=10)
    for k in range(3):
        m.put(k, [0] * 4)
    assert m.keys() == [1, 2] and m.weight == 8  # 12 > 10: the oldest went
    m.put(2, [0] * 2)  # replaced in place: 6
    m.put(3, [0] * 4)  # 10 fits
    fits = m.keys() == [1, 2, 3] and m.weight == 10
    m.put(4, [0] * 50)
    heavy_kept = m.keys() == [4] and m.weight == 50
    assert (fits and heavy_kept) == (variant == "kernel"), (m.keys(), m.weight)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BoundedMap(0, "lru")
    with pytest.raises(ValueError, match="policy"):
        BoundedMap(4, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="together"):
        BoundedMap(4, "lru", weigh=len)


def test_metacache_policies() -> None:
    """Each map of the volume's metadata cache keeps the policy its comment gives the reason
    for (engine/metacache.py); changing one is a behaviour change, to be made there."""
    meta = MetaCache()
    policies = {name: getattr(meta, name).policy for name in MetaCache.__slots__}
    assert policies == {
        "inodes": "lru",
        "attrs": "fifo",
        "infos": "fifo",
        "extent_nodes": "lru",
        "pointer_blocks": "lru",
        "dir_blocks": "lru",
        "dx_blocks": "fifo",
        "leaf_names": "fifo",
        "linear_dirs": "fifo",
        "nokey_dirs": "fifo",
        "sorted_dirs": "lru",
    }
    assert meta.sorted_dirs.max_weight > 0 and meta.attrs.max_weight == 0
