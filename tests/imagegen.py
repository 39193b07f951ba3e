"""The tests' side of the image corpus: the kernel's reference mount of an image, and images
built once per test process. Trees, images and comparers are ``asyncfs.testing.imagegen``.

    src, img = corpus_image(preset)                     # built once, shared by every caller
    with kernel_mount(img) as ref:                      # root + loop devices, else skip
        assert compare_trees(src, ref, fields=SOURCE_FIELDS) == []
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from asyncfs.testing.imagegen import make_image, make_tree

_CORPUS: dict[tuple[str, int], Path] = {}
_CORPUS_DIR: list[Path] = []


def corpus_image(preset: str, profile: Literal["full", "small"] = "small",
                 seed: int = 0) -> tuple[Path, Path]:
    """``(source tree, image)`` built once per process and shared by every caller.

    Read-only by contract: copy the image before changing it. Removed at interpreter exit.
    """
    if not _CORPUS_DIR:
        _CORPUS_DIR.append(Path(tempfile.mkdtemp(prefix="asyncfs-corpus-")))
        atexit.register(shutil.rmtree, _CORPUS_DIR[0], True)
    base = _CORPUS_DIR[0]
    src = base / f"src-{profile}-{seed}"
    if (profile, seed) not in _CORPUS:
        shutil.rmtree(src, ignore_errors=True)
        make_tree(src, profile, seed)
        _CORPUS[(profile, seed)] = src
    img = base / f"{preset}-{profile}-{seed}.img"
    if not img.exists():
        tmp = img.with_suffix(".tmp")
        make_image(src, tmp, preset)
        tmp.rename(img)
    return src, img


# --------------------------------------------------------------------------------------------
# kernel reference mount
# --------------------------------------------------------------------------------------------


def kernel_mount_unavailable() -> str | None:
    """Why the kernel reference mount cannot be used here, or None if it can."""
    if os.geteuid() != 0:
        return "kernel reference mount needs root"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support (/dev/loop-control missing)"
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "ext4" for line in f if line.strip()):
            return "kernel has no ext4 driver"
    return None


@contextlib.contextmanager
def kernel_mount(img: Path) -> Iterator[Path]:
    """Mount ``img`` with the kernel's ext4 driver (loop, ro, noload) and yield the mount dir.

    ``-t ext4`` for ext2/ext3 images too: the ext4 driver is the reference. ``noload`` so a
    journal is never replayed. Always unmounts. Skips the calling test (pytest.skip) when not
    root or without loop devices.
    """
    import pytest

    why = kernel_mount_unavailable()
    if why is not None:
        pytest.skip(why)
    mnt = Path(tempfile.mkdtemp(prefix="asyncfs-kmnt-"))
    try:
        res = subprocess.run(
            ["mount", "-t", "ext4", "-o", "loop,ro,noload", str(img), str(mnt)],
            capture_output=True,
        )
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip()
            if "loop device" in err:
                pytest.skip(f"no usable loop device: {err}")
            raise RuntimeError(f"mount {img}: {err}")
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                # still busy (a file left open by the test): detach now, free it when closed
                subprocess.run(["umount", "-l", str(mnt)], check=True, capture_output=True)
    finally:
        mnt.rmdir()
