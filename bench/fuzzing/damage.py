"""The damaged image of a case: a sparse copy of the pristine image with the patches
written and the truncation applied, and the device byte ranges the damage covers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.fuzzing.cases import Case
from bench.fuzzing.layout import Layout


def _truncate_size(spec: str, size: int) -> int:
    if spec.startswith("frac:"):
        return int(size * float(spec[5:]))
    if spec.startswith("end-"):
        return size - int(spec[4:])
    return int(spec)


def damaged_ranges(case: Case, lay: Layout) -> list[tuple[int, int]]:
    out = []
    for p in case.patches:
        base, _length = lay.resolve(p.at)
        out.append((base + p.off, base + p.off + len(p.data)))
    return out


def build_damaged(pristine: Path, lay: Layout, case: Case, dst: Path) -> None:
    """Copy ``pristine`` to ``dst`` (sparse) and apply ``case``."""
    subprocess.run(["cp", "--sparse=always", str(pristine), str(dst)], check=True)
    with open(dst, "r+b") as f:
        for p in case.patches:
            base, length = lay.resolve(p.at)
            if p.off + len(p.data) > length:
                raise ValueError(f"patch at {p.at}+{p.off} leaves the structure")
            f.seek(base + p.off)
            f.write(p.data)
        if case.truncate is not None:
            f.truncate(_truncate_size(case.truncate, lay.size))
