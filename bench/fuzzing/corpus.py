"""Corpus files: one small JSON file per kept case (``tests/robust/corpus/``) or per case
the long campaign found failing (``bench/out/fuzz-found/``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bench.fuzzing.cases import Case
from bench.fuzzing.oracle import Outcome


def load_corpus(path: Path) -> list[dict[str, Any]]:
    """Entries of a corpus file: ``{"case": {...}, "bug": "...", "xfail": "..."?}``."""
    out: list[dict[str, Any]] = []
    for p in sorted(path.glob("*.json")):
        out.append({"file": p.name, **json.loads(p.read_text())})
    return out


def save_case(path: Path, case: Case, outcome: Outcome, note: str = "") -> Path:
    """Write one failing case as a small JSON file (its name from a hash of the case)."""
    path.mkdir(parents=True, exist_ok=True)
    body = json.dumps(case.to_json(), sort_keys=True)
    name = f"{case.structure}-{hashlib.sha256(body.encode()).hexdigest()[:10]}.json"
    entry = {"case": case.to_json(), "found": f"{outcome.verdict}: {outcome.detail[:400]}",
             "note": note}
    (path / name).write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
    return path / name
