"""Kronecker factors ``A = E[h_aug h_augᵀ]``, ``B = E[delta deltaᵀ]`` and their averages."""

from typing import Literal

import jax
import jax.numpy as jnp

WeightSharing = Literal["expand", "reduce"]


def shared(h: jax.Array, delta: jax.Array, weight_sharing: WeightSharing):
    """The ``(N, T, ·)`` statistics whose means over ``(n, t)`` are the factors.

    ``"expand"`` (K-FAC-expand): ``h`` and ``delta`` as they are, every position a
    sample. ``"reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023): one sample per
    example, ``mean_t h`` and ``Σ_t delta`` (``T = 1``), so that
    ``A = mean_n h̄_n h̄_nᵀ`` and ``B = mean_n δ̄_n δ̄_nᵀ``; the bias coordinate's
    mean is still 1.
    """
    if weight_sharing == "expand":
        return h, delta
    return jnp.mean(h, axis=-2, keepdims=True), jnp.sum(delta, axis=-2, keepdims=True)


def factor_a(h: jax.Array, has_bias: bool, diagonal: bool = False) -> jax.Array:
    """``A = mean_{n,t} h_aug_{n,t} h_aug_{n,t}ᵀ`` from ``(N, T, d_in)`` inputs.

    With a bias, ``h_aug = [h; 1]`` and ``A = [[E[h hᵀ], E[h]], [E[h]ᵀ, 1]]``, assembled from
    ``hᵀh`` and the column sums, so that ``h_aug`` is never materialised (on CPU the concatenated
    operand makes the matmul about 1.3x slower). With ``diagonal``, only ``diag(A)``, a
    ``(d_in_aug,)`` vector (a side above the preconditioner's ``max_factor_dim``).
    """
    second = factor_b(h, diagonal)  # the same second moment, of the inputs
    if not has_bias:
        return second
    if diagonal:
        return jnp.concatenate([second, jnp.ones((1,), h.dtype)])
    mean = jnp.mean(h, axis=(0, 1))
    one = jnp.ones((1, 1), h.dtype)
    return jnp.block([[second, mean[:, None]], [mean[None, :], one]])


def factor_b(delta: jax.Array, diagonal: bool = False) -> jax.Array:
    """``B = mean_{n,t} delta_{n,t} delta_{n,t}ᵀ`` from ``(N, T, d_out)`` output gradients;
    with ``diagonal``, only ``diag(B) = mean_{n,t} delta_{n,t}²``, a ``(d_out,)`` vector."""
    if diagonal:
        return jnp.mean(delta * delta, axis=(0, 1))
    n, t, d = delta.shape
    flat = delta.reshape(n * t, d)
    return flat.T @ flat / (n * t)


def token_frequencies(ids: jax.Array, vocab: int, dtype) -> jax.Array:
    """The diagonal of ``A = mean_{n,t} onehot(x_{n,t}) onehot(x_{n,t})ᵀ``: each token's count
    over ``N T``, as a ``(vocab,)`` vector (ids outside ``[0, vocab)`` count for nothing)."""
    counts = jax.ops.segment_sum(jnp.ones(ids.size, dtype), ids.ravel(), num_segments=vocab)
    return counts / ids.size


def debiased_ema(average: jax.Array, new: jax.Array, decay, count: jax.Array) -> jax.Array:
    """Exponential moving average without zero-initialisation bias.

    With ``m_k = decay m_{k-1} + (1 - decay) x_k`` and ``m_0 = 0``, returns the
    debiased ``m_k / (1 - decay^k)`` for ``k = count + 1`` given the previous
    debiased value ``average``: ``(1 - w) average + w new`` with
    ``w = (1 - decay) / (1 - decay^k)``. ``decay = 0`` keeps only ``new``;
    the first update (``count = 0``) returns ``new`` whatever the decay.
    """
    k = (count + 1).astype(average.dtype)
    decay = jnp.asarray(decay, average.dtype)
    weight = (1 - decay) / (1 - decay**k)
    return (1 - weight) * average + weight * new
