"""Influence scores and per-example gradients against dense float64 references.

``reference.py`` gives the per-example gradients (``jax.vmap(jax.grad(...))`` on batches of
one) and each layer's dense EKFAC matrix (``np.kron`` of numpy's eigenbases, ``s*`` from the
per-example gradients); the scores are ``g_qᵀ (G + λI)⁻¹ g_m`` by ``np.linalg.solve``.
Tolerances: the dense matrices' condition numbers are below ``1e5`` (asserted), so a float64
solve is accurate to ``1e-11`` relative; ``1e-8`` norm-wise keeps a margin while a wrong
curvature (the identity, another damping) is off by more than ``1e-2`` (checked).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import ekfac_optax as ek

DAMPING = 1e-3
RTOL = 1e-8


@pytest.fixture(scope="module")
def mlp():
    problem = ref.PROBLEMS["mlp"]
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    tx = ek.scale_by_ekfac(blocks=blocks, basis_update_every=1, factor_decay=0.0)

    @jax.jit
    def state(params, x, y):
        _, grads, stats = ek.value_grad_and_stats(problem.loss_fn)(params, x, y)
        return tx.update(grads, tx.init(params), params, stats=stats)[1]

    op = ek.curvature(state(problem.params, *problem.data), problem.params, blocks)
    return problem, op


def dense_scores(problem, query, train) -> np.ndarray:
    """``Σ_layers vec(Q_l)ᵀ (G_l + λI)⁻¹ vec(M_l)`` for stacks of gradients, ``(Q, M)``."""
    scores = 0.0
    for path, layer in problem.layers.items():
        fisher, _ = ref.ekfac_fisher(layer.per_example, layer.factor_a, layer.factor_b)
        damped = fisher + DAMPING * np.eye(len(fisher))
        assert np.linalg.cond(damped) < 1e5
        q = ref.block_matrix(query[path], batched=True).reshape(len(query[path]["bias"]), -1)
        m = ref.block_matrix(train[path], batched=True).reshape(len(train[path]["bias"]), -1)
        scores = scores + np.linalg.solve(damped, q.T).T @ m.T
    return scores


def test_influence_and_self_influence_equal_dense_solves(mlp):
    problem, op = mlp
    train = ref.per_example_grads(problem.loss_fn, problem.params, *problem.data)
    x, y = problem.batch(7)
    query = ref.per_example_grads(problem.loss_fn, problem.params, x[:5], y[:5])
    scores = jax.jit(ek.influence)(op, train, query, DAMPING)
    assert scores.shape == (5, 24)
    expected = dense_scores(problem, query, train)
    assert ref.relative_error(scores, expected) < RTOL
    plain = sum(
        np.asarray(q).reshape(5, -1) @ np.asarray(m).reshape(24, -1).T
        for q, m in zip(jax.tree.leaves(query), jax.tree.leaves(train), strict=True)
    )
    assert ref.relative_error(plain, expected) > 1e-2  # the curvature matters
    own = ek.self_influence(op, train, DAMPING, chunk_size=5)
    np.testing.assert_allclose(own, np.diag(dense_scores(problem, train, train)), rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [None, 5, 24])
def test_per_example_grads_equal_vmapped_grads_of_batches_of_one(chunk_size):
    problem = ref.PROBLEMS["cnn"]
    x, y = problem.data
    got = ek.per_example_grads(problem.loss_fn, problem.params, x, y, chunk_size=chunk_size)
    expected = ref.per_example_grads(problem.loss_fn, problem.params, x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)  # the same sums: round-off
    mean = jax.grad(problem.loss_fn)(problem.params, x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(np.mean(a, axis=0), b, rtol=1e-10, atol=1e-14)


def test_bad_influence_input_fails_clearly(mlp):
    problem, op = mlp
    x, y = problem.data
    with pytest.raises(ValueError, match="chunk_size"):
        ek.per_example_grads(problem.loss_fn, problem.params, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="same leading axis"):
        ek.per_example_grads(problem.loss_fn, problem.params, x, y[:3])
    train = ref.per_example_grads(problem.loss_fn, problem.params, x, y)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        ek.influence(op, train, train, -1.0)
    with pytest.raises(ValueError, match="structure differs"):
        ek.influence(op, train, {"Dense_0": train["Dense_0"]}, DAMPING)
    assert jnp.all(ek.self_influence(op, train, DAMPING) > 0)
