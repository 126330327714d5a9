"""The docstring examples of the library run and print what they say, with JAX's defaults
(float32), as a user runs them."""

import doctest
import importlib
import pkgutil

import jax
import pytest

import ekfac_optax

MODULES = [m.name for m in pkgutil.walk_packages(ekfac_optax.__path__, prefix="ekfac_optax.")]


@pytest.fixture
def float32_defaults():
    """JAX's defaults, as a user runs the examples (the suite enables float64 in conftest)."""
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, float32_defaults):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
