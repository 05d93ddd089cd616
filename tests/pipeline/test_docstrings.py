"""The Example sections of the pipeline's small core modules run (doctest), so they cannot rot."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["strict", "rundir", "config"])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"mptrec.pipeline.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
