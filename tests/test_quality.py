"""Code-shape checks that CI enforces: layering (import-linter), types (mypy), lint (ruff)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_imports_point_down_only() -> None:
    """Broken variant: `import pyfuse3` in asyncfs/engine/cache.py, or `import trio` in
    asyncfs/pagecache -> lint-imports reports the broken contract and this fails."""
    r = _run(str(BIN / "lint-imports"), "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_mypy_strict_clean() -> None:
    r = _run(str(BIN / "mypy"), "--no-error-summary")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_clean() -> None:
    r = _run(str(BIN / "ruff"), "check", "asyncfs", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr
