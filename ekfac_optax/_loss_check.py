"""``check_loss``: a one-off check of the loss a user gives :func:`value_grad_and_stats`.

What a trace cannot see is checked on values, once, before training: the params are finite, the
loss is a finite scalar (with ``has_aux``, the first of a pair), and it is a *mean* over the
batch. The last matters because the per-example output gradients are ``N`` times those of the
mean loss (``_capture``): a loss summed over the batch makes every factor ``N²`` times too large
and every EKFAC scaling ``N²`` times too large, silently. A mean of per-example losses satisfies
``loss(batch) = (n₁ loss(first half) + n₂ loss(second half)) / N``; a sum satisfies ``loss(batch)
= loss(first half) + loss(second half)``; the check evaluates the loss on the batch and on its two
halves and says which holds.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ekfac_optax.capture import _probes
from ekfac_optax.kinds import _blocks
from ekfac_optax.update import _validation


def _batch_size(args: Any) -> int:
    sizes = [jnp.shape(x)[0] for x in jax.tree.leaves(args) if jnp.ndim(x) >= 1]
    if not sizes:
        raise ValueError("check_loss: no argument of loss_fn has a batch axis to split")
    return sizes[0]


def _half(args: Any, n: int, part: slice) -> Any:
    """``args`` with every array of leading size ``n`` sliced to ``part``."""
    return jax.tree.map(lambda x: x[part] if jnp.ndim(x) >= 1 and jnp.shape(x)[0] == n else x, args)


def check_loss(
    loss_fn: Callable[..., Any], params: Any, *args, has_aux: bool = False, **kwargs
) -> None:
    """Checks, on values, that ``loss_fn`` is what :func:`value_grad_and_stats` expects.

    Call it once, on one batch, before training. It raises if

    - ``params`` hold a NaN or an infinity (naming the parameters);
    - ``loss_fn(params, *args, **kwargs)`` is not a finite scalar, or returns a pair without
      ``has_aux=True`` (or no pair with it);
    - the loss is a sum over the batch rather than a mean: with ``n₁ + n₂ = N`` examples in the
      batch's halves (every argument whose leading axis has the batch's size is split), a mean
      of per-example losses has ``loss = (n₁ loss₁ + n₂ loss₂) / N``, a sum ``loss = loss₁ +
      loss₂``; the check raises when the sum fits better. A model that couples the examples
      (batch statistics) fits neither exactly, the mean still far better.

    Args:
      loss_fn: the loss given to :func:`value_grad_and_stats`.
      params: the params (or a Flax NNX model: each call gets a copy, so its state, e.g. batch
        statistics, is left as it is).
      *args: the batch and the other arguments of ``loss_fn``; the leading axis of the first
        array is the batch's (at least 2 examples).
      has_aux: as for :func:`value_grad_and_stats`.
      **kwargs: keyword arguments of ``loss_fn``.

    Raises:
      ValueError: as above, saying what was found and what to change.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Dense(1)
      >>> x, y = jnp.arange(8.0).reshape(4, 2), jnp.ones((4, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def squared_errors(params, x, y):
      ...     return (model.apply({"params": params}, x) - y) ** 2
      >>> ek.check_loss(lambda p, x, y: squared_errors(p, x, y).mean(), params, x, y)  # passes
      >>> def sum_loss(params, x, y):
      ...     return squared_errors(params, x, y).sum()
      >>> ek.check_loss(sum_loss, params, x, y)
      Traceback (most recent call last):
      ...
      ValueError: check_loss: loss_fn looks like a sum over the batch, ...
    """
    _validation.check_finite_params(_blocks.as_arrays(params), "check_loss")
    n = _batch_size((args, kwargs))
    if n < 2:
        raise ValueError(f"check_loss: the batch needs at least 2 examples, got {n}")

    def loss(part):
        a, kw = _half((args, kwargs), n, part)
        model = nnx.clone(params) if isinstance(params, nnx.Module) else params
        value, _ = _probes.split_loss(loss_fn(model, *a, **kw), has_aux)
        return float(value)

    whole, first, second = loss(slice(None)), loss(slice(None, n // 2)), loss(slice(n // 2, None))
    if not np.isfinite(whole):
        raise ValueError(f"check_loss: loss_fn returned {whole} on this batch")
    n1, n2 = n // 2, n - n // 2
    as_mean, as_sum = (n1 * first + n2 * second) / n, first + second
    if abs(whole - as_sum) < abs(whole - as_mean):
        raise ValueError(
            "check_loss: loss_fn looks like a sum over the batch, not a mean: "
            f"loss(batch) = {whole:.6g}, its halves' losses {first:.6g} and {second:.6g} (sum "
            f"{as_sum:.6g}, weighted mean {as_mean:.6g}). value_grad_and_stats expects the mean "
            "over the batch (e.g. optax's per-example losses followed by .mean()): a sum makes "
            "the factors and scalings N² times too large"
        )
