"""Helpers shared by the test modules: the models, data, train-step recipe and tree comparisons.

Test modules import from here (and from ``reference.py``, the independent numeric reference);
no test module imports another.
"""

import os


def user_environment() -> dict[str, str]:
    """The environment without the suite's settings (8 host devices, float64), for a subprocess
    that runs as a user's would, with JAX's defaults."""
    env = dict(os.environ)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if "device_count" not in f]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAX_ENABLE_X64", None)
    return env
