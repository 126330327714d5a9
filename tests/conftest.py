"""Test configuration: float64 is enabled so that references can be exact, and the CPU shows 8
devices (``test_distributed.py``); set before JAX starts, unless XLA_FLAGS already says."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
