"""Kronecker factors ``A = E[h_aug h_augᵀ]``, ``B = E[delta deltaᵀ]`` and their averages."""

import jax
import jax.numpy as jnp


def factor_a(h_aug: jax.Array) -> jax.Array:
    """``A = mean_{n,t} h_aug_{n,t} h_aug_{n,t}ᵀ`` from ``(N, T, d_in_aug)`` inputs."""
    n, t, _ = h_aug.shape
    return jnp.einsum("nti,ntj->ij", h_aug, h_aug) / (n * t)


def factor_b(delta: jax.Array) -> jax.Array:
    """``B = mean_{n,t} delta_{n,t} delta_{n,t}ᵀ`` from ``(N, T, d_out)`` output gradients."""
    n, t, _ = delta.shape
    return jnp.einsum("nto,ntp->op", delta, delta) / (n * t)


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
