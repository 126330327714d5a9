"""Influence functions with the EKFAC curvature: per-example gradients and the scores
``g_qᵀ (F̂ + λI)⁻¹ g_m`` of every query against every training example.

Koh & Liang. Understanding Black-box Predictions via Influence Functions. ICML 2017.
https://arxiv.org/abs/1703.04730
Grosse et al. Studying Large Language Model Generalization with Influence Functions. 2023.
https://arxiv.org/abs/2308.03296
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ekfac_optax._norm_constraint import inner_product
from ekfac_optax._operator import Curvature
from ekfac_optax.kinds import _blocks


def per_example_grads(
    loss_fn: Callable[..., jax.Array], params: Any, *args: Any, chunk_size: int | None = None
) -> Any:
    """The gradient of each example's loss, a pytree like ``params`` with a leading axis ``N``.

    ``loss_fn(params, *args)`` returns the MEAN loss of a batch, as for
    :func:`value_grad_and_stats`; the loss of example ``n`` is that of the batch of one
    ``args[i][n:n+1]``, so its gradient is ``jax.grad(loss_fn)`` there: a model whose examples
    interact (batch statistics of a ``BatchNorm`` in training mode) has no per-example gradient.

    Args:
      loss_fn: ``(params, *args) -> ()`` mean loss of a batch.
      params: the parameters (a pytree of arrays), or an NNX model for ``loss_fn(model, ...)``
        (the result then has the model's structure).
      *args: the batch, arrays with a leading axis ``N`` (inputs, labels, ...).
      chunk_size: compute this many examples at a time (``jax.lax.map``), so that memory grows
        with ``chunk_size`` and not ``N`` in the backward passes; ``None``: all at once
        (``jax.vmap``).

    Returns:
      A pytree of the structure of ``params``, each leaf ``(N, *shape)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import ekfac_optax as ek
      >>> def loss_fn(w, x):
      ...     return jnp.mean((x @ w) ** 2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> ek.per_example_grads(loss_fn, jnp.ones(2), x, chunk_size=2).tolist()
      [[2.0, 0.0], [0.0, 8.0], [4.0, 4.0]]
    """
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if not args:
        raise TypeError("per_example_grads: pass the batch, arrays with a leading axis N")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(args)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "per_example_grads: every array of the batch needs the same leading axis N, got "
            f"shapes {[jnp.shape(x) for x in jax.tree.leaves(args)]}"
        )

    def one(example):
        return jax.grad(loss_fn)(params, *jax.tree.map(lambda x: x[None], example))

    if chunk_size is None:
        return jax.vmap(one)(args)
    return jax.lax.map(one, args, batch_size=chunk_size)


def influence(
    op: Curvature, train_grads: Any, query_grads: Any, damping: jax.typing.ArrayLike
) -> jax.Array:
    """The influence scores ``g_qᵀ (F̂ + λI)⁻¹ g_m`` of every query against every training
    example, a ``(Q, M)`` matrix.

    With ``F̂`` the curvature of :func:`curvature` (a Fisher or Gauss-Newton approximation of
    the loss's Hessian), ``-g_qᵀ (F̂ + λI)⁻¹ g_m / M`` is the first-order change of the query's
    loss when the training example ``m`` is up-weighted by ``1/M`` (Koh & Liang): large scores
    are the training examples that most support the query's prediction. Only the ``Q`` queries
    are solved for (``Q`` applications of :meth:`Curvature.solve`), then a ``(Q, P_i) x (P_i, M)``
    product per parameter, summed, at full float32 (or float64) precision (no copy of the
    training gradients).

    Args:
      op: the curvature, from :func:`curvature`.
      train_grads: the training examples' gradients, a pytree like the parameters with a
        leading axis ``M`` (:func:`per_example_grads`).
      query_grads: the queries' gradients, with a leading axis ``Q``.
      damping: ``λ >= 0``.

    Returns:
      A ``(Q, M)`` array.
    """
    with jax.default_matmul_precision("highest"):
        solved = jax.vmap(lambda q: op.solve(q, damping))(query_grads)
        train = jax.tree.leaves(_blocks.as_arrays(train_grads))
        dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(solved), *train)
        pairs = zip(jax.tree.leaves(_blocks.as_arrays(solved)), train, strict=True)
        return sum(
            jnp.einsum("q...,m...->qm", q.astype(dtype), m.astype(dtype), precision="highest")
            for q, m in pairs
        )


def self_influence(
    op: Curvature, grads: Any, damping: jax.typing.ArrayLike, *, chunk_size: int | None = None
) -> jax.Array:
    """The self-influence ``g_mᵀ (F̂ + λI)⁻¹ g_m`` of each example, an ``(M,)`` array (the
    diagonal of :func:`influence` of ``grads`` against themselves, without the ``M x M`` matrix):
    large for the examples the model finds surprising (mislabelled or atypical ones).

    Args:
      op: the curvature, from :func:`curvature`.
      grads: the examples' gradients, with a leading axis ``M``.
      damping: ``λ >= 0``.
      chunk_size: solve for this many examples at a time (``None``: all at once).

    Returns:
      An ``(M,)`` array.
    """

    def one(g):
        return inner_product(_blocks.as_arrays(g), op.solve(g, damping))

    with jax.default_matmul_precision("highest"):
        if chunk_size is None:
            return jax.vmap(one)(grads)
        return jax.lax.map(one, grads, batch_size=chunk_size)
