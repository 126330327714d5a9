"""``ek.fit_curvature`` and ``ek.TrueFisher`` against dense float64 references.

The references come from ``reference.py`` (hand-written forward passes give ``h`` and ``delta``,
``jax.vmap(jax.grad(...))`` the per-example gradients; numpy's ``eigh`` and ``np.kron`` the
dense matrices), on the union of the batches the fit reads. The true Fisher's expectation is
computed exactly by enumerating the labels of a 3-class output (each weighted by its
probability). Tolerances: ``1e-8`` norm-wise, as in ``test_reference_updates.py`` (round-off
of ``eigh`` over separated spectra, measured below ``1e-12``); a wrong weighting of the batches
or of the labels is off by ``1e-2`` or more (checked against the empirical Fisher).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import ekfac_optax as ek

RTOL = 1e-8
SPLITS = (10, 18)  # batches of 10, 8 and 6 of the problem's 24 examples


def split(data):
    return [tuple(a[i:j] for a in data) for i, j in zip((0, *SPLITS), (*SPLITS, 24), strict=True)]


def dense(layer: ref.LayerReference, method: str) -> np.ndarray:
    if method == "ekfac":
        return ref.ekfac_fisher(layer.per_example, layer.factor_a, layer.factor_b)[0]
    return layer.positions * np.kron(layer.factor_a, layer.factor_b)


def assert_operator_is(op, params, fishers: dict, seed: int = 0):
    """``op.matvec`` and ``op.diagonal`` equal the dense ``fishers`` of each layer."""
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x))), params)
    product, diagonal = op.matvec(v), op.diagonal()
    for path, fisher in fishers.items():
        vec = ref.block_matrix(v[path])
        expected = (fisher @ vec.ravel()).reshape(vec.shape)
        assert ref.relative_error(ref.block_matrix(product[path]), expected) < RTOL, path
        expected = np.diag(fisher).reshape(vec.shape)
        assert ref.relative_error(ref.block_matrix(diagonal[path]), expected) < RTOL, path


# KFAC on the sequence problem runs the same accumulation as on the MLP (left out: 15 s).
@pytest.mark.parametrize("name, method", [("mlp", "ekfac"), ("mlp", "kfac"), ("sequence", "ekfac")])
def test_fit_over_batches_is_the_curvature_of_their_union(name, method):
    """Batches of 10, 8 and 6 examples: the factors, the eigenbasis and ``s*`` of the 24
    examples together (each example weighted once, not each batch)."""
    problem = ref.PROBLEMS[name]
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    op = ek.fit_curvature(
        problem.loss_fn, problem.params, split(problem.data), blocks, method=method
    )
    fishers = {path: dense(layer, method) for path, layer in problem.layers.items()}
    assert_operator_is(op, problem.params, fishers)
    # Weighting the batches equally instead gives another matrix: the check is not vacuous.
    means = [problem.references(problem.params, *b) for b in split(problem.data)]
    path = next(iter(fishers))
    equal = sum(dense(m[path], "kfac") for m in means) / len(means)
    assert ref.relative_error(equal, dense(problem.layers[path], "kfac")) > 1e-2


def exact_true_fisher(problem, distribution: str) -> dict:
    """Per layer, the dense true Fisher of the problem's batch with every label enumerated:
    factors, eigenbasis and ``s*`` with label ``c`` of example ``n`` weighted by ``p_n(c)``
    (categorical) or each output's gradient once (a Gaussian of unit variance)."""
    x, y = problem.data
    logits = problem.model.apply({"params": problem.params}, x)
    classes = logits.shape[-1]
    weights = np.asarray(jax.nn.softmax(logits)) if distribution == "categorical" else None
    per_label = []
    for c in range(classes):
        if distribution == "categorical":

            def output_loss(outputs, _, c=c):
                labels = jnp.full(outputs.shape[:1], c)
                return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()
        else:

            def output_loss(outputs, _, c=c):
                return jnp.mean(outputs[:, c])

        per_label.append(ref.h_and_delta(problem.forward, output_loss, problem.params, x, y))
    out = {}
    for path in problem.params:
        h = ref.augment(per_label[0][path][0], "bias" in problem.params[path])
        n, t = h.shape[:2]
        factor_a = np.einsum("nti,ntj->ij", h, h) / (n * t)
        factor_b, grads, w = 0.0, [], []
        for c in range(classes):
            delta = np.asarray(per_label[c][path][1])
            w_c = np.ones(n) if weights is None else weights[:, c]
            factor_b = factor_b + np.einsum("n,nto,ntp->op", w_c, delta, delta) / (n * t)
            grads.append(np.einsum("nti,nto->nio", h, delta))
            w.append(w_c)
        basis_a, basis_b = np.linalg.eigh(factor_a)[1], np.linalg.eigh(factor_b)[1]
        s = sum(
            np.einsum("n,nab->ab", w_c, ref.to_kfe(g, basis_a, basis_b) ** 2) / n
            for g, w_c in zip(grads, w, strict=True)
        )
        kron = np.kron(basis_a, basis_b)
        out[path] = kron @ np.diag(s.ravel()) @ kron.T
    return out


@pytest.mark.parametrize("distribution", ["categorical", "gaussian"])
def test_exact_true_fisher_fit_equals_the_enumerated_expectation(distribution):
    problem = ref.PROBLEMS["mlp"]

    def predict(params, x, y):
        return problem.model.apply({"params": params}, x)

    fisher = ek.TrueFisher(predict, distribution, samples="exact")
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    op = ek.fit_curvature(
        problem.loss_fn, problem.params, split(problem.data), blocks, fisher=fisher
    )
    expected = exact_true_fisher(problem, distribution)
    assert_operator_is(op, problem.params, expected)
    if distribution == "categorical":  # the empirical Fisher is another matrix here
        path = "Dense_2"
        empirical = dense(problem.layers[path], "ekfac")
        assert ref.relative_error(empirical, expected[path]) > 1e-2


def test_sampled_true_fisher_is_reproducible_and_near_its_expectation():
    """Drawn labels: the same key draws the same labels (the loss, hence the fit, is the same),
    another key others; 64 draws per example (1536 in all) give a fit whose trace is within 10%
    of the enumerated expectation's (the Monte Carlo error of a mean of 1536 draws is a few
    percent here)."""
    problem = ref.PROBLEMS["mlp"]

    def predict(params, x, y):
        return problem.model.apply({"params": params}, x)

    once = ek.TrueFisher(predict)
    losses = [once.loss(problem.params, jax.random.key(k), *problem.data) for k in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    fisher = ek.TrueFisher(predict, "categorical", samples=64)
    op = ek.fit_curvature(
        problem.loss_fn,
        problem.params,
        split(problem.data),
        blocks,
        fisher=fisher,
        key=jax.random.key(2),
    )
    exact = sum(np.trace(f) for f in exact_true_fisher(problem, "categorical").values())
    np.testing.assert_allclose(op.trace(), exact, rtol=0.1)


def test_true_fisher_statistics_for_the_optimizer():
    """``value_grad_and_stats(loss_fn, fisher=...)``: the loss and gradient of ``loss_fn``, the
    statistics of the drawn labels (those of ``TrueFisher.loss`` with the same key), which the
    preconditioner then reads."""
    problem = ref.PROBLEMS["mlp"]

    def predict(params, x, y):
        return problem.model.apply({"params": params}, x)

    fisher = ek.TrueFisher(predict)
    key = jax.random.key(3)
    capture = jax.jit(ek.value_grad_and_stats(problem.loss_fn, fisher=fisher))
    value, grads, stats = capture(problem.params, *problem.data, fisher_key=key)
    loss, expected_grads = jax.value_and_grad(problem.loss_fn)(problem.params, *problem.data)
    np.testing.assert_allclose(value, loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    _, _, drawn = ek.value_grad_and_stats(fisher.loss)(problem.params, key, *problem.data)
    _, _, empirical = ek.value_grad_and_stats(problem.loss_fn)(problem.params, *problem.data)
    for path in stats:
        np.testing.assert_allclose(stats[path].delta, drawn[path].delta, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stats[path].h, empirical[path].h, rtol=1e-12)
    assert not np.allclose(stats["Dense_2"].delta, empirical["Dense_2"].delta)
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    tx = ek.ekfac(0.1, blocks=blocks)
    updates, _ = tx.update(grads, tx.init(problem.params), problem.params, stats=stats)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_bad_fit_input_fails_clearly():
    problem = ref.PROBLEMS["mlp"]
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)

    def predict(params, x, y):
        return problem.model.apply({"params": params}, x)

    with pytest.raises(ValueError, match="samples"):
        ek.TrueFisher(predict, samples=0)
    with pytest.raises(ValueError, match="distribution"):
        ek.TrueFisher(predict, "poisson")
    with pytest.raises(ValueError, match="batches is empty"):
        ek.fit_curvature(problem.loss_fn, problem.params, [], blocks)
    with pytest.raises(ValueError, match="method"):
        ek.fit_curvature(problem.loss_fn, problem.params, [problem.data], blocks, method="adam")
    with pytest.raises(ValueError, match="needs key"):
        ek.fit_curvature(
            problem.loss_fn, problem.params, [problem.data], blocks, fisher=ek.TrueFisher(predict)
        )
    with pytest.raises(ValueError, match="samples=1"):
        ek.value_grad_and_stats(problem.loss_fn, fisher=ek.TrueFisher(predict, samples=2))

    def per_position(params, x, y):  # (N, 2, C): positions draw their labels independently
        return jnp.repeat(predict(params, x, y)[:, None], 2, axis=1)

    exact = ek.TrueFisher(per_position, "gaussian", "exact")
    with pytest.raises(ValueError, match=r"outputs \(N, C\)"):
        exact.loss(problem.params, None, *problem.data)


class Scaled(nn.Module):
    """A Dense layer whose logits are shifted and scaled by parameters in no block."""

    @nn.compact
    def __call__(self, x):
        offset = self.param("offset", nn.initializers.normal(0.1), (3,), jnp.float64)
        temperature = self.param("temperature", nn.initializers.ones, (), jnp.float64)
        return (nn.Dense(3, param_dtype=jnp.float64, name="head")(x) + offset) * temperature


def test_fit_gives_parameters_in_no_block_their_mean_squared_gradients():
    """The fallback's diagonal is ``mean_n g_n²`` over every example of the batches (the
    optimizer's running ``N ḡ²`` would be near zero at a trained model); a TrueFisher refuses
    such parameters."""
    model = Scaled()
    x, y = ref.PROBLEMS["mlp"].data
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, y):
        return ref.softmax_cross_entropy(model.apply({"params": params}, x), y)

    blocks = ek.find_blocks(loss_fn, params, x, y)
    assert set(blocks) == {"head"}
    op = ek.fit_curvature(loss_fn, params, split((x, y)), blocks)
    per_example = ref.per_example_grads(loss_fn, params, x, y)
    diagonal = op.diagonal()
    for name in ("offset", "temperature"):
        expected = np.mean(np.asarray(per_example[name]) ** 2, axis=0)
        np.testing.assert_allclose(diagonal[name], expected, rtol=1e-10)
        mean_squared = len(x) * np.mean(np.asarray(per_example[name]), axis=0) ** 2
        assert ref.relative_error(expected, mean_squared) > 1e-2  # not the optimizer's N ḡ²
    fisher = ek.TrueFisher(lambda p, x, y: model.apply({"params": p}, x))
    with pytest.raises(ValueError, match="every parameter needs a block"):
        ek.fit_curvature(loss_fn, params, [(x, y)], blocks, fisher=fisher, key=jax.random.key(0))
