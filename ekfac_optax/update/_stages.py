"""The stages of one update, per block: factors, eigenbases, preconditioning, fallback.

1. :func:`batch_factors`: this batch's ``A`` and ``B`` of a layer; :func:`new_factors`: their
   moving averages.
2. :func:`new_bases`: their eigenbases (amortized: called every ``basis_update_every``
   updates); the scalings restart from KFAC's eigenvalues.
3. :func:`precondition`: ``U_A [(U_Aᵀ g U_B) / (s + damping)] U_Bᵀ`` with the scalings
   ``s`` of the configured rule (``_scalings``); diagonal blocks divide by their exact
   per-example second moments.
4. :func:`fallback`: ``g / (s + damping)`` for every parameter in no block.

Each takes the block's :class:`~ekfac_optax.kinds._blocks.BlockSpec` and state and the
static :class:`Config`; stacked blocks (``spec.stack``: lifted copies of a layer,
groups) are mapped over.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.curvature import _eigenbasis, _factors, _scalings
from ekfac_optax.kinds import _blocks, _patches


def _stacked(fn, spec):
    """``fn`` of one block, mapped over the leading axes of a stacked block."""
    return _blocks.vmapped(fn, spec.stack)


class Config(NamedTuple):
    """The static configuration the stages share: the scaling rule and the factors' options."""

    rule: _scalings.ScalingRule
    factor_decay: Any
    damping_mode: _scalings.DampingMode
    weight_sharing: _factors.WeightSharing
    factor_update_every: int = 1


def batch_factors(spec, h, delta, config: Config, attend=None):
    """This batch's factors ``(A, B)`` of one block (``None`` for a diagonal block), from its
    ``h`` and ``delta`` (and, for a tied embedding, ``attend``: its attend calls' ``(h,
    delta)``)."""
    if spec.block == "diagonal":
        return None
    if spec.tied:
        return _factors.tied_factors(h, delta, *attend, spec.d_in, spec.diagonal_b)
    if spec.block == "embed":
        new_a = _factors.token_frequencies(h, spec.d_in, spec.dtype)
        return new_a, _factors.factor_b(delta, spec.diagonal_b)

    def one(h, delta):
        h, delta = _factors.shared(h, delta, config.weight_sharing)
        return (
            _factors.factor_a(h, spec.has_bias, spec.diagonal_a),
            _factors.factor_b(delta, spec.diagonal_b),
        )

    return _stacked(one, spec)(h, delta)


def new_factors(block, fresh, count, config: Config):
    """Stage 1: the moving averages of the factors with this batch's ``fresh = (A, B)`` of
    :func:`batch_factors` (a diagonal block, ``fresh=None``: unchanged)."""
    if fresh is None:
        return block
    new_a, new_b = fresh
    return block._replace(
        factor_a=_factors.debiased_ema(block.factor_a, new_a, config.factor_decay, count),
        factor_b=_factors.debiased_ema(block.factor_b, new_b, config.factor_decay, count),
    )


def _positions(spec, h, config: Config) -> int:
    """``T`` of KFAC's ``T · S_A ⊗ S_B``: 1 for K-FAC-reduce (an embedding always expands)."""
    if config.weight_sharing == "reduce" and spec.block == "kronecker":
        return 1
    return h.shape[-1] if spec.block == "embed" else h.shape[-2]


def new_bases(specs, blocks, h, mesh, config: Config, count):
    """Stage 2: the eigenbases of the factors; the scalings restart from KFAC's eigenvalues.

    A side kept diagonal (``spec.diagonal_a``/``diagonal_b``: an embedding's input side, a side
    above ``max_factor_dim``) has the identity as its basis (``None``) and its diagonal as its
    eigenvalues; every other factor is decomposed, all of them in one :func:`eigh_all`.
    """
    sides = [
        (path, side)
        for path, spec in specs.items()
        if spec.block != "diagonal"
        for side, diagonal in (("a", spec.diagonal_a), ("b", spec.diagonal_b))
        if not diagonal
    ]
    decomposed = _eigenbasis.eigh_all(
        [getattr(blocks[p], f"factor_{x}") for p, x in sides],
        [(getattr(blocks[p], f"eigvals_{x}"), getattr(blocks[p], f"basis_{x}")) for p, x in sides],
        mesh,
    )
    pairs = dict(zip(sides, decomposed, strict=True))
    out = dict(blocks)
    for path, spec in specs.items():
        if spec.block == "diagonal":
            continue
        block = blocks[path]
        eigvals_a, basis_a = pairs.get((path, "a"), (block.factor_a, None))
        eigvals_b, basis_b = pairs.get((path, "b"), (block.factor_b, None))
        positions = _positions(spec, h[path], config)
        old_a = getattr(block, "basis_a", None)

        def restart(
            slot, eigvals_a, eigvals_b, old_a, basis_a, old_b, basis_b, positions=positions
        ):
            kfac = _scalings.kfac_scalings(eigvals_a, eigvals_b, positions)
            rotation_a, rotation_b = (
                None if new is None else old.T @ new
                for old, new in ((old_a, basis_a), (old_b, basis_b))
            )

            def to_kfe(matrix):
                return _eigenbasis.to_eigenbasis(matrix, basis_a, basis_b)

            change = _scalings.BasisChange(kfac, rotation_a, rotation_b, to_kfe, count)
            return config.rule.restart(slot, change)

        new = dict(eigvals_a=eigvals_a, eigvals_b=eigvals_b, basis_b=basis_b)
        if spec.block == "kronecker":
            new["basis_a"] = basis_a
        slot = _stacked(restart, spec)(
            block.scalings, eigvals_a, eigvals_b, old_a, basis_a, block.basis_b, basis_b
        )
        out[path] = block._replace(scalings=slot, **new)
    return out


def _kfe_step(block, grad, basis_a, batch, n, count, damping, positions, config: Config):
    """``(update in the KFE, new slot)`` of the configured rule for one Kronecker or embedding
    block; ``batch()`` computes this batch's ``s*``."""

    def to_kfe(matrix):
        return _eigenbasis.to_eigenbasis(matrix, basis_a, block.basis_b)

    def divide(scalings):
        denominator = _scalings.damped(
            scalings, damping, block.eigvals_a, block.eigvals_b, positions, config.damping_mode
        )
        return _scalings.divide(grad_kfe, denominator, damping)

    grad_kfe = to_kfe(grad)
    context = _scalings.Context(grad_kfe, batch, n, count, grad, to_kfe)
    return config.rule.step(block.scalings, context, divide)


def _member_second_moments(spec, basis_a, basis_b, h, delta, attend=None):
    """:func:`batch_second_moments` of one member of a stacked block (or of an embedding)."""
    if spec.block == "diagonal":
        per_example = _scalings.scale_and_shift_grads(h, delta, spec.names)
        return jnp.mean(per_example**2, axis=0)
    if spec.block == "kronecker":
        project, per_example = _scalings.rotate_first_cost(
            h.shape[-2], spec.d_in_aug, spec.d_out, basis_a is not None, basis_b is not None
        )
        if per_example < project:  # many positions (convolutions): rotate G_n, not h and delta
            return _scalings.rotated_batch_scalings(h, delta, basis_a, basis_b, spec.has_bias)
    delta_kfe = _eigenbasis.outputs_to_eigenbasis(delta, basis_b)
    if spec.tied:
        attend_h, attend_delta = attend
        attend_kfe = _eigenbasis.outputs_to_eigenbasis(attend_h, basis_b)
        return _scalings.tied_embedding_batch_scalings(h, delta_kfe, attend_delta, attend_kfe)
    if spec.block == "embed":
        return _scalings.embedding_batch_scalings(h, delta_kfe, spec.d_in)
    h_kfe = _eigenbasis.inputs_to_eigenbasis(_patches.dense(h), basis_a, spec.has_bias)
    return _scalings.batch_scalings(h_kfe, delta_kfe)


def batch_second_moments(spec, block, h, delta, attend=None):
    """``s*`` of this batch for one block: the mean over examples of the squared per-example
    gradients in the block's KFE, ``(U_Aᵀ G_n U_B)²``, or of a diagonal block's exact
    per-example gradients (``attend``: a tied embedding's attend calls' ``(h, delta)``)."""
    if spec.block == "embed":
        return _member_second_moments(spec, None, block.basis_b, h, delta, attend)
    bases = (None, None) if spec.block == "diagonal" else (block.basis_a, block.basis_b)

    def one(basis_a, basis_b, h, delta):
        return _member_second_moments(spec, basis_a, basis_b, h, delta)

    return _stacked(one, spec)(*bases, h, delta)


def precondition(
    spec,
    block,
    grad,
    h,
    delta,
    n,
    count,
    damping,
    config: Config,
    attend=None,
    accumulated=None,
    refreshed=None,
):
    """Stage 3: one block's update in the parameter basis, and its new state (``attend``: a
    tied embedding's attend calls' ``(h, delta)``).

    ``accumulated``: ``s*`` of several micro-batches measured in the state's basis before this
    update (``_microbatch``), used in place of this batch's own, except on an update that
    changed the basis (``refreshed``): only this batch's can be measured in the new basis.
    """

    def batch_of(basis_a, basis_b, h, delta, accumulated):
        def fresh():
            return _member_second_moments(spec, basis_a, basis_b, h, delta, attend)

        if accumulated is None:
            return fresh
        if spec.block == "diagonal":  # no basis: the accumulated s* is exact on every update
            return lambda: accumulated
        return lambda: jax.lax.cond(refreshed, fresh, lambda: accumulated)

    if spec.block == "diagonal":

        def one_diagonal(slot, grad, h, delta, accumulated):
            batch = batch_of(None, None, h, delta, accumulated)
            context = _scalings.Context(grad, batch, n, count, grad, _scalings._identity)
            return config.rule.diagonal_step(slot, context, damping, config.damping_mode)

        update, slot = _stacked(one_diagonal, spec)(block.scalings, grad, h, delta, accumulated)
        return update, block._replace(scalings=slot)
    positions = _positions(spec, h, config)
    if spec.block == "embed":
        batch = batch_of(None, block.basis_b, h, delta, accumulated)
        divided, slot = _kfe_step(block, grad, None, batch, n, count, damping, positions, config)
        update = _eigenbasis.from_eigenbasis(divided, None, block.basis_b)
        return update, block._replace(scalings=slot)

    def one(block, grad, h, delta, accumulated):
        batch = batch_of(block.basis_a, block.basis_b, h, delta, accumulated)
        divided, slot = _kfe_step(
            block, grad, block.basis_a, batch, n, count, damping, positions, config
        )
        return _eigenbasis.from_eigenbasis(divided, block.basis_a, block.basis_b), slot

    update, slot = _stacked(one, spec)(block, grad, h, delta, accumulated)
    return update, block._replace(scalings=slot)


def fallback(leaves, state, n, count, damping, config: Config):
    """Stage 4: the diagonal fallback ``g / (s + damping)``, ``s`` the rule's debiased average
    of ``N g²``; ``(updates, new state)`` keyed by parameter path."""
    updates, new_state = {}, {}
    for path, grad in leaves.items():
        g = grad.astype(jax.tree.leaves(state[path])[0].dtype)
        divided, new_state[path] = config.rule.fallback_step(
            state[path], g, n, count, damping, config.damping_mode
        )
        updates[path] = divided.astype(grad.dtype)
    return updates, new_state
