"""Benchmarks of ekfac_optax against its peers (``python -m benchmarks.<name>``).

On CPU, JAX's ``eigh`` calls LAPACK from OpenBLAS, whose own threads compete with XLA's: on this
project's 2-core machine under load, an ``eigh`` of a 257x257 covariance took 12-864 ms with
OpenBLAS's default threads against 5-17 ms with one. A benchmark started as a program therefore
runs OpenBLAS single-threaded unless ``OPENBLAS_NUM_THREADS`` is already set; ``machine_info``
reports the value. The variable is read when OpenBLAS loads, so it is set only if numpy is not
loaded yet: importing the benchmarks into a running process (the smoke tests) changes nothing,
not even the environment its subprocesses inherit.
"""

import os
import sys

if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
