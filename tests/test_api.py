"""optax integration and robustness: jit, chains, schedules, inject_hyperparams, state, dtypes.

Every update runs under ``jax.jit``. Most tests use one Dense layer (64 -> 10) on scikit-learn's
digits in float64 and share their compiled functions, to keep compilation time low.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from sklearn.datasets import load_digits

import ekfac_optax as ek


class MLP(nn.Module):
    widths: tuple[int, ...] = (10,)
    dtype: Any = None
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(x)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x


def make_loss(model):
    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


@functools.cache
def digits():
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def batch(seed, size=64, dtype=np.float64):
    x, y = digits()
    idx = np.random.default_rng(seed).choice(len(x), size, replace=False)
    return x[idx].astype(dtype), y[idx]


def init_params(model, x, seed=0):
    """Flax's parameter tree, filled with numpy (no compilation): kernels and embeddings
    N(0, 1/fan_in), biases 0, LayerNorm scales 1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "bias":
            value = np.zeros(leaf.shape)
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def setup(widths=(10,), dtype=jnp.float64):
    """params, loss_fn and ``value_grad_and_stats(loss_fn)`` of an MLP (activations in dtype)."""
    model = MLP(widths, dtype=dtype, param_dtype=dtype)
    params = init_params(model, np.zeros((1, 64), dtype))
    loss_fn = make_loss(model)
    return params, jax.jit(loss_fn), ek.value_grad_and_stats(loss_fn)


def leaves(tree):
    return [np.asarray(x).astype(np.float64) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, rtol=1e-12):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())


def trees_differ(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


def is_zero(tree):
    return all(not np.any(x) for x in leaves(tree))


def shapes_and_dtypes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# The setting of most tests: MLP((10,)) in float64, batches of 64, ek.ekfac(LR, **KW).
LR = 0.1
KW = dict(damping=1e-2, basis_update_every=2, factor_decay=0.5)


@functools.cache
def default_setup():
    params, _, grad_fn = setup()
    return params, jax.jit(grad_fn)


def default_grads(seed):
    """``(grads, stats)`` of batch ``seed`` at the initial params."""
    params, grad_fn = default_setup()
    return grad_fn(params, *batch(seed))[1:]


@jax.jit
def reference_update(damping, grads, state, params, stats):
    """``ek.ekfac(LR, **KW)`` with a given ``damping`` (traced: one compilation for all)."""
    return ek.ekfac(LR, **dict(KW, damping=damping)).update(grads, state, params, stats=stats)


# ----------------------------------------------------------------------------------------------
# jit, chains, aliases


def test_jit_chain_with_clipping_and_lr_schedule_trains():
    """scale_by_ekfac → clip_by_global_norm → scale_by_learning_rate(schedule), jitted."""
    params, loss_fn, grad_fn = setup()
    schedule = optax.exponential_decay(0.5, transition_steps=10, decay_rate=0.5)
    tx = optax.chain(
        ek.scale_by_ekfac(damping=1e-2, basis_update_every=5),
        optax.clip_by_global_norm(1.0),
        optax.scale_by_learning_rate(schedule),
    )

    @jax.jit
    def train_step(params, opt_state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(updates)

    x_all, y_all = digits()
    loss_before = loss_fn(params, x_all, y_all)
    opt_state = tx.init(params)
    norms = []
    for step in range(30):
        params, opt_state, norm = train_step(params, opt_state, *batch(step))
        norms.append(norm)
    loss_after = loss_fn(params, x_all, y_all)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    # Clipped to norm 1, then scaled by the learning rate scheduled at this step.
    lrs = 0.5 * 0.5 ** (np.arange(30) / 10)
    assert np.all(np.asarray(norms) <= lrs * (1 + 1e-6)), (norms, lrs)
    assert int(opt_state[0].count) == 30


@pytest.mark.parametrize("name", ["ekfac", "kfac"])
def test_aliases_equal_the_explicit_chain(name):
    """ek.ekfac / ek.kfac trace to the same program as the explicit chain and agree bit-for-bit."""
    kw = dict(damping=1e-2, basis_update_every=2, factor_decay=0.9, damping_mode="factored")
    schedule = optax.linear_schedule(0.2, 0.1, 5)
    if name == "ekfac":
        alias = ek.ekfac(schedule, scaling="running", scaling_decay=0.8, **kw)
        explicit = optax.chain(
            ek.scale_by_ekfac(scaling="running", scaling_decay=0.8, **kw),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        alias = ek.kfac(schedule, **kw)
        explicit = optax.chain(ek.scale_by_kfac(**kw), optax.scale_by_learning_rate(schedule))
    params, _ = default_setup()
    grads, stats = default_grads(0)
    state = alias.init(params)
    assert_trees_equal(state, explicit.init(params))

    def jaxpr(tx):
        def update(g, s, st):
            return tx.update(g, s, params, stats=st)

        return str(jax.make_jaxpr(update)(grads, state, stats))

    assert jaxpr(alias) == jaxpr(explicit)

    @jax.jit
    def both(grads, state, params, stats):
        return [tx.update(grads, state, params, stats=stats) for tx in (alias, explicit)]

    (u_alias, s_alias), (u_explicit, s_explicit) = both(grads, state, params, stats)
    assert_trees_equal(u_alias, u_explicit)
    assert_trees_equal(s_alias, s_explicit)
    assert not is_zero(u_alias)


# ----------------------------------------------------------------------------------------------
# Hyperparameters: inject_hyperparams, damping schedules


def test_inject_hyperparams_damping_under_jit():
    params, _ = default_setup()
    grads, stats = default_grads(0)
    tx = optax.inject_hyperparams(ek.ekfac)(learning_rate=LR, **KW)
    state = tx.init(params)
    assert {"learning_rate", "damping"} <= set(state.hyperparams)

    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    updates, new_state = update(grads, state, params, stats)
    damping = jnp.asarray(1.0, state.hyperparams["damping"].dtype)
    hyperparams = dict(state.hyperparams, damping=damping)
    updates_damped, _ = update(grads, state._replace(hyperparams=hyperparams), params, stats)
    assert update._cache_size() == 1  # changing a hyperparameter does not retrace

    assert trees_differ(updates, updates_damped)
    fresh = ek.ekfac(LR, **KW).init(params)
    assert_trees_close(updates, reference_update(1e-2, grads, fresh, params, stats)[0])
    assert_trees_close(updates_damped, reference_update(1.0, grads, fresh, params, stats)[0])
    assert int(new_state.inner_state[0].count) == 1


def test_damping_schedule_is_evaluated_at_the_update_count():
    params, grad_fn = default_setup()
    schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.1)  # 1, .1, .01
    tx = ek.ekfac(LR, **dict(KW, damping=schedule))
    scheduled = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    state = tx.init(params)
    for count in range(3):
        _, grads, stats = grad_fn(params, *batch(count))
        updates, new_state = scheduled(grads, state, params, stats)
        damping = schedule(jnp.asarray(count, jnp.int32))
        expected, expected_state = reference_update(damping, grads, state, params, stats)
        assert_trees_close(updates, expected)
        assert_trees_equal(new_state, expected_state)
        other, _ = reference_update(schedule(count + 1), grads, state, params, stats)
        assert trees_differ(updates, other), f"the damping at count {count} has no effect"
        state = new_state
        params = jax.tree.map(lambda p, u: np.asarray(p) + np.asarray(u), params, updates)


# ----------------------------------------------------------------------------------------------
# State: amortized basis, structure, shape/dtype stability


@pytest.fixture(scope="module")
def history():
    """States ``[init, after update 1, ..., after update 8]`` with ``basis_update_every=3``."""
    params, grad_fn = default_setup()
    tx = ek.ekfac(LR, damping=1e-2, basis_update_every=3, factor_decay=0.5)

    @jax.jit
    def step(params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state

    states = [tx.init(params)]
    for seed in range(8):
        params, state = step(params, states[-1], *batch(seed))
        states.append(state)
    return [state[0] for state in states]


def test_basis_is_recomputed_exactly_on_scheduled_updates(history):
    for count, (before, after) in enumerate(zip(history[:-1], history[1:], strict=True)):
        assert int(before.count) == count and int(after.count) == count + 1
        old, new = before.blocks["Dense_0"], after.blocks["Dense_0"]
        basis_changed = {
            field: not np.array_equal(getattr(old, field), getattr(new, field))
            for field in ("basis_a", "basis_b", "eigvals_a", "eigvals_b")
        }
        expected = count % 3 == 0
        assert basis_changed == dict.fromkeys(basis_changed, expected), count
        assert not np.array_equal(old.factor_a, new.factor_a), count
        assert not np.array_equal(old.factor_b, new.factor_b), count
        if expected:  # the new basis diagonalizes the new factors
            for factor, eigvals, basis in (
                (new.factor_a, new.eigvals_a, new.basis_a),
                (new.factor_b, new.eigvals_b, new.basis_b),
            ):
                np.testing.assert_allclose(basis.T @ basis, np.eye(len(eigvals)), atol=1e-12)
                np.testing.assert_allclose(
                    (basis * eigvals) @ basis.T, factor, atol=1e-12 * np.abs(factor).max()
                )


def test_state_types_and_every_array_created_at_init(history):
    init, final = history[0], history[-1]
    for state in (init, final):
        assert isinstance(state, ek.ScaleByEkfacState) and isinstance(state, tuple)
        assert {"count", "blocks"} <= set(state._fields)
        assert list(state.blocks) == ["Dense_0"]
        assert isinstance(state.blocks["Dense_0"], ek.BlockState)
        assert jnp.shape(state.count) == () and state.count.dtype == jnp.int32
    assert jax.tree.structure(init) == jax.tree.structure(final)
    assert shapes_and_dtypes(init) == shapes_and_dtypes(final)
    block = init.blocks["Dense_0"]  # kernel (64, 10) and bias (10,): a = 65, b = 10
    assert block.factor_a.shape == (65, 65) and block.factor_b.shape == (10, 10)
    assert block.basis_a.shape == (65, 65) and block.basis_b.shape == (10, 10)
    assert block.eigvals_a.shape == (65,) and block.eigvals_b.shape == (10,)
    assert block.scalings.shape == (65, 10)


# Parameter (and activation) dtype -> curvature dtype.
DTYPES = {"bfloat16": "float32", "float32": "float32", "float64": "float64"}


@functools.cache
def dtype_case(dtype_name):
    """A jitted step ``lax.cond(pred, update, no-op)`` for params and activations of a dtype."""
    dtype = jnp.dtype(dtype_name)
    params, _, grad_fn = setup(dtype=dtype)
    tx = ek.ekfac(LR, **KW)

    @jax.jit
    def step(pred, params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)

        def update():
            return tx.update(grads, state, params, stats=stats)

        def skip():
            return jax.tree.map(jnp.zeros_like, grads), state

        return jax.lax.cond(pred, update, skip)

    return params, tx, step


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_update_passes_through_lax_cond(dtype_name):
    """optax's stability test: both branches of lax.cond agree in shape and dtype (under jit)."""
    params, tx, step = dtype_case(dtype_name)
    state = tx.init(params)
    x, y = batch(0, dtype=np.dtype(dtype_name))
    skipped, same_state = step(False, params, state, x, y)
    assert is_zero(skipped)
    assert_trees_equal(same_state, state)
    updates, new_state = step(True, params, state, x, y)
    assert trees_differ(new_state, state) and not is_zero(updates)
    assert shapes_and_dtypes(updates) == shapes_and_dtypes(params)
    assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_dtypes_of_state_and_updates(dtype_name):
    """Curvature in float32 for bf16 params and activations, else in the params' dtype; updates
    in the params' dtype; finite over several steps."""
    params, tx, step = dtype_case(dtype_name)
    dtype, curvature = jnp.dtype(dtype_name), jnp.dtype(DTYPES[dtype_name])
    state = tx.init(params)
    assert {x.dtype for x in jax.tree.leaves(state[0].blocks)} == {curvature}
    for seed in range(3):
        updates, state = step(True, params, state, *batch(seed, dtype=dtype))
        assert {u.dtype for u in jax.tree.leaves(updates)} == {dtype}
        assert all(np.isfinite(u).all() for u in leaves(updates)) and not is_zero(updates)
        assert all(np.isfinite(x).all() for x in leaves(state[0].blocks))
        params = jax.tree.map(
            lambda p, u: (np.asarray(p) + np.asarray(u)).astype(dtype), params, updates
        )
    assert int(state[0].count) == 3  # no step was skipped as non-finite
    assert {x.dtype for x in jax.tree.leaves(state[0].blocks)} == {curvature}
    assert {p.dtype for p in jax.tree.leaves(params)} == {dtype}


# ----------------------------------------------------------------------------------------------
# Parameters outside Kronecker blocks: summarize and the identity fallback


class TokenNet(nn.Module):
    """Digits as 64 tokens (pixel intensities 0..16): Embed → LayerNorm → flatten → Dense."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(17, 4, dtype=jnp.float64, param_dtype=jnp.float64)(tokens)
        x = nn.LayerNorm(param_dtype=jnp.float64)(x)
        return nn.Dense(10, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))


def test_summarize_and_identity_fallback_for_layernorm_and_embed():
    model = TokenNet()
    x_all, y_all = digits()
    tokens = np.rint(x_all * 16).astype(np.int32)
    params = init_params(model, tokens[:1])

    summary = ek.summarize(params).splitlines()
    assert summary[0].split() == ["parameter", "shape", "preconditioning"]
    rows = {line.split()[0]: line for line in summary[1:]}
    expected = {
        "Dense_0/kernel": ("(256, 10)", "kronecker block 257x10 of Dense_0"),
        "Dense_0/bias": ("(10,)", "kronecker block 257x10 of Dense_0"),
        "Embed_0/embedding": ("(17, 4)", "identity"),
        "LayerNorm_0/scale": ("(4,)", "identity"),
        "LayerNorm_0/bias": ("(4,)", "identity"),
    }
    assert set(rows) == set(expected), summary
    for path, (shape, how) in expected.items():
        assert shape in rows[path] and how in rows[path], rows[path]

    loss_fn = make_loss(model)
    grad_fn = ek.value_grad_and_stats(loss_fn)
    full_loss = jax.jit(loss_fn)
    tx = ek.ekfac(LR, damping=1e-2, basis_update_every=5)
    assert list(tx.init(params)[0].blocks) == ["Dense_0"]

    @jax.jit
    def train_step(params, opt_state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, grads, updates

    loss_before = full_loss(params, tokens, y_all)
    opt_state = tx.init(params)
    for seed in range(20):
        idx = np.random.default_rng(seed).choice(len(tokens), 64, replace=False)
        params, opt_state, grads, updates = train_step(params, opt_state, tokens[idx], y_all[idx])
        identity = jax.tree.map(lambda g: -LR * np.asarray(g), grads)
        for layer in ("Embed_0", "LayerNorm_0"):
            assert_trees_equal(updates[layer], identity[layer])
        assert trees_differ(updates["Dense_0"], identity["Dense_0"])
    assert full_loss(params, tokens, y_all) < 0.3 * loss_before


# ----------------------------------------------------------------------------------------------
# Composition with other transformations and wrappers


def test_after_add_decayed_weights_in_a_chain():
    """stats are forwarded past a transformation placed before scale_by_ekfac."""
    params, _ = default_setup()
    grads, stats = default_grads(0)
    wd = 0.1
    tx = optax.chain(optax.add_decayed_weights(wd), ek.ekfac(LR, **KW))
    updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(
        grads, tx.init(params), params, stats
    )
    fresh = ek.ekfac(LR, **KW).init(params)
    decayed = jax.tree.map(lambda g, p: np.asarray(g) + wd * np.asarray(p), grads, params)
    assert_trees_close(updates, reference_update(1e-2, decayed, fresh, params, stats)[0])
    assert trees_differ(updates, reference_update(1e-2, grads, fresh, params, stats)[0])


def test_multi_steps_forwards_stats():
    """optax.MultiSteps forwards ``stats``: the inner update sees the mean of the k gradients and
    the stats of the last micro-batch only (earlier micro-batches add nothing to the curvature)."""
    params, _ = default_setup()
    tx = optax.MultiSteps(ek.ekfac(LR, **KW), every_k_schedule=2, accumulator_dtype=jnp.float64)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    grads_1, stats_1 = default_grads(1)
    grads_2, stats_2 = default_grads(2)

    state = tx.init(params)
    updates_1, state = update(grads_1, state, params, stats_1)
    assert is_zero(updates_1) and int(state.inner_opt_state[0].count) == 0
    updates_2, state = update(grads_2, state, params, stats_2)
    assert int(state.inner_opt_state[0].count) == 1

    mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, grads_1, grads_2)
    fresh = ek.ekfac(LR, **KW).init(params)
    expected, expected_state = reference_update(1e-2, mean, fresh, params, stats_2)
    assert_trees_close(updates_2, expected, rtol=1e-10)
    assert_trees_close(state.inner_opt_state, expected_state, rtol=1e-10)


def test_apply_if_finite_forwards_stats_and_rejects_nan():
    params, _ = default_setup()
    grads, stats = default_grads(0)
    tx = optax.apply_if_finite(ek.ekfac(LR, **KW), max_consecutive_errors=2)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))

    state = tx.init(params)
    updates, state = update(grads, state, params, stats)
    assert bool(state.last_finite) and int(state.inner_state[0].count) == 1
    fresh = ek.ekfac(LR, **KW).init(params)
    assert_trees_close(updates, reference_update(1e-2, grads, fresh, params, stats)[0])

    bad = jax.tree.map(np.array, grads)
    bad["Dense_0"]["kernel"][0, 0] = np.nan
    rejected, new_state = update(bad, state, params, stats)
    assert not bool(new_state.last_finite) and is_zero(rejected)
    assert_trees_equal(new_state.inner_state, state.inner_state)
