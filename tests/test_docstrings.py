"""Every docstring example in the kpnet package runs and prints what it shows.

Examples that need user files or trained models are marked ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kpnet

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(kpnet.__path__, "kpnet.")
    if not m.name.endswith("__main__")  # importing it would run the command line
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, capsys):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, capsys.readouterr().out[-3000:]
