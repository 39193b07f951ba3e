"""Pristine images of the fuzz presets, with their layouts and walked references, built
once per (preset, tree profile, seed) in a scratch directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from asyncfs.testing.imagegen import make_fuzz_tree, make_image, make_tree
from bench.fuzzing.layout import Layout, locate
from bench.fuzzing.oracle import Reference, build_reference

FUZZ_PRESETS = ("ext4", "ext4-1k", "ext2-1k", "inline_data", "ext4-old", "bigalloc", "meta_bg")
"""Presets the campaign damages (``asyncfs.testing.imagegen.PRESETS`` names)."""


class ImageStore:
    """Pristine images (and their layouts and references) built once per (preset, tree)."""

    def __init__(self, base: Path | None = None) -> None:
        self._own = base is None
        self.base = base or Path(tempfile.mkdtemp(prefix="asyncfs-fuzz-"))
        self._trees: dict[tuple[str, int], Path] = {}
        self._images: dict[tuple[str, str, int], Path] = {}
        self._layouts: dict[Path, Layout] = {}
        self._refs: dict[tuple[Path, bool], Reference] = {}

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.base, ignore_errors=True)

    def tree(self, profile: str, seed: int) -> Path:
        key = (profile, seed)
        if key not in self._trees:
            src = self.base / f"src-{profile}-{seed}"
            shutil.rmtree(src, ignore_errors=True)
            if profile == "fuzz":
                make_fuzz_tree(src, seed)
            else:
                make_tree(src, profile, seed)  # type: ignore[arg-type]
            self._trees[key] = src
        return self._trees[key]

    def image(self, preset: str, profile: str = "fuzz", seed: int = 0) -> Path:
        key = (preset, profile, seed)
        if key not in self._images:
            img = self.base / f"{preset}-{profile}-{seed}.img"
            make_image(self.tree(profile, seed), img, preset)
            self._images[key] = img
        return self._images[key]

    def layout(self, img: Path) -> Layout:
        if img not in self._layouts:
            self._layouts[img] = locate(img)
        return self._layouts[img]

    def reference(self, img: Path, nocsum: bool) -> Reference:
        key = (img, nocsum)
        if key not in self._refs:
            self._refs[key] = build_reference(img, nocsum)
        return self._refs[key]
