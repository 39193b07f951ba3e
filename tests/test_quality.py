"""Code-shape checks that CI enforces: layering (import-linter), types (mypy), lint (ruff),
and bench/ standing on asyncfs alone (never on tests/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_imports_point_down_only() -> None:
    """The layering contracts hold: `import pyfuse3` in asyncfs/engine/cache.py, or
    `import trio` in asyncfs/pagecache, would be a broken contract lint-imports reports."""
    r = _run(str(BIN / "lint-imports"), "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_mypy_strict_clean() -> None:
    r = _run(str(BIN / "mypy"), "--no-error-summary")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_clean() -> None:
    r = _run(str(BIN / "ruff"), "check", "asyncfs", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_tool_state_in_the_tree() -> None:
    """fio's verify state (``*-verify.state``) and other run leftovers never enter the tree:
    the tests pass ``--verify_state_save=0`` and .gitignore keeps them out.

    It guards against the fio state file that once was committed at the top level."""
    tracked = _run("git", "ls-files").stdout.split()
    leftovers = [p for p in tracked if p.endswith(".state") or p.endswith(".so")]
    assert leftovers == []
    ignored = _run("git", "check-ignore", "local-verify-0-verify.state", "x/y.so").stdout.split()
    assert ignored == ["local-verify-0-verify.state", "x/y.so"]


def bench_imports_of_tests(paths: list[Path]) -> list[str]:
    """``file:line: module`` for every import of the ``tests`` package in ``paths``."""
    out: list[str] = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            out += [f"{path}:{node.lineno}: {m}" for m in mods
                    if m == "tests" or m.startswith("tests.")]
    return out


def test_bench_never_imports_tests() -> None:
    """bench/ runs from an installed asyncfs and its own files: what it shares with the tests
    lives in ``asyncfs.testing`` (devices, images) or in bench/ (the fuzz library).

    The checker is shown to see such imports, in every spelling, in
    ``test_bench_import_check_sees_tests``."""
    assert bench_imports_of_tests(sorted((ROOT / "bench").rglob("*.py"))) == []


def test_bench_import_check_sees_tests(tmp_path: Path) -> None:
    """The check above, against bench modules that import tests in each spelling."""
    spellings = ["from tests.unit import x", "import tests.imagegen", "import tests",
                 "def f() -> None:\n    from tests.robust.fuzz import y"]
    paths = []
    for i, line in enumerate(spellings):
        paths.append(tmp_path / f"m{i}.py")
        paths[-1].write_text(f"import os\nfrom bench import run\n{line}\n")
    found = bench_imports_of_tests(paths)
    assert [f.rsplit(": ", 1)[1] for f in found] == [
        "tests.unit", "tests.imagegen", "tests", "tests.robust.fuzz"]


_BUILDERS = frozenset({"mutant", "breaks", "mutant_binding"})


def bare_broken_variant_claims(paths: list[Path]) -> list[str]:
    """``file:line: test`` for every test function whose docstring claims a broken variant
    ("broken variant", any case) but neither calls ``mutant``, ``breaks`` or
    ``mutant_binding`` nor takes a ``variant`` argument (docs/testing.md, "How to add a broken
    variant")."""
    out: list[str] = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node) or ""
            if not node.name.startswith("test") or "broken variant" not in doc.lower():
                continue
            args = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
            if any(a.arg == "variant" for a in args):
                continue
            calls = {
                c.func.id if isinstance(c.func, ast.Name) else c.func.attr
                for c in ast.walk(node) if isinstance(c, ast.Call)
                and isinstance(c.func, ast.Name | ast.Attribute)
            }
            if not calls & _BUILDERS:
                out.append(f"{path}:{node.lineno}: {node.name}")
    return out


def test_every_broken_variant_claim_is_built() -> None:
    """A test whose docstring names the deliberately broken code it fails against builds
    that code in the suite (and is shown to fail against it), so a claim cannot go stale
    unseen."""
    assert bare_broken_variant_claims(sorted((ROOT / "tests").rglob("*.py"))) == []


def test_broken_variant_check_sees_a_bare_claim(tmp_path: Path) -> None:
    """The check above, against a test that only claims its variant, beside ones that build
    it each way the suite does."""
    path = tmp_path / "test_claims.py"
    path.write_text(
        "from tests.mutants import breaks, mutant\n\n"
        "def test_bare() -> None:\n"
        '    """Broken variant: no bounds check."""\n'
        "    assert True\n\n"
        "async def test_bare_async() -> None:\n"
        '    """Broken VARIANT: no bounds check."""\n\n'
        "def test_parametrized(variant: str) -> None:\n"
        '    """Broken variant: no bounds check."""\n\n'
        "def test_calls(monkeypatch: object) -> None:\n"
        '    """Broken variant: no bounds check."""\n'
        '    breaks("x", monkeypatch, object, "f", "a", "b")\n\n'
        "def test_no_claim() -> None:\n"
        '    """Nothing broken here."""\n'
    )
    assert [f.rsplit(": ", 1)[1] for f in bare_broken_variant_claims([path])] == [
        "test_bare", "test_bare_async"]
