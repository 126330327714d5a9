"""The docstring examples of the library run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import ekfac_optax

MODULES = [f"ekfac_optax.{m.name}" for m in pkgutil.iter_modules(ekfac_optax.__path__, prefix="")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
