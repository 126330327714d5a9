"""Kronecker factors ``A = E[h_aug h_augᵀ]``, ``B = E[delta deltaᵀ]`` and their averages."""

from typing import Literal

import jax
import jax.numpy as jnp

from ekfac_optax.kinds import _patches

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
    if isinstance(h, _patches.Patches):
        mean = h.position_mean()
    else:
        mean = jnp.mean(h, axis=-2, keepdims=True)
    return mean, jnp.sum(delta, axis=-2, keepdims=True)


def factor_a(h: jax.Array, has_bias: bool, diagonal: bool = False) -> jax.Array:
    """``A = mean_{n,t} h_aug_{n,t} h_aug_{n,t}ᵀ`` from ``(N, T, d_in)`` inputs (a convolution's
    :class:`~ekfac_optax.kinds._patches.Patches`: materialised a chunk of examples at a time).

    With a bias, ``h_aug = [h; 1]`` and ``A = [[E[h hᵀ], E[h]], [E[h]ᵀ, 1]]``, assembled from
    ``hᵀh`` and the column sums, so that ``h_aug`` is never materialised (on CPU the concatenated
    operand makes the matmul about 1.3x slower). With ``diagonal``, only ``diag(A)``, a
    ``(d_in_aug,)`` vector (a side above the preconditioner's ``max_factor_dim``).
    """
    if isinstance(h, _patches.Patches):
        second, mean = _patches.moments(h, diagonal)
    else:  # the same second moment as B's, of the inputs
        second, mean = factor_b(h, diagonal), jnp.mean(h, axis=(0, 1))
    if not has_bias:
        return second
    if diagonal:
        return jnp.concatenate([second, jnp.ones((1,), h.dtype)])
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


def _trace(factor: jax.Array) -> jax.Array:
    """The trace of a factor kept as a matrix or as its diagonal."""
    return jnp.sum(factor) if factor.ndim == 1 else jnp.trace(factor)


def tied_factors(
    ids: jax.Array,
    delta: jax.Array,
    attend_h: jax.Array,
    attend_delta: jax.Array,
    vocab: int,
    diagonal_b: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The factors of a tied embedding ``E`` (``vocab x d``), used as a lookup and as ``attend``.

    Each use alone is a Kronecker block of the ``(vocab, d)`` matrix: the lookup
    ``F_1 = T A_1 ⊗ B_1`` with ``A_1 = diag(token frequencies)`` and ``B_1 = E[δ δᵀ]`` over its
    ``T`` positions; ``attend`` (``logits = x Eᵀ``: the vocabulary is its output side)
    ``F_2 = S A_2 ⊗ B_2`` with ``A_2 = diag E[g²]`` of the logits' gradients ``g`` (a
    vocabulary-sized side is never decomposed) and ``B_2 = E[x xᵀ]`` over its ``S`` positions.
    The tied weight's Fisher is ``F_1 + F_2`` (cross terms dropped, as between the positions of
    one layer), which is no Kronecker product, and the two width-side moments have different
    units (output gradients, activations), so their plain sum would be dominated by one use.
    Each side is instead the partial trace of ``F = F_1 + F_2`` over the other side:

        ``A ∝ Tr_d F = T tr(B_1) A_1 + S tr(B_2) A_2``,
        ``B ∝ Tr_vocab F = T tr(A_1) B_1 + S tr(A_2) B_2``,

    each use's moment weighted by its positions and the size of its other side. ``B`` is the
    width-side factor of ``E[G_nᵀ G_n]`` (Shampoo's right factor), whose eigenbasis EKFAC uses;
    the scale is ``T A ⊗ B = Tr_d F ⊗ Tr_vocab F / tr F``, which equals ``F`` whenever it is one
    Kronecker product (either use alone), so KFAC reduces to each use's own block.

    Args:
      ids: ``(N, T)`` token ids of the lookups.
      delta: ``(N, T, d)`` the lookups' output gradients.
      attend_h: ``(N, S, d)`` the attend calls' inputs.
      attend_delta: ``(N, S, vocab)`` the attend calls' output gradients.
      vocab: the vocabulary size.
      diagonal_b: keep only the diagonal of ``B`` (a width above ``max_factor_dim``).

    Returns:
      ``(A, B)``: a ``(vocab,)`` vector and a ``(d, d)`` matrix (``(d,)`` with ``diagonal_b``)
      with ``T · A ⊗ B = Tr_d F ⊗ Tr_vocab F / tr F``.
    """
    t, s = ids.shape[-1], attend_h.shape[-2]
    a_1 = token_frequencies(ids, vocab, delta.dtype)
    b_1 = factor_b(delta, diagonal_b)
    a_2 = factor_b(attend_delta, diagonal=True)
    b_2 = factor_b(attend_h, diagonal_b)
    side_a = t * _trace(b_1) * a_1 + s * _trace(b_2) * a_2
    side_b = t * _trace(a_1) * b_1 + s * _trace(a_2) * b_2
    total = t * _trace(a_1) * _trace(b_1) + s * _trace(a_2) * _trace(b_2)
    norm = jnp.sqrt(t * jnp.where(total > 0, total, 1))
    return side_a / norm, side_b / norm


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
