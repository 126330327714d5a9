"""Gradient accumulation that accumulates the curvature too: :func:`multi_steps`."""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ekfac_optax.update import _microbatch, _step
from ekfac_optax.update._state import ScaleByEkfacState


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    Attributes:
      mini_step: ``()`` int32, the micro-batches accumulated in the current real step.
      gradient_step: ``()`` int32, the real steps taken.
      inner_state: the wrapped transformation's state (its preconditioners' states as
        ``init`` made them: one real step moves them).
      acc_grads: the sum of the micro-batches' gradients, each times its number of examples.
      n: ``()`` int32, the examples of the micro-batches accumulated.
      pending: per preconditioner of ``inner_state`` (in the order of its leaves), the sums of
        its micro-batches' factors and ``s*`` (``ekfac_optax.update._microbatch.Pending``).
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    inner_state: Any
    acc_grads: Any
    n: jax.Array
    pending: tuple[Any, ...]


def _is_preconditioner(x) -> bool:
    return isinstance(x, ScaleByEkfacState)


def _is_accumulating(x) -> bool:
    return isinstance(x, _microbatch.Accumulating)


def _wrap(inner_state: Any, pending) -> tuple[Any, int]:
    """``inner_state`` with each preconditioner's state in an ``Accumulating`` with its
    ``pending`` sums (``None``: one ``None`` each); and how many there are."""
    leaves, treedef = jax.tree.flatten(inner_state, is_leaf=_is_preconditioner)
    found = [i for i, leaf in enumerate(leaves) if _is_preconditioner(leaf)]
    pending = [None] * len(found) if pending is None else list(pending)
    for i, sums in zip(found, pending, strict=True):
        leaves[i] = _microbatch.Accumulating(leaves[i], sums)
    return jax.tree.unflatten(treedef, leaves), len(found)


def _unwrap(tree: Any) -> tuple[Any, tuple[Any, ...]]:
    """Inverse of :func:`_wrap`: the plain state and the sums."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_accumulating)
    pending = tuple(leaf.pending for leaf in leaves if _is_accumulating(leaf))
    leaves = [leaf.state if _is_accumulating(leaf) else leaf for leaf in leaves]
    return jax.tree.unflatten(treedef, leaves), pending


def _examples(stats: Any) -> int:
    """The micro-batch's number of examples, from its statistics (1 without them)."""
    if isinstance(stats, Mapping):
        return _step.batch_size(stats)
    return 1


def multi_steps(
    opt: optax.GradientTransformation, every_k_schedule: int | Callable[[jax.Array], Any]
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient accumulation in which the preconditioners accumulate their curvature too.

    Like ``optax.MultiSteps``: each call of ``update`` takes one micro-batch's gradient (and
    ``stats``) and returns zeros, except every ``k``-th call, which runs ``opt`` once on the
    mean gradient of the ``k`` micro-batches. Unlike it, the preconditioners of ``opt``
    (:func:`scale_by_ekfac`, :func:`scale_by_kfac`, :func:`scale_by_kfe_adam`, also inside
    chains, :func:`graft`, ``optax.inject_hyperparams``) see every micro-batch: each adds its
    factors and EKFAC's ``s*`` (in the current eigenbasis) to sums, weighted by its number of
    examples, and a micro-step costs the capture plus those statistics, not a preconditioner
    step (``optax.MultiSteps`` runs ``opt`` on every call and keeps only the last micro-batch's
    curvature).

    With ``n_i`` the examples of micro-batch ``i`` and ``N = Σ n_i``, the real step sees the
    gradient ``Σ n_i g_i / N``, the factors ``Σ n_i A_i / N`` (and ``B``), EKFAC's scalings
    ``Σ n_i s*_i / N`` and the batch size ``N`` (EKFAC-ra's and the fallback's ``N g²``):
    exactly what one batch of all ``N`` examples gives, micro-batches of different sizes
    included. One exception: on a step that refreshes the eigenbasis, EKFAC's ``s*`` is the last
    micro-batch's, measured in the new basis (the others' were measured in the old one, and a
    diagonal does not rotate into another basis).

    A micro-batch's ``stats`` must have the positions per example of the others (the means
    weight examples, not positions). If the real step is rejected for a non-finite number (see
    :func:`scale_by_ekfac`), the micro-batches' sums are dropped with it.

    Args:
      opt: the transformation to run once per real step; ``update`` takes ``stats=``.
      every_k_schedule: ``k``, the micro-batches per real step: an int ``>= 1`` or a function
        of the number of real steps taken (as ``optax.MultiSteps``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`MultiStepsState`; pass each micro-batch's ``stats=`` to ``update``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> tx = ek.multi_steps(ek.ekfac(0.1, blocks=ek.find_blocks(loss_fn, params, x, y)), 2)
      >>> state = tx.init(params)
      >>> for micro in range(4):
      ...     _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
      ...     updates, state = tx.update(grads, state, params, stats=stats)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.gradient_step), int(state.mini_step)
      (2, 0)
    """
    if not callable(every_k_schedule):
        k = every_k_schedule
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every_k_schedule must be an int >= 1 or a schedule, got {k!r}")
    opt = optax.with_extra_args_support(opt)

    def k_now(gradient_step):
        if callable(every_k_schedule):
            return every_k_schedule(gradient_step)
        return every_k_schedule

    def init_fn(params):
        inner_state = opt.init(params)
        wrapped, count = _wrap(inner_state, None)
        pending: tuple[Any, ...] = ()
        if count:

            def allocate():
                zeros = jax.tree.map(jnp.zeros_like, params)
                _, out = opt.update(zeros, wrapped, params, stats=_microbatch.Allocate())
                return _unwrap(out)[1]

            pending = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(allocate))
        return MultiStepsState(
            mini_step=jnp.zeros([], jnp.int32),
            gradient_step=jnp.zeros([], jnp.int32),
            inner_state=inner_state,
            acc_grads=jax.tree.map(jnp.zeros_like, params),
            n=jnp.zeros([], jnp.int32),
            pending=pending,
        )

    def update_fn(updates, state, params=None, **extra_args):
        stats = extra_args.pop("stats", None)
        n_i = _examples(stats)
        acc_grads = jax.tree.map(
            lambda acc, g: acc + n_i * g.astype(acc.dtype), state.acc_grads, updates
        )
        n = state.n + n_i
        wrapped, count = _wrap(state.inner_state, state.pending or None)

        def stage(kind):
            if not count:
                return {} if stats is None else {"stats": stats}
            return {"stats": kind(stats)}

        def real_step():
            mean = jax.tree.map(
                lambda acc, g: (acc / n.astype(acc.dtype)).astype(g.dtype), acc_grads, updates
            )
            new_updates, out = opt.update(
                mean, wrapped, params, **stage(_microbatch.Emit), **extra_args
            )
            inner_state, pending = _unwrap(out)
            return new_updates, MultiStepsState(
                mini_step=jnp.zeros_like(state.mini_step),
                gradient_step=optax.safe_increment(state.gradient_step),
                inner_state=inner_state,
                acc_grads=jax.tree.map(jnp.zeros_like, acc_grads),
                n=jnp.zeros_like(n),
                pending=pending,
            )

        def micro_step():
            pending = state.pending
            if count:
                _, out = opt.update(
                    updates, wrapped, params, **stage(_microbatch.Micro), **extra_args
                )
                pending = _unwrap(out)[1]
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(real_step)[0]
            )
            return zeros, state._replace(
                mini_step=optax.safe_increment(state.mini_step),
                acc_grads=acc_grads,
                n=n,
                pending=pending,
            )

        last = state.mini_step >= k_now(state.gradient_step) - 1
        return jax.lax.cond(last, real_step, micro_step)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
