"""A bound on a step's squared norm in the preconditioner's own curvature (KL clipping).

Ba, Grosse, Martens. Distributed Second-Order Optimization using Kronecker-Factored
Approximations. ICLR 2017. https://openreview.net/forum?id=SkkTMpjex
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ekfac_optax.curvature._scalings import concrete


class ClipByFisherNormState(NamedTuple):
    """State of :func:`clip_by_fisher_norm`.

    Attributes:
      count: ``()`` int32, the number of updates so far (the learning-rate schedule's step).
      preconditioner: the state of the wrapped preconditioner.
    """

    count: jax.Array
    preconditioner: optax.OptState


def inner_product(a, b) -> jax.Array:
    """``Σ aᵀb`` over the leaves of two pytrees, accumulated in at least float32."""
    total = jnp.zeros((), jnp.float32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
        total = total + jnp.vdot(x.astype(dtype), y.astype(dtype)).real
    return total


def clip_by_fisher_norm(
    preconditioner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    max_norm: jax.typing.ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """Scales ``preconditioner``'s update so that the step's squared curvature norm is bounded.

    With ``g`` the gradient, ``u = F̂⁻¹ g`` the preconditioned update (``F̂``: the
    preconditioner's damped curvature, e.g. EKFAC's ``U_A diag(s* + ε) U_Aᵀ ⊗ ...``) and ``η`` the
    learning rate that a later ``optax.scale_by_learning_rate(η)`` applies, the step ``-η u`` has
    the squared norm ``η² uᵀF̂u = η² gᵀu`` (about twice the KL divergence between the model's
    predictions before and after the step, where ``F̂`` approximates the Fisher). This returns
    ``c u`` with ``c = min(1, √(max_norm / (η² gᵀu)))``: steps within the bound are unchanged,
    longer ones are shortened to it. Once the bound is active the step no longer depends on
    ``η``, which is what makes a natural-gradient method safe across a learning-rate grid. It is
    kfac-jax's ``norm_constraint`` and Ba et al.'s KL clipping (their ``C``; 1e-3 here by
    default). Where ``gᵀu ≤ 0`` (not a positive-definite preconditioner's update) or ``η = 0``,
    ``c = 1``.

    Args:
      preconditioner: the transformation whose update ``u`` is scaled, e.g.
        :func:`scale_by_ekfac` (extra arguments of ``update`` such as ``stats=`` reach it).
      learning_rate: the learning rate ``η`` applied after this transformation: a float or an
        optax schedule (evaluated at this transformation's own count, as
        ``optax.scale_by_learning_rate`` does).
      max_norm: the bound on ``η² gᵀu``, ``> 0``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with a :class:`ClipByFisherNormState`.

    Raises:
      ValueError: ``max_norm ≤ 0``.

    Examples:
      The identity as the preconditioner (``F̂ = I``): a step of length ``η‖g‖ = 0.5`` is
      shortened to ``√max_norm = 0.1``.

      >>> import jax.numpy as jnp, optax
      >>> import ekfac_optax as ek
      >>> tx = optax.chain(
      ...     ek.clip_by_fisher_norm(optax.identity(), 0.1, max_norm=0.01),
      ...     optax.scale_by_learning_rate(0.1),
      ... )
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params))
      >>> [round(x, 4) for x in updates["w"].tolist()]
      [-0.06, -0.08]

    References:
      Ba, Grosse, Martens. Distributed Second-Order Optimization using Kronecker-Factored
      Approximations. ICLR 2017. https://openreview.net/forum?id=SkkTMpjex
    """
    bound = concrete("max_norm", max_norm)
    if bound is not None and not bound > 0:
        raise ValueError(f"clip_by_fisher_norm: max_norm must be > 0, got {max_norm!r}")
    preconditioner = optax.with_extra_args_support(preconditioner)

    def init_fn(params):
        return ClipByFisherNormState(
            count=jnp.zeros((), jnp.int32), preconditioner=preconditioner.init(params)
        )

    def update_fn(updates, state, params=None, **extra_args):
        direction, inner = preconditioner.update(
            updates, state.preconditioner, params, **extra_args
        )
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        product = inner_product(updates, direction)
        sq_norm = jnp.asarray(eta, product.dtype) ** 2 * product
        safe = jnp.where(sq_norm > 0, sq_norm, 1.0)
        coefficient = jnp.where(sq_norm > 0, jnp.minimum(1.0, jnp.sqrt(max_norm / safe)), 1.0)
        clipped = jax.tree.map(lambda u: (u * coefficient).astype(u.dtype), direction)
        return clipped, ClipByFisherNormState(optax.safe_increment(state.count), inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
