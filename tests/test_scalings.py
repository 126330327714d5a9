"""EKFAC's batch ``s*`` through each of its contractions against per-example gradients.

``batch_scalings`` picks, by shape and platform, between the per-example gradients as one batched
product or the position Gramians (GPU/TPU, by memory), a loop over the examples in ``chunks``
vmapped chunks (CPU; ``gcd(N, devices)`` chunks, 8 devices in the tests), and for ``T = 1`` the
squares' product. On a CPU-only CI the transform tests
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

from ekfac_optax.curvature import _scalings

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
        "position Gramians": _scalings._position_gramians,
        **{
            f"loop, {chunks} chunks": lambda h, d, c=chunks: _scalings._per_example_loop(h, d, c)
            for chunks in (1, 2, n)
        },
    }
    for name, contraction in contractions.items():
        actual = np.asarray(jax.jit(contraction)(h, delta))
        np.testing.assert_allclose(actual, expected, rtol=RTOL, err_msg=name)


# (N, T, d_in, b, bias, bases): many positions (the conv case the update rotates G_n for), one
# position, a side without a basis (capped) on either side.
ROTATED = [
    (6, 12, 4, 3, True, "ab"),
    (6, 1, 5, 4, False, "ab"),
    (4, 9, 3, 5, True, "a"),
    (4, 9, 3, 5, False, "b"),
]


@pytest.mark.parametrize("shape", ROTATED)
@pytest.mark.parametrize("batched", [True, False])
def test_rotated_per_example_gradients_match_the_projected_inputs(shape, batched):
    """``rotated_batch_scalings`` (G_n formed, then rotated) equals ``mean_n (U_Aᵀ G_n U_B)²``
    computed here from the per-example gradients of ``h_aug`` (the bias a constant-1 input)."""
    n, t, d_in, b, has_bias, bases = shape
    keys = jax.random.split(jax.random.key(1), 4)
    h = jax.random.normal(keys[0], (n, t, d_in), jnp.float64)
    delta = jax.random.normal(keys[1], (n, t, b), jnp.float64)
    a = d_in + has_bias
    basis_a = jnp.linalg.qr(jax.random.normal(keys[2], (a, a), jnp.float64))[0]
    basis_b = jnp.linalg.qr(jax.random.normal(keys[3], (b, b), jnp.float64))[0]
    h_aug = jnp.concatenate([h, jnp.ones((n, t, 1))], axis=-1) if has_bias else h
    grads = ref.per_example_grads(
        lambda w, h, d: jnp.mean(jnp.sum((h @ w) * d, axis=(1, 2))),
        jnp.zeros((a, b), jnp.float64),
        h_aug,
        delta,
    )
    u_a = basis_a if "a" in bases else np.eye(a)
    u_b = basis_b if "b" in bases else np.eye(b)
    expected = np.mean(ref.to_kfe(np.asarray(grads), u_a, u_b) ** 2, axis=0)
    actual = _scalings.rotated_batch_scalings(
        h,
        delta,
        basis_a if "a" in bases else None,
        basis_b if "b" in bases else None,
        has_bias,
        batched=batched,
    )
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL)


def test_the_update_rotates_per_example_gradients_where_that_is_cheaper():
    """The cost model picks G_n first for a 3x3, 64-channel conv at 32x32 (T = 1024, a = 577,
    b = 64) and a small conv, and the projections for a dense layer (T = 1) and a short
    sequence of wide projections (T = 32, a = b = 128)."""
    for t, a, b in [(1024, 577, 64), (256, 28, 32)]:
        project, per_example = _scalings.rotate_first_cost(t, a, b, True, True)
        assert per_example < project, (t, a, b)
    for t, a, b in [(1, 785, 1024), (32, 128, 128)]:
        project, per_example = _scalings.rotate_first_cost(t, a, b, True, True)
        assert project < per_example, (t, a, b)
