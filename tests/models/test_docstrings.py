"""The Example sections of models/ run (doctest), so they cannot rot."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = ["layers", "base", "mptrec", "baselines", "ple", "new_task", "accounting", "registry"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    torch.set_num_threads(1)
    module = importlib.import_module(f"mptrec.models.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
