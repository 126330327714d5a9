"""``ek.curvature``: the state's curvature as an operator, against dense float64 matrices.

The dense matrices are built here: EKFAC's ``(U_A ⊗ U_B) diag(vec s*) (U_A ⊗ U_B)ᵀ`` and KFAC's
``T A ⊗ B`` from the independent reference of ``reference.py`` (per-example gradients by
``jax.vmap(jax.grad(...))``, factors from hand-computed ``h`` and ``delta``, numpy's ``eigh``),
applied to ``vec`` of each layer's block matrix with ``np.kron``, inverted by
``np.linalg.solve``, its log-determinant by ``np.linalg.slogdet``.

Tolerances: the norm-wise relative ``1e-8`` of ``test_reference_updates.py`` (same matrices,
same argument: condition numbers below ``1e5`` at the damping used, measured errors below
``1e-12``); a log-determinant is a sum of ``log(s + λ)``, each to round-off, so ``1e-10``
relative. A modelling error (a missing ``T``, a transposed basis, a wrong block mapping) is off
by ``1e-2`` or more.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import init_params

import ekfac_optax as ek

DAMPING = 1e-3
RTOL = 1e-8  # see the module docstring
F64 = dict(param_dtype=jnp.float64)


def random_like(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x))), tree)


def make_tx(method: str, blocks, **kwargs):
    kwargs = dict(blocks=blocks, basis_update_every=1, factor_decay=0.0, **kwargs)
    if method == "kfac":
        return ek.scale_by_kfac(**kwargs)
    return ek.scale_by_ekfac(scaling={"ekfac": "batch", "ekfac_ra": "running"}[method], **kwargs)


def first_state(loss_fn, params, batch, tx, layers=None):
    @jax.jit
    def step(params, *batch):
        _, grads, stats = ek.value_grad_and_stats(loss_fn, layers=layers)(params, *batch)
        return tx.update(grads, tx.init(params), params, stats=stats)[1]

    return step(params, *batch)


# --- Reference problems: every layer a Kronecker block --------------------------------------------


def reference_fisher(layer: ref.LayerReference, method: str) -> np.ndarray:
    """The dense curvature of one layer on its batch, without ekfac_optax."""
    if method == "ekfac":
        return ref.ekfac_fisher(layer.per_example, layer.factor_a, layer.factor_b)[0]
    return layer.positions * np.kron(layer.factor_a, layer.factor_b)


@pytest.fixture(scope="module", params=sorted(ref.PROBLEMS))
def problem_ops(request):
    problem = ref.PROBLEMS[request.param]
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    ops = {}
    for method in ("ekfac", "kfac"):
        state = first_state(problem.loss_fn, problem.params, problem.data, make_tx(method, blocks))
        ops[method] = ek.curvature(state, problem.params, blocks)
    return problem, ops


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_operator_equals_dense_reference(problem_ops, method):
    """``matvec``, ``solve``, ``logdet``, ``trace`` and ``diagonal`` of a one-batch EKFAC
    (``s*``) and KFAC (``T A ⊗ B``) state equal the dense matrices, for Dense, Conv (strides,
    dilation, no bias, circular padding), shared and sequence layers."""
    problem, ops = problem_ops
    op = ops[method]
    v = random_like(problem.params, seed=3)
    product, solved, diagonal = jax.jit(
        lambda op, v: (op.matvec(v), op.solve(v, DAMPING), op.diagonal())
    )(op, v)
    logdet, trace = 0.0, 0.0
    for path, layer in problem.layers.items():
        fisher = reference_fisher(layer, method)
        damped = fisher + DAMPING * np.eye(len(fisher))
        assert np.linalg.cond(damped) < 1e5
        vec = ref.block_matrix(v[path])
        expected = (fisher @ vec.ravel()).reshape(vec.shape)
        assert ref.relative_error(ref.block_matrix(product[path]), expected) < RTOL, path
        expected = ref.solve(damped, vec)
        assert ref.relative_error(ref.block_matrix(solved[path]), expected) < RTOL, path
        assert ref.relative_error(expected, vec) > 1e-2  # not the identity
        expected = np.diag(fisher).reshape(vec.shape)
        assert ref.relative_error(ref.block_matrix(diagonal[path]), expected) < RTOL, path
        logdet += np.linalg.slogdet(damped)[1]
        trace += np.trace(fisher)
    np.testing.assert_allclose(op.logdet(DAMPING), logdet, rtol=1e-10)
    np.testing.assert_allclose(op.trace(), trace, rtol=1e-10)


# --- Attention, a normalisation and a parameter in no block ---------------------------------------


class Attention(nn.Module):
    """LayerNorm (a diagonal block), self-attention (DenseGeneral q, k, v, out), a scalar
    parameter in no block (the fallback) and a Dense head on the mean over positions."""

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="norm", **F64)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, name="attn", **F64)(y)
        temperature = self.param("temperature", nn.initializers.ones, (), jnp.float64)
        return nn.Dense(3, name="head", **F64)(y.mean(axis=1)) * temperature


ATTENTION_LAYERS = {  # layer path -> (d_in: its kernel as a (d_in, d_out) matrix, positions T)
    "attn/query": (5, 6),
    "attn/key": (5, 6),
    "attn/value": (5, 6),
    "attn/out": (4, 6),
    "head": (5, 1),
}


def general_matrix(layer, d_in: int, batched: bool = False) -> np.ndarray:
    """``[kernel.reshape(d_in, -1); bias.ravel()]`` (``batched``: of each example)."""
    lead = np.shape(layer["kernel"])[:1] if batched else ()
    kernel = np.asarray(layer["kernel"]).reshape(*lead, d_in, -1)
    bias = np.asarray(layer["bias"]).reshape(*lead, 1, -1)
    return np.concatenate([kernel, bias], axis=-2)


@pytest.fixture(scope="module")
def attention():
    model = Attention()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((12, 6, 5)))
    y = jnp.asarray(rng.integers(0, 3, 12))
    params = init_params(model, x)

    def loss_fn(params, x, y):
        return ref.softmax_cross_entropy(model.apply({"params": params}, x), y)

    blocks = ek.find_blocks(loss_fn, params, x, y)
    assert {p: s.block for p, s in blocks.items()} == {
        **dict.fromkeys(ATTENTION_LAYERS, "kronecker"),
        "norm": "diagonal",
    }
    per_example = ref.per_example_grads(loss_fn, params, x, y)
    return loss_fn, params, (x, y), blocks, per_example


def at(tree, path: str):
    """The node of a nested dict at a ``/``-joined path, as numpy."""
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("method", ["ekfac", "ekfac_ra", "kfac"])
def test_operator_on_attention_norm_and_fallback(attention, method):
    """DenseGeneral blocks (query/key/value ``(5, 2, 2)`` kernels, out ``(2, 2, 5)``): EKFAC's
    ``s*`` recomputed here from the per-example gradients in the state's eigenbasis, KFAC's
    ``T A ⊗ B`` from the state's factors (``T = 6`` positions, the head's 1), EKFAC-ra's from its
    own scalings; the LayerNorm's diagonal block ``mean_n G_n²`` (EKFAC, KFAC: its exact
    per-example gradients) or ``N g²`` (EKFAC-ra), as the fallback's scalar."""
    loss_fn, params, batch, blocks, per_example = attention
    state = first_state(loss_fn, params, batch, make_tx(method, blocks))
    op = ek.curvature(state, params, blocks)
    v = random_like(params, seed=4)
    got = dict(v=v, product=op.matvec(v), solved=op.solve(v, DAMPING), diagonal=op.diagonal())
    logdet, trace = 0.0, 0.0
    for path, (d_in, positions) in ATTENTION_LAYERS.items():
        node = state.blocks[path]
        basis_a, basis_b = np.asarray(node.basis_a), np.asarray(node.basis_b)
        if method == "kfac":
            fisher = positions * np.kron(np.asarray(node.factor_a), np.asarray(node.factor_b))
        else:
            if method == "ekfac":
                g_n = general_matrix(at(per_example, path), d_in, batched=True)
                s = np.mean(ref.to_kfe(g_n, basis_a, basis_b) ** 2, axis=0)
            else:
                s = np.asarray(node.scalings)
            kron = np.kron(basis_a, basis_b)
            fisher = kron @ np.diag(s.ravel()) @ kron.T
        damped = fisher + DAMPING * np.eye(len(fisher))
        assert np.linalg.cond(damped) < 1e5
        mat = {key: general_matrix(at(tree, path), d_in) for key, tree in got.items()}
        expected = (fisher @ mat["v"].ravel()).reshape(mat["v"].shape)
        assert ref.relative_error(mat["product"], expected) < RTOL, path
        assert ref.relative_error(mat["solved"], ref.solve(damped, mat["v"])) < RTOL, path
        expected = np.diag(fisher).reshape(mat["v"].shape)
        assert ref.relative_error(mat["diagonal"], expected) < RTOL, path
        logdet += np.linalg.slogdet(damped)[1]
        trace += np.trace(fisher)
    # The diagonal block and the fallback: diag(s) from the per-example gradients.
    n = len(batch[0])
    for path in ("norm/scale", "norm/bias", "temperature"):
        grads = np.asarray(at(per_example, path))
        if path != "temperature" and method != "ekfac_ra":
            s = np.mean(grads**2, axis=0)
        else:
            s = n * np.mean(grads, axis=0) ** 2  # the debiased average of N g² after one update
        value = {key: np.asarray(at(tree, path)) for key, tree in got.items()}
        np.testing.assert_allclose(value["product"], s * value["v"], rtol=1e-10, err_msg=path)
        np.testing.assert_allclose(value["solved"], value["v"] / (s + DAMPING), rtol=1e-10)
        np.testing.assert_allclose(value["diagonal"], s, rtol=1e-10, err_msg=path)
        logdet += np.sum(np.log(s + DAMPING))
        trace += np.sum(s)
    np.testing.assert_allclose(op.logdet(DAMPING), logdet, rtol=1e-10)
    np.testing.assert_allclose(op.trace(), trace, rtol=1e-10)


# --- Layouts, transformations, sharding --------------------------------------------------------


class ScanMLP(nn.Module):
    """Three same-shaped Dense layers as a Python loop, two more under ``nn.scan`` (one stacked
    block), a LayerNorm and a head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="stem", **F64)(x)
        for i in range(3):
            x = nn.tanh(nn.Dense(6, name=f"dense_{i}", **F64)(x))

        class Body(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return nn.tanh(nn.Dense(6, **F64)(x)), None

        x, _ = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(
            name="scan"
        )(x, None)
        return nn.Dense(3, name="head", **F64)(nn.LayerNorm(name="norm", **F64)(x))


@pytest.fixture(scope="module")
def scan_mlp():
    model = ScanMLP()
    x, y = ref.Problem(model, None, (5,), 16).batch(2)
    params = init_params(model, x)

    def loss_fn(params, x, y):
        return ref.softmax_cross_entropy(model.apply({"params": params}, x), y)

    blocks = ek.find_blocks(loss_fn, params, x, y)
    assert blocks["scan/Dense_0"].stack == (2,)
    return loss_fn, params, (x, y), blocks


def test_stacked_state_gives_the_per_layer_operator(scan_mlp):
    """A ``stack_blocks=True`` state (the loop's three layers stored as one entry) gives the
    operator of the per-layer state: the same per-layer arrays, the same products."""
    loss_fn, params, batch, blocks = scan_mlp
    ops = {
        stacked: ek.curvature(
            first_state(loss_fn, params, batch, make_tx("ekfac", blocks, stack_blocks=stacked)),
            params,
            blocks,
        )
        for stacked in (False, True)
    }
    v = random_like(params, seed=5)
    for name in ("matvec", "diagonal"):
        args = (v,) if name == "matvec" else ()
        a, b = (getattr(ops[s], name)(*args) for s in (False, True))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            # the same LAPACK eigh per member, batched or not: round-off apart
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ops[True].logdet(DAMPING), ops[False].logdet(DAMPING), rtol=1e-12)
    # The scanned layers' stacked block: each copy its own dense matrix from its state slice.
    state = first_state(loss_fn, params, batch, make_tx("ekfac", blocks))
    node, product = state.blocks["scan/Dense_0"], ops[False].matvec(v)["scan"]["Dense_0"]
    for i in range(2):
        kron = np.kron(np.asarray(node.basis_a[i]), np.asarray(node.basis_b[i]))
        fisher = kron @ np.diag(np.asarray(node.scalings[i]).ravel()) @ kron.T
        layer = jax.tree.map(lambda x, i=i: x[i], v["scan"]["Dense_0"])
        vec = ref.block_matrix(layer)
        expected = (fisher @ vec.ravel()).reshape(vec.shape)
        got = ref.block_matrix(jax.tree.map(lambda x, i=i: x[i], product))
        assert ref.relative_error(got, expected) < RTOL, i


def test_operator_jits_vmaps_and_keeps_sharding(scan_mlp):
    """The operator is a pytree: ``jax.jit`` of a function of it equals the eager result,
    ``jax.vmap`` over a batch of vectors equals a loop, and the state's arrays placed over 8
    devices give the same products."""
    loss_fn, params, batch, blocks = scan_mlp
    op = ek.curvature(first_state(loss_fn, params, batch, make_tx("ekfac", blocks)), params, blocks)
    vs = [random_like(params, seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *vs)
    batched = jax.jit(jax.vmap(lambda op, v: op.solve(v, DAMPING), in_axes=(None, 0)))(op, stacked)
    for k, v in enumerate(vs):
        eager = op.solve(v, DAMPING)
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(x[k], y, rtol=1e-12, atol=1e-15)
    if jax.device_count() >= 8:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        placed = jax.device_put(op, replicated)
        product = jax.jit(lambda op, v: op.matvec(v))(placed, vs[0])
        for x, y in zip(jax.tree.leaves(product), jax.tree.leaves(op.matvec(vs[0])), strict=True):
            assert len(x.sharding.device_set) == 8
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)


# --- Bad input ------------------------------------------------------------------------------------


def test_bad_states_and_vectors_fail_clearly(scan_mlp):
    loss_fn, params, batch, blocks = scan_mlp
    tx = make_tx("ekfac", blocks)
    with pytest.raises(ValueError, match="no eigenbasis yet"):
        ek.curvature(tx.init(params), params, blocks)
    adam = ek.scale_by_kfe_adam(blocks=blocks)
    with pytest.raises(ValueError, match="KFE-Adam"):
        ek.curvature(first_state(loss_fn, params, batch, adam), params, blocks)
    with pytest.raises(TypeError, match="ScaleByEkfacState"):
        ek.curvature(optax.adam(1e-3).init(params), params, blocks)
    state = first_state(loss_fn, params, batch, tx)
    two = (state, state)
    with pytest.raises(ValueError, match="holds 2 states"):
        ek.curvature(two, params, blocks)
    partial = {p: s for p, s in blocks.items() if p != "head"}
    with pytest.raises(ValueError, match="do not match its blocks"):
        ek.curvature(state, params, partial)
    identity = make_tx("ekfac", partial, fallback="identity")
    with pytest.raises(ValueError, match="fallback='identity'"):
        ek.curvature(first_state(loss_fn, params, batch, identity, partial), params, partial)

    op = ek.curvature(state, params, blocks)
    with pytest.raises(ValueError, match="structure differs"):
        op.matvec({"head": params["head"]})
    wrong = jax.tree.map(lambda x: x, params)
    wrong["head"] = {**params["head"], "bias": jnp.zeros(4)}
    with pytest.raises(ValueError, match=r"'head/bias' has shape \(4,\)"):
        op.matvec(wrong)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        op.solve(params, -1.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        op.logdet(-1e-3)


def test_zero_damping_needs_a_regular_curvature():
    """``damping=0`` inverts ``F̂`` itself: a layer with an input feature that is always 0 has
    zero scalings (no curvature in those directions) and is refused, naming the layer; with
    every feature present the solve is ``F̂⁻¹``, ``solve(matvec(v)) = v``."""
    model = nn.Dense(2, **F64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3))
    params = init_params(model, jnp.asarray(x))

    def loss_fn(params, x):
        return jnp.mean(jnp.sum(model.apply({"params": params}, x) ** 2, axis=-1))

    blocks = ek.find_blocks(loss_fn, params, jnp.asarray(x))
    for dead, tx in ((False, make_tx("kfac", blocks)), (True, make_tx("kfac", blocks))):
        data = x * np.array([1.0, 0.0, 1.0]) if dead else x
        state = first_state(loss_fn, params, (jnp.asarray(data),), tx)
        op = ek.curvature(state, params, blocks)
        if dead:
            with pytest.raises(ValueError, match="singular on '<root>'"):
                op.solve(params, 0.0)
            with pytest.raises(ValueError, match="singular"):
                op.logdet(0.0)
            continue
        v = random_like(params, seed=1)
        back = op.solve(op.matvec(v), 0.0)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-8)  # cond(F̂) < 1e4 here: 1e-12 and margin
