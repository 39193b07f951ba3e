"""Broken variants built from the real source, for the tests that name one in their docstring.

``mutant`` compiles a copy of one function with one anchored text edit; ``breaks`` swaps it
in for a test run parametrized over ``"kernel"`` (the real code) and the broken variants.
docs/testing.md says how a test declares and builds its broken variant.
"""

from __future__ import annotations
import __future__

import inspect
import sys
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any


def breaks(variant: str, monkeypatch: Any, owner: Any, name: str, old: str, new: str) -> None:
    """Unless ``variant`` is ``"kernel"``, replace ``owner.name`` by its ``mutant`` for the
    test (``monkeypatch`` undoes it)."""
    if variant != "kernel":
        monkeypatch.setattr(owner, name, mutant(owner, name, old, new))


def mutant(owner: object, name: str, old: str, new: str) -> Any:
    """A deliberately broken copy of function ``owner.name``: its source with ``old`` replaced
    by ``new``, compiled in the original module's globals. Fails loudly if ``old`` is not in
    the source, so a refactor cannot silently defuse a test's broken variant."""
    fn = getattr(owner, name)
    fn = getattr(fn, "__func__", fn)
    src = textwrap.dedent(inspect.getsource(fn))
    if src.count(old) != 1:
        raise AssertionError(f"mutation anchor not found exactly once in {name}: {old!r}")
    src = src.replace(old, new)
    module = sys.modules[fn.__module__]
    ns: dict[str, Any] = {}
    code = compile(
        src, f"<mutant {name}>", "exec", flags=__future__.annotations.compiler_flag,
        dont_inherit=True,
    )
    exec(code, module.__dict__, ns)
    return ns[name]


def _only_assertions(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_assertions(e) for e in exc.exceptions)
    return isinstance(exc, AssertionError)


def holds(check: Callable[[], object]) -> bool:
    """Whether ``check()`` returns without failing one of its asserts (a test's body run as
    the check whose outcome a broken variant must flip); any other exception propagates."""
    try:
        check()
    except BaseException as exc:
        if _only_assertions(exc):
            return False
        raise
    return True


async def aholds(check: Callable[[], Awaitable[object]]) -> bool:
    """``holds`` for an async check (an assert failed inside a nursery counts as failed)."""
    try:
        await check()
    except BaseException as exc:
        if _only_assertions(exc):
            return False
        raise
    return True
