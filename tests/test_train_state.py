"""``ek.TrainState``: Flax's TrainState whose ``apply_gradients`` forwards ``stats``.

Checked as exact equivalences, float64, under ``jax.jit``: three steps of ``ek.TrainState``
with EKFAC give the params and optimizer state of three hand-written ``tx.update`` +
``optax.apply_updates`` steps (bitwise: the same operations); with ``optax.adam`` (which takes
no ``stats``) the same as Flax's own TrainState, with or without ``stats`` (to 1e-13: the jitted
step fuses differently from Flax's eager one); Flax's
``OVERWRITE_WITH_GRADIENT`` layout is honoured; extra fields are replaced as in Flax.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from helpers import MLP, assert_trees_close, assert_trees_equal, classifier_loss, init_params

import ekfac_optax as ek

MODEL = MLP((6, 4))


def setup():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 5)), rng.integers(0, 4, 16)
    params = init_params(MODEL, x, dtype=jnp.float64)
    loss_fn = classifier_loss(MODEL)
    return params, loss_fn, ek.find_blocks(loss_fn, params, x, y), x, y


def test_train_state_forwards_stats():
    params, loss_fn, blocks, x, y = setup()
    tx = ek.ekfac(0.1, blocks=blocks, basis_update_every=2)
    capture = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def ours(state):
        _, grads, stats = capture(state.params, x, y)
        return state.apply_gradients(grads=grads, stats=stats)

    @jax.jit
    def by_hand(params, opt_state):
        _, grads, stats = capture(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state

    state = ek.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
    p, s = params, tx.init(params)
    for _ in range(3):
        state = ours(state)
        p, s = by_hand(p, s)
    assert int(state.step) == 3
    assert_trees_equal(state.params, p)
    assert_trees_equal(state.opt_state, s)
    assert not np.allclose(state.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_train_state_with_plain_optax():
    """``optax.adam`` ignores ``stats`` and matches Flax's TrainState, given stats or not."""
    params, loss_fn, _, x, y = setup()
    tx = optax.adam(1e-2)
    capture = jax.jit(ek.value_grad_and_stats(loss_fn))
    _, grads, stats = capture(params, x, y)
    flax_state = train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
    expected = flax_state.apply_gradients(grads=grads)
    ours = ek.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
    with_stats = jax.jit(lambda s, g, st: s.apply_gradients(grads=g, stats=st))(ours, grads, stats)
    without = ours.apply_gradients(grads=grads)
    for state in (with_stats, without):  # jitted vs eager: fused differently, round-off 1e-16
        assert_trees_close(state.params, expected.params, rtol=1e-13)
        assert_trees_close(state.opt_state, expected.opt_state, rtol=1e-13)
        assert int(state.step) == 1


def test_train_state_overwrite_with_gradient_and_extra_fields():
    """Flax's FP8 layout: ``{"params": ..., OVERWRITE_WITH_GRADIENT: ...}``; the optimizer sees
    ``params["params"]`` (and the stats keyed as in it), the other collection is overwritten by
    its gradient; extra keyword arguments replace fields, as in Flax."""
    params, loss_fn, blocks, x, y = setup()
    tx = ek.kfac(0.1, blocks=blocks)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
    owg = train_state.OVERWRITE_WITH_GRADIENT
    scale = {"scale": jnp.ones(3)}
    state = WithBatchStats.create(
        apply_fn=MODEL.apply, params={"params": params, owg: scale}, tx=tx, batch_stats=0
    )
    new = state.apply_gradients(
        grads={"params": grads, owg: {"scale": jnp.full(3, 2.0)}}, stats=stats, batch_stats=41
    )
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    assert_trees_equal(new.params["params"], optax.apply_updates(params, updates))
    np.testing.assert_array_equal(new.params[owg]["scale"], jnp.full(3, 2.0))
    assert int(new.step) == 1 and new.batch_stats == 41


class WithBatchStats(ek.TrainState):
    """Subclassed as Flax's TrainState is, with a field of its own."""

    batch_stats: Any = None
