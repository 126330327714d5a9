"""``TrainState``: Flax's ``train_state.TrainState`` whose ``apply_gradients`` takes ``stats``."""

from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` that forwards the layer statistics.

    ``apply_gradients(grads=grads, stats=stats)`` calls ``tx.update(grads, opt_state, params,
    stats=stats)``, everything else as Flax's (``step`` incremented, extra fields replaced,
    the ``"params"``/``OVERWRITE_WITH_GRADIENT`` layout of Flax's FP8 training honoured). Any
    optax optimizer works: one that takes no ``stats`` (``optax.adam``) ignores them
    (``optax.with_extra_args_support``), and ``stats`` may be left out for it. Subclass it as
    Flax's (e.g. to add ``batch_stats``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Dense(3)
      >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> blocks = ek.find_blocks(loss_fn, params, x, y)
      >>> state = ek.TrainState.create(
      ...     apply_fn=model.apply, params=params, tx=ek.ekfac(0.1, blocks=blocks)
      ... )
      >>> @jax.jit
      ... def train_step(state, x, y):
      ...     loss, grads, stats = ek.value_grad_and_stats(loss_fn)(state.params, x, y)
      ...     return state.apply_gradients(grads=grads, stats=stats), loss
      >>> state, loss = train_step(state, x, y)
      >>> int(state.step)
      1
    """

    def apply_gradients(self, *, grads: Any, stats: Any = None, **kwargs) -> "TrainState":
        """``step``, ``params`` and ``opt_state`` after one update of ``tx`` with ``grads`` and
        ``stats`` (the third output of :func:`value_grad_and_stats`); ``kwargs``: other
        fields to ``replace``."""
        owg = train_state.OVERWRITE_WITH_GRADIENT
        overwrite = owg in grads
        grads_with_opt = grads["params"] if overwrite else grads
        params_with_opt = self.params["params"] if overwrite else self.params
        extra = {} if stats is None else {"stats": stats}
        updates, new_opt_state = optax.with_extra_args_support(self.tx).update(
            grads_with_opt, self.opt_state, params_with_opt, **extra
        )
        new_params = optax.apply_updates(params_with_opt, updates)
        if overwrite:
            new_params = {"params": new_params, owg: grads[owg]}
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
        )
