"""The suite runs on the versions it was run with: every distribution `dvreward[dev]` pulls in is pinned in
tests/constraints.txt, and the installed one is that version (pytest 9 broke the schemathesis plugin once)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = Path(__file__).with_name("constraints.txt")
TOOLING = {"pip", "setuptools", "wheel"}  # the installer's own, which pip freeze leaves out
HINT = "install with the README's test command (pip install -e \".[dev]\" -c tests/constraints.txt)"


def _pins() -> dict[str, Version]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: a constraint is an exact version"
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def _closure(root: str, extras: set[str]) -> set[str]:
    """Every distribution installed for `root[extras]`, by the markers of this interpreter."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, ex = todo.pop()
        if (name, ex) in seen:
            continue
        seen.add((name, ex))
        names.add(name)
        for raw in md.requires(name) or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ex | {""}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return names - {root} - TOOLING


def test_every_dependency_of_the_suite_is_pinned_and_installed_at_its_pin() -> None:
    pins = _pins()
    needed = _closure("dvreward", {"dev"})
    assert {"pytest", "schemathesis", "hypothesis", "torch", "transformers"} <= needed
    unpinned = sorted(needed - set(pins))
    assert not unpinned, f"not pinned in {CONSTRAINTS.name}: {unpinned} (regenerate it: see its header)"
    wrong = {n: (md.version(n), str(pins[n])) for n in needed
             if Version(Version(md.version(n)).public) != pins[n]}
    assert not wrong, f"installed vs pinned: {wrong}; {HINT}"
