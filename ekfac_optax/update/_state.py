"""The optimizer's state: a :class:`ScaleByEkfacState` with one entry per block
(:class:`BlockState`, :class:`EmbedState`, :class:`DiagonalState`) and per fallback parameter, and
how a block's entry starts (:func:`init_block`). The update (``_transform``, ``_step``) reads
and writes these; the scalings' own slot in them is the rule's (``_scalings``)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.curvature import _scalings
from ekfac_optax.kinds import _blocks


class BlockState(NamedTuple):
    """Curvature of one Kronecker block; ``a = d_in (+1 with bias)``, ``b = d_out``.

    A stacked block (``spec.stack``, e.g. ``(L,)`` scanned layers or ``(G,)`` groups) has those
    leading axes on every field. A side above ``max_factor_dim`` (``spec.diagonal_a`` or
    ``diagonal_b``) keeps only its diagonal: its factor is a vector, its eigenvalues are that
    diagonal at the last basis update and its basis is ``None`` (the identity).

    Attributes:
      factor_a: ``(a, a)`` moving average of ``A = E[h_aug h_augᵀ]`` (capped: ``(a,)``, its
        diagonal).
      factor_b: ``(b, b)`` moving average of ``B = E[delta deltaᵀ]`` (capped: ``(b,)``).
      eigvals_a: ``(a,)`` eigenvalues ``S_A`` of ``factor_a`` at the last basis update.
      basis_a: ``(a, a)`` eigenvectors ``U_A`` (columns); ``None`` when capped.
      eigvals_b: ``(b,)`` eigenvalues ``S_B`` of ``factor_b``.
      basis_b: ``(b, b)`` eigenvectors ``U_B`` (columns); ``None`` when capped.
      scalings: ``(a, b)`` the scalings ``s`` of the last update, in the KFE: the rule's slot
        (KFE-Adam: an :class:`AdamSlot` of two such arrays).
    """

    factor_a: jax.Array
    factor_b: jax.Array
    eigvals_a: jax.Array
    basis_a: jax.Array
    eigvals_b: jax.Array
    basis_b: jax.Array
    scalings: jax.Array


class EmbedState(NamedTuple):
    """Curvature of an embedding ``(v, b)``: a Kronecker block whose ``A`` is diagonal, so that
    ``U_A = I`` and only ``B`` is decomposed.

    Attributes:
      factor_a: ``(v,)`` moving average of the token frequencies, the diagonal of ``A``.
      factor_b: ``(b, b)`` moving average of ``B = E[delta deltaᵀ]`` (``(b,)``, its diagonal,
        above ``max_factor_dim``).
      eigvals_a: ``(v,)`` ``factor_a`` at the last basis update.
      eigvals_b: ``(b,)`` eigenvalues ``S_B`` of ``factor_b``.
      basis_b: ``(b, b)`` eigenvectors ``U_B`` (columns); ``None`` above ``max_factor_dim``.
      scalings: ``(v, b)`` the scalings ``s`` of the last update, in the KFE (KFE-Adam: an
        :class:`AdamSlot`).
    """

    factor_a: jax.Array
    factor_b: jax.Array
    eigvals_a: jax.Array
    eigvals_b: jax.Array
    basis_b: jax.Array
    scalings: jax.Array


class DiagonalState(NamedTuple):
    """Curvature of a diagonal block (a normalisation's ``[scale; bias]``, ``P`` scalars).

    Attributes:
      scalings: ``(*stack, P)`` the diagonal ``s`` of the last update (KFE-Adam: an
        :class:`AdamSlot`).
    """

    scalings: jax.Array


class ScaleByEkfacState(NamedTuple):
    """State of :func:`scale_by_ekfac` and :func:`scale_by_kfac`.

    Attributes:
      count: ``()`` int32, number of updates applied so far (skipped ones excluded).
      skipped: ``()`` int32, number of updates skipped for non-finite numbers.
      blocks: one :class:`BlockState`, :class:`EmbedState` or :class:`DiagonalState`
        per block, keyed by module path; with ``stack_blocks=True``, one per group of
        same-shaped blocks, keyed by its first member's path, the members' states stacked
        along a new leading axis in the order of the blocks.
      fallback: with ``fallback="diagonal"``, the diagonal ``s`` of each parameter in no
        block (its shape; KFE-Adam: an :class:`AdamSlot`), keyed by its ``/``-joined parameter
        path; else empty.
    """

    count: jax.Array
    skipped: jax.Array
    blocks: dict[str, BlockState | EmbedState | DiagonalState]
    fallback: dict[str, jax.Array]


def init_block(spec: _blocks.BlockSpec, rule: _scalings.ScalingRule):
    a, b, dtype, stack = spec.d_in_aug, spec.d_out, spec.dtype, spec.stack
    if spec.block == "diagonal":
        return DiagonalState(scalings=rule.init((*stack, b), dtype))

    def side(d: int, diagonal: bool):
        """``(factor, eigvals, basis)`` of one side: a ``(d,)`` diagonal and no basis, or a
        ``(d, d)`` factor and the identity."""
        if diagonal:
            return jnp.zeros((*stack, d), dtype), jnp.zeros((*stack, d), dtype), None
        eye = jnp.broadcast_to(jnp.eye(d, dtype=dtype), (*stack, d, d))
        return jnp.zeros((*stack, d, d), dtype), jnp.zeros((*stack, d), dtype), eye

    factor_a, eigvals_a, basis_a = side(a, spec.diagonal_a)
    factor_b, eigvals_b, basis_b = side(b, spec.diagonal_b)
    scalings = rule.init((*stack, a, b), dtype)
    if spec.block == "embed":
        return EmbedState(factor_a, factor_b, eigvals_a, eigvals_b, basis_b, scalings)
    return BlockState(factor_a, factor_b, eigvals_a, basis_a, eigvals_b, basis_b, scalings)


def find_states(tree: Any) -> list[ScaleByEkfacState]:
    """Every :class:`ScaleByEkfacState` in an optimizer's state (a chain's, ``multi_steps``'),
    in the order of its leaves."""
    is_ours = lambda x: isinstance(x, ScaleByEkfacState)  # noqa: E731
    return [node for node in jax.tree.leaves(tree, is_leaf=is_ours) if is_ours(node)]
