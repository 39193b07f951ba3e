"""Fixtures for the robustness tests: one image store (fuzz tree + pristine images) per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fuzzing.images import ImageStore


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    s = ImageStore(tmp_path_factory.mktemp("fuzzstore"))
    yield s
    s.close()


@pytest.fixture(scope="session")
def fuzz_tree(store: ImageStore) -> Path:
    return store.tree("fuzz", 0)


@pytest.fixture(scope="session")
def fuzz_ext4(store: ImageStore) -> Path:
    """The fuzz tree as an ext4 image (4 KiB blocks, metadata_csum). Read-only by contract."""
    return store.image("ext4")
