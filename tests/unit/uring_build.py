"""Building asyncfs's io_uring binding from its source in a test: a deliberately broken copy
(one anchored text edit, like ``mutants.mutant`` for Python), and the baseline-ISA check that
every extension module the project builds must pass."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import platform
import re
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

import asyncfs.io

SOURCE = Path(asyncfs.io.__file__).parent / "_uring.c"

# Registers that exist only beyond the x86-64 baseline (SSE2): AVX's ymm, AVX-512's zmm and
# its mask registers k0-k7 (as operands: "%k1").
_X86_BEYOND = re.compile(r"%(ymm\d+|zmm\d+|k[0-7])\b")


def beyond_baseline(so: Path) -> list[str]:
    """Disassembled instructions of ``so`` that need more than its architecture's baseline
    (x86-64: any AVX or AVX-512 register); empty where none, or on another architecture."""
    if platform.machine() != "x86_64":
        return []
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], check=True,
                         capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if _X86_BEYOND.search(line)]


def compile_so(source: str, out: Path, *, extra: tuple[str, ...] = ()) -> Path:
    """Compile C ``source`` into the shared object ``out`` against Python's headers and
    liburing, with the flags setup.py uses plus ``extra``."""
    src = out.with_suffix(".c")
    src.write_text(source)
    flags = ["-O2", "-std=gnu11", "-fPIC", "-shared"]
    if platform.machine() == "x86_64":
        flags += ["-march=x86-64", "-mtune=generic"]
    cmd = ["gcc", *flags, *extra, f"-I{sysconfig.get_paths()['include']}", str(src), "-luring",
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def mutant_binding(tmp: Path, old: str, new: str) -> ModuleType:
    """The binding built from its source with ``old`` replaced by ``new`` (exactly one
    occurrence, or the test fails loudly: a change to the source cannot defuse it)."""
    text = SOURCE.read_text()
    assert text.count(old) == 1, f"mutation anchor not found exactly once: {old!r}"
    tmp.mkdir(parents=True, exist_ok=True)
    so = compile_so(text.replace(old, new), tmp / f"_uring{sysconfig.get_config_var('EXT_SUFFIX')}")
    loader = importlib.machinery.ExtensionFileLoader("asyncfs.io._uring", str(so))
    spec = importlib.util.spec_from_file_location("asyncfs.io._uring", so, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
