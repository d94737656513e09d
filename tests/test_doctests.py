"""Every docstring example in tilefx runs and prints what it says.

The modules are imported by their installed names (``tilefx.passes.memory``, not the
``passes/memory.py`` path pytest's ``--doctest-modules`` would import), so the examples see the
package exactly as users do.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tilefx
import tilefx.passes


def _modules() -> list[str]:
    names = []
    for pkg in (tilefx, tilefx.passes):
        for info in pkgutil.iter_modules(pkg.__path__):
            names.append(f"{pkg.__name__}.{info.name}")
    return sorted(set(names) - {"tilefx.passes"})


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save figures write here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_examples_are_found():
    """A broken collection would make every test above pass vacuously."""
    finder = doctest.DocTestFinder()
    total = sum(len(t.examples) for name in _modules()
                for t in finder.find(importlib.import_module(name)))
    assert total > 60
