"""Fixtures for mount tests: a corpus tree, images built from it, mounts of those images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncfs.testing.imagegen import make_image, make_tree
from tests.mount.helpers import mounted, require_fuse


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "src"
    root.mkdir()
    make_tree(root, profile="small", seed=7)
    return root


@pytest.fixture(scope="session")
def ext4_image(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(small_tree, tmp_path_factory.mktemp("img") / "ext4.img", "ext4")


@pytest.fixture
def ext4_mount(ext4_image: Path, tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    with mounted(ext4_image, tmp_path / "mnt") as mnt:
        yield mnt
