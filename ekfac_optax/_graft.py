"""Grafting: one transformation's step size per parameter on another's direction.

Agarwal, Anil, Hazan, Koren, Zhang. Disentangling Adaptive Gradient Methods from Learning Rates.
2020. https://arxiv.org/abs/2002.11803
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ekfac_optax.update._step import all_finite, select


class GraftState(NamedTuple):
    """State of :func:`graft`.

    Attributes:
      magnitude: the state of the transformation whose norms are kept.
      direction: the state of the transformation whose directions are kept.
    """

    magnitude: optax.OptState
    direction: optax.OptState


def _grafted(magnitude: jax.Array, direction: jax.Array) -> jax.Array:
    """``direction · ‖magnitude‖ / ‖direction‖`` (Frobenius norms); zeros where ``direction`` is."""
    norm_m = jnp.linalg.norm(magnitude.ravel())
    norm_d = jnp.linalg.norm(direction.ravel())
    scale = jnp.where(norm_d > 0, norm_m / jnp.where(norm_d > 0, norm_d, 1), 0)
    return (direction * scale).astype(direction.dtype)


def graft(
    magnitude: optax.GradientTransformation,
    direction: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Each parameter's update with the direction of ``direction`` and the norm of ``magnitude``.

    Per parameter (each leaf of the updates), with ``m`` and ``d`` the two transformations'
    updates of the same gradient, the update is ``d · ‖m‖_F / ‖d‖_F`` (zero where ``d = 0``).
    Grafting ``optax.scale_by_adam()`` onto a preconditioner gives it Adam's per-layer step sizes,
    so that the learning rate is Adam's and transfers across models and across the
    preconditioner's damping, while the direction within each layer stays the preconditioner's
    (Agarwal et al. 2020; Shampoo's AlgoPerf entry grafts onto Adam the same way). A stacked
    parameter (``nn.scan`` layers, ``(L, ...)``) is one leaf: its ``L`` layers share one norm.

    Extra arguments of ``update`` (``stats=``) reach both transformations (one that takes none
    ignores them, ``optax.with_extra_args_support``). A step whose gradient or either update is
    not finite returns zeros and leaves ``magnitude``'s state as it was (``direction`` guards its
    own, as :func:`scale_by_ekfac` does).

    Args:
      magnitude: the transformation whose per-parameter update norms are used, e.g.
        ``optax.scale_by_adam()``.
      direction: the transformation whose update directions are used, e.g.
        :func:`scale_by_ekfac`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with a :class:`GraftState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import ekfac_optax as ek
      >>> tx = ek.graft(optax.scale_by_adam(), optax.identity())
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> [round(x, 4) for x in updates["w"].tolist()]  # the gradient's direction, Adam's norm √2
      [0.8485, 1.1314]

    References:
      Agarwal, Anil, Hazan, Koren, Zhang. Disentangling Adaptive Gradient Methods from Learning
      Rates. 2020. https://arxiv.org/abs/2002.11803
    """
    magnitude = optax.with_extra_args_support(magnitude)
    direction = optax.with_extra_args_support(direction)

    def init_fn(params):
        return GraftState(magnitude=magnitude.init(params), direction=direction.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        m, magnitude_state = magnitude.update(updates, state.magnitude, params, **extra_args)
        d, direction_state = direction.update(updates, state.direction, params, **extra_args)
        finite = all_finite((updates, m, d))
        grafted = jax.tree.map(_grafted, m, d)
        zeros = jax.tree.map(jnp.zeros_like, d)
        magnitude_state, new_updates = select(
            finite, (magnitude_state, grafted), (state.magnitude, zeros)
        )
        return new_updates, GraftState(magnitude=magnitude_state, direction=direction_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
