"""Test configuration: float64 is enabled so that references can be exact."""

import jax

jax.config.update("jax_enable_x64", True)
