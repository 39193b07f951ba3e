"""The one depth-first tree walk behind every tree the tests and the bench read: a Volume
snapshot and the fuzz walk (nodes are inode numbers or (path, inode) pairs), a host tree's
snapshot and the comparison of two host trees (nodes are relative paths), the regular files
of a mounted tree.

The caller drives it: it iterates the walk, looks at each node however it reads (the Volume
API with or without guards, ``os.lstat``), and pushes the children it wants visited, in the
order it wants them popped last-first. So a synchronous and an asynchronous reader share the
same order, the same visited-once rule and the same bound::

    walk = DepthFirst(root_ino, key=lambda ino: ino, limit=4000)
    for ino in walk:
        ...
        walk.push(children)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DepthFirst(Generic[T]):
    """Nodes from ``root`` down, each popped from a stack the caller ``push``es to.

    With ``key``, a node whose key was already visited is skipped (hard links, and the
    directory loops a damaged image can make). ``limit`` stops the walk once that many
    distinct keys (or, without ``key``, nodes) have been visited."""

    def __init__(self, root: T, *, key: Callable[[T], Hashable] | None = None,
                 limit: int | None = None) -> None:
        self._stack: list[T] = [root]
        self._key = key
        self._limit = limit
        self._seen: set[Hashable] = set()
        self.visited = 0

    def push(self, children: Iterable[T]) -> None:
        """Visit ``children`` next, the last one first."""
        self._stack.extend(children)

    def __iter__(self) -> Iterator[T]:
        while self._stack and (self._limit is None or self.visited < self._limit):
            node = self._stack.pop()
            if self._key is not None:
                k = self._key(node)
                if k in self._seen:
                    continue
                self._seen.add(k)
            self.visited += 1
            yield node


def host_tree(root: str | bytes | os.PathLike[str], *, skip_unreadable: bool = False,
              ) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """``(relative path, path, lstat)`` of every entry under ``root`` (``b""`` for ``root``
    itself), symlinks not followed; a directory's entries are pushed in sorted order (so
    popped in reverse). ``skip_unreadable``: a directory that cannot be listed is yielded
    but not entered, as ``os.walk`` does, instead of raising."""
    base = os.fsencode(root)
    walk: DepthFirst[bytes] = DepthFirst(b"")
    for rel in walk:
        path = os.path.join(base, rel) if rel else base
        st = os.lstat(path)
        yield rel, path, st
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(path))
            except OSError:
                if not skip_unreadable:
                    raise
                continue
            walk.push(os.path.join(rel, n) if rel else n for n in names)
