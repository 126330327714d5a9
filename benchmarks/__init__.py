"""Benchmarks of ekfac_optax against its peers (``python -m benchmarks.<name>``).

On CPU, JAX's ``eigh`` calls LAPACK from OpenBLAS, whose own threads compete with XLA's: on this
project's 2-core machine under load, an ``eigh`` of a 257x257 covariance took 840-860 ms with
OpenBLAS's default threads against 5-17 ms with one. The benchmarks therefore run OpenBLAS
single-threaded unless ``OPENBLAS_NUM_THREADS`` is already set (it must be set before numpy or
jax load OpenBLAS, hence here); ``_common.machine_info`` reports the value.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
