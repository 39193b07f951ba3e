"""Every damaged image that once showed a bug, replayed with all the fuzz oracles.

Each case lives in ``tests/robust/corpus/*.json``: the pristine image (preset, tree profile and
seed), the patches by structure locator, what was found, and, while the bug is open, an
``xfail`` reason (the test is then a strict xfail: it must keep failing until the fix lands,
and the fix must remove the mark). ``bench/fuzz.py`` writes new cases in the same format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fuzzing.cases import Case
from bench.fuzzing.corpus import load_corpus
from bench.fuzzing.images import ImageStore
from bench.fuzzing.oracle import run_case

CORPUS = Path(__file__).parent / "corpus"


def _params() -> list[Any]:
    out = []
    for entry in load_corpus(CORPUS):
        marks = []
        if entry.get("xfail"):
            marks.append(pytest.mark.xfail(strict=True, reason=entry["xfail"]))
        out.append(pytest.param(entry, id=entry["file"].removesuffix(".json"), marks=marks))
    return out


def test_corpus_is_compact() -> None:
    """Cases are small JSON files (preset + patches), never images."""
    files = list(CORPUS.iterdir())
    assert files, "the regression corpus is empty"
    for f in files:
        assert f.suffix == ".json" and f.stat().st_size < 8192, f


@pytest.mark.parametrize("entry", _params())
def test_regression(entry: dict[str, Any], store: ImageStore, tmp_path: Path) -> None:
    """The case is refused with one line or served with every oracle satisfied.

    Each corpus file records the bug it once showed ("found"); the strict xfail marks of
    open ones prove the oracles still catch it."""
    case = Case.from_json(entry["case"])
    out = run_case(store, case, tmp_path, op_timeout=10, case_timeout=60)
    assert not out.failed, f"{case.name}: {out.verdict}: {out.detail}"
