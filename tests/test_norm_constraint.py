"""``ek.clip_by_fisher_norm`` and the aliases' ``norm_constraint`` (issue 30 §3: no exploding run),
in float64.

The reference is the dense one of ``reference.py``: each layer's damped EKFAC or KFAC matrix as
an explicit ``np.kron`` product, ``u = M⁻¹ g`` by ``np.linalg.solve``, and the clip formed here
with numpy: ``c = min(1, √(C / (η² Σ gᵀu)))``, step ``-η c u``. Only the public API is used.

Tolerance: the dense solves are accurate to about ``1e-11`` relative (condition numbers below
``1e5``, see ``test_reference_updates.py``); the clip adds one inner product and one square root
(round-off only). ``1e-8`` norm-wise keeps the same margin as the reference tests, while the
clip changes these updates by a factor far from 1 (asserted), so the comparisons are not vacuous.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import NormClassifier, classifier_loss, init_params, normal_batch

import ekfac_optax as ek

DAMPING = 1e-3
RTOL = 1e-8  # norm-wise; see the module docstring
PROBLEM = ref.PROBLEMS["mlp"]


def reference_matrix(layer: ref.LayerReference, method: str) -> np.ndarray:
    """The dense damped curvature ``M`` of one layer (one-batch factors, Tikhonov damping)."""
    return ref.layer_matrix(layer, method, DAMPING, "tikhonov")


def reference_direction(method: str) -> dict[str, np.ndarray]:
    """``M⁻¹ g`` per layer on the problem's batch."""
    out = {}
    for path, layer in PROBLEM.layers.items():
        matrix = reference_matrix(layer, method)
        assert np.linalg.cond(matrix) < 1e5
        out[path] = ref.solve(matrix, layer.grad)
    return out


def first_update(alias, learning_rate, **kwargs) -> dict[str, np.ndarray]:
    """The alias's first update per layer, as block matrices, jitted."""
    blocks = ek.find_blocks(PROBLEM.loss_fn, PROBLEM.params, *PROBLEM.data)
    tx = alias(learning_rate, blocks=blocks, damping=DAMPING, factor_decay=0.0, **kwargs)

    @jax.jit
    def step(params, x, y):
        _, grads, stats = ek.value_grad_and_stats(PROBLEM.loss_fn)(params, x, y)
        return tx.update(grads, tx.init(params), params, stats=stats)[0]

    updates = step(PROBLEM.params, *PROBLEM.data)
    return {path: ref.block_matrix(updates[path]) for path in PROBLEM.layers}


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
@pytest.mark.parametrize("learning_rate", [0.1, optax.constant_schedule(0.1)])
def test_norm_constraint_scales_the_dense_reference_step_to_the_bound(method, learning_rate):
    """``ek.ekfac``/``ek.kfac`` with ``norm_constraint=C``: the first update is
    ``-η c M⁻¹g`` with ``c = min(1, √(C / (η² Σ gᵀM⁻¹g)))``, every layer, and the step's squared
    norm in the damped curvature, ``Σ Δᵀ M Δ``, equals ``C``; a bound above the step's norm
    changes nothing."""
    eta = 0.1
    direction = reference_direction(method)
    sq_norm = eta**2 * sum(np.vdot(PROBLEM.layers[p].grad, u) for p, u in direction.items())
    bound = sq_norm / 25  # c = 1/5: active
    alias = ek.ekfac if method == "ekfac" else ek.kfac
    clipped = first_update(alias, learning_rate, norm_constraint=bound)
    for path, u in direction.items():
        expected = -eta * np.sqrt(bound / sq_norm) * u
        assert ref.relative_error(clipped[path], expected) < RTOL, path
    matrices = {p: reference_matrix(layer, method) for p, layer in PROBLEM.layers.items()}
    step_norm = sum(clipped[p].ravel() @ m @ clipped[p].ravel() for p, m in matrices.items())
    np.testing.assert_allclose(step_norm, bound, rtol=RTOL)
    unclipped = first_update(alias, learning_rate, norm_constraint=4 * sq_norm)
    for path, u in direction.items():
        assert ref.relative_error(unclipped[path], -eta * u) < RTOL, path


def test_clip_follows_a_schedule_and_counts_its_steps():
    """With ``F̂ = λ I`` (``optax.scale(1/λ)``) the clip is ``min(1, √(C λ / (η_k² ‖g‖²)))`` with
    the schedule's ``η_k`` at step ``k``, under ``jax.jit``; the count advances every update."""
    lam, bound = 4.0, 0.05
    schedule = optax.linear_schedule(0.05, 0.5, transition_steps=4)
    tx = ek.clip_by_fisher_norm(optax.scale(1 / lam), schedule, max_norm=bound)
    grad = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([[1.0]])}
    g_sq = 26.0
    state = tx.init(grad)
    update = jax.jit(tx.update)
    for k in range(5):
        out, state = update(grad, state)
        eta = float(schedule(jnp.asarray(k, jnp.int32)))  # as optax evaluates it: in float32
        c = min(1.0, np.sqrt(bound * lam / (eta**2 * g_sq)))
        for name in grad:
            # η_k is float32 (optax evaluates a schedule at an int32 count), rounded by an ulp
            # differently under jit and eagerly: a few float32 ulps, far below 1 - c.
            np.testing.assert_allclose(out[name], c * np.asarray(grad[name]) / lam, rtol=1e-6)
        assert int(state.count) == k + 1
    # Both sides of the bound were exercised: the first steps are within it, the last are not.
    assert float(schedule(0)) ** 2 * g_sq / lam < bound < float(schedule(4)) ** 2 * g_sq / lam


def test_clip_leaves_zero_and_non_positive_products_unscaled():
    """A zero update (e.g. a step the preconditioner's guard rejected) stays zero; an update with
    ``gᵀu ≤ 0`` (no positive-definite curvature) is passed through, not turned into NaN."""
    grad = {"w": jnp.array([1.0, 2.0])}
    for scale, expected in [(0.0, [0.0, 0.0]), (-1.0, [-1.0, -2.0])]:
        tx = ek.clip_by_fisher_norm(optax.scale(scale), 1.0, max_norm=1e-6)
        out, _ = tx.update(grad, tx.init(grad))
        np.testing.assert_array_equal(out["w"], expected)


def test_clip_forwards_stats_and_keeps_ekfac_state_and_dtypes():
    """Around ``ek.scale_by_ekfac``, in a chain, under ``jax.jit``: ``stats=`` reaches the
    preconditioner, whose state advances exactly as without the clip, and the update keeps each
    parameter's dtype; ``optax.inject_hyperparams`` can make the bound a hyperparameter."""
    x, y = normal_batch(3, (32, 4), (32,), classes=3)
    net = NormClassifier()
    loss_fn = classifier_loss(net)
    params = init_params(net, x)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    inner = ek.scale_by_ekfac(blocks=blocks, basis_update_every=2)
    make = optax.inject_hyperparams(
        lambda max_norm: ek.clip_by_fisher_norm(
            ek.scale_by_ekfac(blocks=blocks, basis_update_every=2), 0.1, max_norm
        )
    )
    tx = make(max_norm=1e-4)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)

    @jax.jit
    def both(state, inner_state):
        out, state = tx.update(grads, state, params, stats=stats)
        plain, inner_state = inner.update(grads, inner_state, params, stats=stats)
        return out, state, plain, inner_state

    state, inner_state = tx.init(params), inner.init(params)
    for _ in range(3):
        out, state, plain, inner_state = both(state, inner_state)
        ratios = [
            float(jnp.vdot(a, b) / jnp.vdot(b, b))
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain), strict=True)
        ]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)  # one scalar for all leaves
        assert ratios[0] < 0.5  # the bound is active
        assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, plain)
    jax.tree.map(np.testing.assert_array_equal, state.inner_state.preconditioner, inner_state)


@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_bad_bound_or_graft_is_a_value_error(bad):
    blocks = ek.find_blocks(PROBLEM.loss_fn, PROBLEM.params, *PROBLEM.data)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        ek.clip_by_fisher_norm(optax.identity(), 0.1, max_norm=bad)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        ek.ekfac(0.1, blocks=blocks, norm_constraint=bad)
    with pytest.raises(ValueError, match="graft and norm_constraint"):
        ek.kfac(0.1, blocks=blocks, graft=optax.scale_by_adam(), norm_constraint=1e-3)
