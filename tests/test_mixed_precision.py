"""Mixed precision (issue 29): float32 parameters with bfloat16 compute, and bfloat16 parameters.

The model is a small language model of today's style (tied embedding, RMSNorm, GLU MLP without
biases), so that every block type of such models runs in bfloat16: the tied embedding, Kronecker
blocks, diagonal norm blocks. The curvature is float32 and every curvature product runs at
``HIGHEST`` precision (``_transform``); ``stats`` keep the compute dtype.

Two checks of the bfloat16-compute update. (1) The library's own handling is exact: the update
from bfloat16 ``stats`` equals, to float32 round-off, the update from the same stats cast to
float32 by the test (tolerance ``1e-6``: float32's ``1.2e-7`` amplified by the damped scalings'
spread; the cast happens before any product, so they are identical: error 0.0, measured), and every
``dot_general`` of the update runs at ``HIGHEST`` precision (read from its jaxpr: on this CPU the
default precision is already full float32, so no number could tell). (2) End to end, against the
float32 model: bfloat16 keeps 8 significant bits (spacing ``2^-8 ≈ 3.9e-3``), and the forward and
backward passes put a norm-wise relative error of ``0.7-1.1e-2`` into the gradient (measured, 3
seeds). The scalings depend on the gradient's coordinates (EKFAC-ra's running ``N g̃²``, the
fallback's ``N g²``, EKFAC's per-example ``s*``), so the update inherits their *per-coordinate*
relative errors, which are larger than the norm-wise one where coordinates are small: measured
``1.1-11.5x`` the gradient's error over the three methods, 3 seeds and damping ``1e-3 .. 1e-1``.
``UPDATE_VS_GRAD = 20`` is the tolerance at damping ``1e-2``; the updates differ from the plain
gradient by far more (asserted), so the comparison is not vacuous.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import METHODS, TiedLM, lm_loss, lm_token_batch, stepper, train, train_step, transforms

import ekfac_optax as ek

UPDATE_VS_GRAD = 20  # see the module docstring


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def bfloat16_run(damping=1e-2, seed=0):
    """``(blocks, params, float32-compute step results, bfloat16-compute step results)``:
    ``stepper``'s ``(updates, states, grads, stats)`` of the three methods' first step."""
    ids, labels = lm_token_batch(seed)
    params = TiedLM().init(jax.random.key(seed), ids)["params"]
    results = []
    for dtype in (jnp.float32, jnp.bfloat16):
        loss_fn = lm_loss(TiedLM(dtype=dtype))
        blocks = ek.find_blocks(loss_fn, params, ids, labels)
        assert blocks["tokens"].tied
        step = stepper(loss_fn, transforms(blocks, damping=damping))
        results.append(step(params, None, ids, labels))
    return blocks, params, *results


def dot_precisions(jaxpr) -> set:
    """The ``precision`` of every ``dot_general`` in a jaxpr and the jaxprs inside it."""
    out = {e.params["precision"] for e in jaxpr.eqns if e.primitive.name == "dot_general"}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        out |= dot_precisions(getattr(sub, "jaxpr", sub))
    return out


def test_bfloat16_stats_are_cast_before_any_product():
    """The update from bfloat16 stats equals the update from the same stats cast to float32 by
    the test, and every product of the update runs at HIGHEST precision."""
    blocks, params, _, (_, _, grads, stats) = bfloat16_run()
    assert stats["up"].h.dtype == jnp.bfloat16
    assert stats["tokens"].attend_delta.dtype == jnp.bfloat16
    cast = jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, stats
    )  # the floats; token ids stay integers
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for method, tx in transforms(blocks, damping=1e-2).items():
        state = tx.init(params)

        def update(stats, tx=tx, state=state):
            return tx.update(grads, state, params, stats=stats)[0]

        actual, expected = jax.jit(update)(stats), jax.jit(update)(cast)
        assert ref.relative_error(flat(actual), flat(expected)) < 1e-6, method
        precisions = dot_precisions(jax.make_jaxpr(update)(stats).jaxpr)
        assert precisions == {highest}, (method, precisions)


def test_bfloat16_compute_update_equals_float32():
    """Float32 parameters: each method's update with bfloat16 compute equals the float32 one
    within ``UPDATE_VS_GRAD`` times the gradient's own relative error; float32 curvature state
    and updates."""
    _, _, (expected, _, grads, _), (actual, states, low_grads, _) = bfloat16_run()
    grad_error = ref.relative_error(flat(low_grads), flat(grads))
    assert 1e-3 < grad_error < 2e-2, grad_error  # bfloat16 round-off, a few ulps
    for method in METHODS:
        curvature = {leaf.dtype for leaf in jax.tree.leaves(states[method].blocks)}
        assert curvature == {jnp.dtype(jnp.float32)}, (method, curvature)
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(actual[method])}
        assert dtypes == {jnp.dtype(jnp.float32)}, (method, dtypes)
        error = ref.relative_error(flat(actual[method]), flat(expected[method]))
        assert error < UPDATE_VS_GRAD * grad_error, (method, error, grad_error)
        distance = ref.relative_error(flat(expected[method]), flat(grads))
        assert distance > 3 * UPDATE_VS_GRAD * grad_error, (method, distance)


@pytest.mark.parametrize(
    "param_dtype", [jnp.float32, jnp.bfloat16], ids=["f32_params", "bf16_params"]
)
def test_bfloat16_language_model_trains_with_every_method(param_dtype):
    """Bfloat16 compute with float32 or bfloat16 parameters: 30 steps of each method
    (learning rate 0.1, damping 1e-2) lower the next-token loss below 60% of its start, no step
    is skipped as non-finite, and the parameters keep their dtype."""
    model = TiedLM(dtype=jnp.bfloat16, param_dtype=param_dtype)
    loss_fn = lm_loss(model)
    ids, labels = lm_token_batch(0)
    params = model.init(jax.random.key(0), ids)["params"]
    blocks = ek.find_blocks(loss_fn, params, ids, labels)
    batches = [lm_token_batch(seed) for seed in range(30)]
    for method, tx in transforms(blocks, damping=1e-2).items():
        tx = optax.chain(tx, optax.scale(-0.1))
        final, state, losses = train(train_step(loss_fn, tx), params, tx.init(params), batches)
        assert int(state[0].skipped) == 0, method
        assert losses[-1] < 0.6 * losses[0], (method, losses[0], losses[-1])
        assert {leaf.dtype for leaf in jax.tree.leaves(final)} == {jnp.dtype(param_dtype)}
