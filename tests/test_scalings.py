"""EKFAC's batch ``s*`` through each of its contractions against per-example gradients.

``batch_scalings`` picks, by shape and platform, between the per-example gradients as one batched
product (GPU/TPU), a loop over the examples in ``chunks`` vmapped chunks (CPU; ``gcd(N, devices)``
chunks, 8 devices in the tests), and the position Gramians. On a CPU-only CI the transform tests
reach only the CPU branch, so every contraction is called here directly on shapes that would pick
each, and compared with ``mean_n G_n²`` from ``jax.vmap(jax.grad(...))`` of ``Σ_t h_tᵀ W δ_t``.

Tolerance: float64 sums of at most ``N T = 60`` products of unit normals, so the round-off is
about ``60 · 1e-16`` relative; ``1e-12`` leaves a wide margin, while a missing square, mean or
position changes ``s*`` by O(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

from ekfac_optax import _scalings

RTOL = 1e-12

# (N, T, a, b): per-example path (a b <= T² (a + b)), Gramian path with T > 1, and T = 1.
SHAPES = [(6, 5, 4, 3), (6, 10, 7, 2), (6, 2, 9, 8), (6, 1, 5, 4)]


def per_example_second_moments(h: jax.Array, delta: jax.Array) -> np.ndarray:
    """``mean_n G_n²`` with ``G_n`` the gradient of ``Σ_t h_{n,t}ᵀ W δ_{n,t}`` in ``W``."""

    def bilinear(weights, h, delta):  # the batch mean, as ref.per_example_grads expects
        return jnp.mean(jnp.sum((h @ weights) * delta, axis=(1, 2)))

    weights = jnp.zeros((h.shape[-1], delta.shape[-1]), h.dtype)
    grads = ref.per_example_grads(bilinear, weights, h, delta)
    return np.mean(np.asarray(grads) ** 2, axis=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_contraction_matches_per_example_gradients(shape):
    n, t, a, b = shape
    key_h, key_delta = jax.random.split(jax.random.key(0))
    h = jax.random.normal(key_h, (n, t, a), jnp.float64)
    delta = jax.random.normal(key_delta, (n, t, b), jnp.float64)
    expected = per_example_second_moments(h, delta)
    contractions = {
        "batch_scalings": _scalings.batch_scalings,
        "batched": _scalings._per_example_batched,
        **{
            f"loop, {chunks} chunks": lambda h, d, c=chunks: _scalings._per_example_loop(h, d, c)
            for chunks in (1, 2, n)
        },
    }
    for name, contraction in contractions.items():
        actual = np.asarray(jax.jit(contraction)(h, delta))
        np.testing.assert_allclose(actual, expected, rtol=RTOL, err_msg=name)
