"""optax integration and robustness: jit, chains, schedules, inject_hyperparams, state, dtypes.

Every update runs under ``jax.jit``. Most tests use one Dense layer (64 -> 10) on scikit-learn's
digits in float64 and share their compiled functions, to keep compilation time low.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import (
    MLP,
    assert_trees_close,
    assert_trees_equal,
    classifier_loss,
    digits,
    init_params,
    leaves,
)
from reference import per_example_grads

import ekfac_optax as ek

ROUND_OFF = 1e-12  # the same arithmetic in another order (float64)


def batch(seed, size=64, dtype=np.float64):
    x, y = digits()
    idx = np.random.default_rng(seed).choice(len(x), size, replace=False)
    return x[idx].astype(dtype), y[idx]


def setup(widths=(10,), dtype=jnp.float64):
    """params, loss_fn, ``value_grad_and_stats(loss_fn)`` and the blocks of an MLP (activations
    in dtype); the blocks from ``ek.find_blocks`` on a batch of the tests' shapes."""
    model = MLP(widths, dtype=dtype, param_dtype=dtype)
    params = init_params(model, np.zeros((1, 64), dtype))
    loss_fn = classifier_loss(model)
    blocks = ek.find_blocks(loss_fn, params, *batch(0, dtype=np.dtype(dtype)))
    return params, jax.jit(loss_fn), ek.value_grad_and_stats(loss_fn), blocks


def trees_differ(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


def is_zero(tree):
    return all(not np.any(x) for x in leaves(tree))


def shapes_and_dtypes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# The setting of most tests: MLP((10,)) in float64, batches of 64, ek.ekfac(LR, **kw()).
LR = 0.1
KW = dict(damping=1e-2, basis_update_every=2, factor_decay=0.5)


@functools.cache
def default_setup():
    """params, the jitted ``value_grad_and_stats`` and the blocks of ``MLP((10,))``."""
    params, _, grad_fn, blocks = setup()
    return params, jax.jit(grad_fn), blocks


def default_blocks():
    return default_setup()[2]


def kw(**changes):
    """``KW`` with the blocks of the default setup, and ``changes``."""
    return dict(KW, blocks=default_blocks(), **changes)


def default_grads(seed):
    """``(grads, stats)`` of batch ``seed`` at the initial params."""
    params, grad_fn, _ = default_setup()
    return grad_fn(params, *batch(seed))[1:]


@jax.jit
def reference_update(damping, grads, state, params, stats):
    """``ek.ekfac(LR, **kw())`` with a given ``damping`` (traced: one compilation for all)."""
    return ek.ekfac(LR, **kw(damping=damping)).update(grads, state, params, stats=stats)


# ----------------------------------------------------------------------------------------------
# jit, chains, aliases


def test_jit_chain_with_clipping_and_lr_schedule_trains():
    """scale_by_ekfac → clip_by_global_norm → scale_by_learning_rate(schedule), jitted."""
    params, loss_fn, grad_fn, blocks = setup()
    schedule = optax.exponential_decay(0.5, transition_steps=10, decay_rate=0.5)
    tx = optax.chain(
        ek.scale_by_ekfac(blocks=blocks, damping=1e-2, basis_update_every=5),
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
    common = dict(
        blocks=default_blocks(),
        damping=1e-2,
        basis_update_every=2,
        factor_decay=0.9,
        damping_mode="factored",
    )
    schedule = optax.linear_schedule(0.2, 0.1, 5)
    if name == "ekfac":
        alias = ek.ekfac(schedule, scaling="running", scaling_decay=0.8, **common)
        explicit = optax.chain(
            ek.scale_by_ekfac(scaling="running", scaling_decay=0.8, **common),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        alias = ek.kfac(schedule, **common)
        explicit = optax.chain(ek.scale_by_kfac(**common), optax.scale_by_learning_rate(schedule))
    params, _, _ = default_setup()
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
    params, _, _ = default_setup()
    grads, stats = default_grads(0)
    tx = optax.inject_hyperparams(ek.ekfac)(learning_rate=LR, **kw())
    state = tx.init(params)
    assert {"learning_rate", "damping"} <= set(state.hyperparams)

    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    updates, new_state = update(grads, state, params, stats)
    damping = jnp.asarray(1.0, state.hyperparams["damping"].dtype)
    hyperparams = dict(state.hyperparams, damping=damping)
    updates_damped, _ = update(grads, state._replace(hyperparams=hyperparams), params, stats)
    assert update._cache_size() == 1  # changing a hyperparameter does not retrace

    assert trees_differ(updates, updates_damped)
    fresh = ek.ekfac(LR, **kw()).init(params)
    assert_trees_close(
        updates, reference_update(1e-2, grads, fresh, params, stats)[0], rtol=ROUND_OFF
    )
    assert_trees_close(
        updates_damped, reference_update(1.0, grads, fresh, params, stats)[0], rtol=ROUND_OFF
    )
    assert int(new_state.inner_state[0].count) == 1


def test_damping_schedule_is_evaluated_at_the_update_count():
    params, grad_fn, _ = default_setup()
    schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.1)  # 1, .1, .01
    tx = ek.ekfac(LR, **kw(damping=schedule))
    scheduled = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    state = tx.init(params)
    for count in range(3):
        _, grads, stats = grad_fn(params, *batch(count))
        updates, new_state = scheduled(grads, state, params, stats)
        damping = schedule(jnp.asarray(count, jnp.int32))
        expected, expected_state = reference_update(damping, grads, state, params, stats)
        assert_trees_close(updates, expected, rtol=ROUND_OFF)
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
    params, grad_fn, blocks = default_setup()
    tx = ek.ekfac(LR, blocks=blocks, damping=1e-2, basis_update_every=3, factor_decay=0.5)

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
    params, _, grad_fn, blocks = setup(dtype=dtype)
    tx = ek.ekfac(LR, blocks=blocks, **KW)

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
# Embed and LayerNorm blocks, summarize, and the fallbacks of parameters in no block


class TokenNet(nn.Module):
    """Digits as 64 tokens (pixel intensities 0..16): Embed → LayerNorm → flatten → Dense."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(17, 4, dtype=jnp.float64, param_dtype=jnp.float64)(tokens)
        x = nn.LayerNorm(param_dtype=jnp.float64)(x)
        return nn.Dense(10, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))


@functools.cache
def token_setup():
    """params, loss_fn, all tokens and labels, and the blocks of ``TokenNet``."""
    model = TokenNet()
    x_all, y_all = digits()
    tokens = np.rint(x_all * 16).astype(np.int32)
    params = init_params(model, tokens[:1])
    loss_fn = classifier_loss(model)
    blocks = ek.find_blocks(loss_fn, params, tokens[:64], y_all[:64])
    return params, loss_fn, tokens, y_all, blocks


def token_batch(seed, tokens, labels):
    idx = np.random.default_rng(seed).choice(len(tokens), 64, replace=False)
    return tokens[idx], labels[idx]


def summary_rows(params, blocks, **kwargs):
    summary = ek.summarize(params, blocks, **kwargs).splitlines()
    assert summary[0].split() == ["parameter", "shape", "params", "state", "preconditioning"]
    assert summary[-1].startswith("total")
    return {line.split()[0]: line for line in summary[1:-1]}


def test_find_blocks_and_summarize_layernorm_and_embed():
    """Dense: a Kronecker block; Embed: an embedding block (diagonal input factor); LayerNorm: a
    diagonal block over [scale; bias]. Every parameter is in a block: no fallback row."""
    params, _, _, _, blocks = token_setup()
    assert list(blocks) == ["Dense_0", "Embed_0", "LayerNorm_0"]
    assert {path: (spec.kind, spec.block) for path, spec in blocks.items()} == {
        "Dense_0": ("dense", "kronecker"),
        "Embed_0": ("embed", "embed"),
        "LayerNorm_0": ("scale_and_shift", "diagonal"),
    }
    assert all(isinstance(spec, ek.BlockSpec) for spec in blocks.values())
    assert (blocks["Dense_0"].d_in, blocks["Dense_0"].d_out) == (256, 10)
    assert (blocks["Embed_0"].d_in, blocks["Embed_0"].d_out) == (17, 4)
    assert blocks["LayerNorm_0"].d_out == 8  # the scalars of [scale; bias]
    assert all(spec.stack == () for spec in blocks.values())

    rows = summary_rows(params, blocks)
    expected = {
        "Dense_0/kernel": ("(256, 10)", "kronecker block 257x10 of Dense_0"),
        "Dense_0/bias": ("(10,)", "kronecker block 257x10 of Dense_0"),
        "Embed_0/embedding": ("(17, 4)", "embedding block 17x4"),
        "LayerNorm_0/scale": ("(4,)", "diagonal block (8 scalars) of LayerNorm_0"),
        "LayerNorm_0/bias": ("(4,)", "diagonal block (8 scalars) of LayerNorm_0"),
    }
    assert set(rows) == set(expected), rows
    for path, (shape, how) in expected.items():
        assert shape in rows[path] and how in rows[path], rows[path]
        assert "fallback" not in rows[path] and "identity" not in rows[path], rows[path]

    # With only the Dense block, the others are listed under the fallback.
    dense_only = {"Dense_0": blocks["Dense_0"]}
    for fallback, how in (("diagonal", "diagonal fallback"), ("identity", "identity")):
        rows = summary_rows(params, dense_only, fallback=fallback)
        for path in ("Embed_0/embedding", "LayerNorm_0/scale", "LayerNorm_0/bias"):
            assert how in rows[path], rows[path]
        assert "kronecker block 257x10 of Dense_0" in rows["Dense_0/kernel"]


def test_summarize_names_the_capped_factor_sides():
    """``max_factor_dim``: ``summarize`` says which side of a block keeps only its diagonal and
    why (its size against the cap), for the preconditioner's cap; none above the default."""
    params, _, _, _, blocks = token_setup()
    rows = summary_rows(params, blocks, max_factor_dim=100)
    assert rows["Dense_0/kernel"].endswith(
        "kronecker block 257x10 of Dense_0 [dense] "
        "(input factor diagonal: 257 > max_factor_dim=100)"
    )
    rows = summary_rows(params, blocks, max_factor_dim=3)
    assert (
        "(input factor diagonal: 257 > max_factor_dim=3, output factor diagonal: 10 > "
        in (rows["Dense_0/bias"])
    )
    assert (
        "(diagonal input factor, output factor diagonal: 4 > max_factor_dim=3)"
        in (rows["Embed_0/embedding"])
    )
    assert "factor diagonal" not in ek.summarize(params, blocks)  # the default cap, 4096


def test_summary_gives_each_block_state_and_the_totals():
    """``summary``'s bytes, counted by hand from the state's documented shapes (float64): the
    Dense block 257 x 10 with its input side capped at 100, the embedding 17 x 4, the LayerNorm
    diagonal block of 8 scalars; the totals; ``summarize`` prints them."""
    params, _, _, _, blocks = token_setup()
    info = ek.summary(params, blocks, max_factor_dim=100)
    a, b, v, d = 257, 10, 17, 4
    dense = a + a + b * b + b + b * b + a * b  # factor_a, eigvals_a (vectors), B, S_B, U_B, s
    embed = v + v + d * d + d + d * d + v * d  # token frequencies (twice), B, S_B, U_B, s
    expected = {"Dense_0/bias": dense, "Embed_0/embedding": embed, "LayerNorm_0/bias": 8}
    state = {r.path: r.state_bytes for r in info.rows}
    assert state == {
        "Dense_0/bias": 8 * dense,
        "Dense_0/kernel": 0,  # the block's state is on its first parameter
        "Embed_0/embedding": 8 * embed,
        "LayerNorm_0/bias": 8 * 8,
        "LayerNorm_0/scale": 0,
    }
    assert info.state_bytes == 8 * sum(expected.values()) + 8  # + count and skipped (int32)
    assert info.param_bytes == 8 * (a * b + v * d + 8)
    assert sum(r.param_bytes for r in info.rows) == info.param_bytes
    total = ek.summarize(params, blocks, max_factor_dim=100).splitlines()[-1]
    assert total.split()[:3] == ["total", "21.2", "kB"], total


def test_summary_of_a_32k_vocabulary_head_allocates_nothing():
    """A width-64 model with a 32768-token head, summarized from abstract parameters
    (``jax.eval_shape``): with the default cap the head's state is its 65 x 65 input factor
    and vectors, 8.8 MB (the parameters: 8.5 MB); without a cap it would be the 8.6 GB of two
    32768² matrices."""
    model = nn.Sequential([nn.Dense(64), nn.Dense(32768)])
    x, y = jnp.zeros((2, 16)), jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    loss_fn = classifier_loss(model)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    a, b = 65, 32768
    head = {r.path: r.state_bytes for r in ek.summary(params, blocks).rows}["layers_1/bias"]
    assert head == 4 * (a * a + a + a * a + b + b + a * b)
    uncapped = ek.summary(params, blocks, max_factor_dim=b).rows
    assert {r.path: r.state_bytes for r in uncapped}["layers_1/bias"] > 8.5e9


def test_both_sides_capped_is_the_per_example_diagonal():
    """Every side above ``max_factor_dim``: the bases are the identity, so EKFAC's first update
    (``factor_decay=0``) is ``g / (mean_n G_n² + ε)`` weight by weight, ``G_n`` the per-example
    gradients from ``jax.vmap(jax.grad(...))``, for the Dense block (257 x 10) and the embedding
    (17 x 4, output side capped). float64: round-off only (measured below 1e-15)."""
    params, loss_fn, tokens, labels, blocks = token_setup()
    x, y = token_batch(0, tokens, labels)
    tx = ek.scale_by_ekfac(blocks=blocks, damping=1e-3, factor_decay=0.0, max_factor_dim=3)

    @jax.jit
    def update(params, x, y):
        _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
        return grads, *tx.update(grads, tx.init(params), params, stats=stats)

    grads, updates, state = update(params, x, y)
    assert state.blocks["Embed_0"].basis_b is None and state.blocks["Dense_0"].basis_a is None
    per_example = per_example_grads(loss_fn, params, x, y)
    for path in ("Dense_0", "Embed_0"):
        for name, g in grads[path].items():
            s = np.mean(np.asarray(per_example[path][name]) ** 2, axis=0)
            expected = np.asarray(g) / (s + 1e-3)
            np.testing.assert_allclose(updates[path][name], expected, rtol=1e-12, atol=1e-15)


def test_embed_and_layernorm_blocks_train():
    """With every block, the state holds an embedding block whose input factor is a vector of
    token frequencies (vocab,), a LayerNorm diagonal block, no fallback state; every parameter is
    preconditioned (no update is the plain gradient step) and the loss goes down."""
    params, loss_fn, tokens, labels, blocks = token_setup()
    grad_fn = ek.value_grad_and_stats(loss_fn)
    full_loss = jax.jit(loss_fn)
    tx = ek.ekfac(LR, blocks=blocks, damping=1e-2, basis_update_every=5)
    state = tx.init(params)
    assert list(state[0].blocks) == ["Dense_0", "Embed_0", "LayerNorm_0"]
    embed = state[0].blocks["Embed_0"]
    assert embed.factor_a.shape == (17,) and embed.factor_b.shape == (4, 4)
    assert not state[0].fallback

    @jax.jit
    def train_step(params, opt_state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, grads, updates

    loss_before = full_loss(params, tokens, labels)
    opt_state = state
    for seed in range(20):
        params, opt_state, grads, updates = train_step(
            params, opt_state, *token_batch(seed, tokens, labels)
        )
        plain = jax.tree.map(lambda g: -LR * np.asarray(g), grads)
        for layer in ("Dense_0", "Embed_0", "LayerNorm_0"):
            assert trees_differ(updates[layer], plain[layer]), (seed, layer)
    assert int(opt_state[0].count) == 20
    # Token counts over the last batch's N T = 64 * 64 positions: a distribution over the vocab.
    factor_a = np.asarray(opt_state[0].blocks["Embed_0"].factor_a)
    assert np.all(factor_a >= 0) and np.isclose(factor_a.sum(), 1.0)
    assert full_loss(params, tokens, labels) < 0.3 * loss_before


@pytest.mark.parametrize("fallback", ["identity", "diagonal"])
def test_parameters_in_no_block_get_the_fallback(fallback):
    """Only the Dense block (a sub-dict of the blocks, the same for value_grad_and_stats): the
    Embed and LayerNorm parameters get the fallback. ``"identity"``: passed through unchanged
    (the old behaviour), no fallback state. ``"diagonal"`` (the default): ``g / (s + damping)``
    with ``s`` the debiased EMA (decay ``scaling_decay``) of ``N g²``, the first value ``N g²``,
    state in ``state.fallback[param path]``."""
    params, loss_fn, tokens, labels, blocks = token_setup()
    dense_only = {path: spec for path, spec in blocks.items() if path == "Dense_0"}
    grad_fn = ek.value_grad_and_stats(loss_fn, layers=dense_only)
    damping, decay = 1e-2, 0.8
    kwargs = {} if fallback == "diagonal" else dict(fallback=fallback)  # "diagonal": the default
    tx = ek.ekfac(
        LR, blocks=dense_only, damping=damping, basis_update_every=5, scaling_decay=decay, **kwargs
    )
    fallback_paths = ["Embed_0/embedding", "LayerNorm_0/bias", "LayerNorm_0/scale"]

    @jax.jit
    def train_step(params, opt_state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, grads, updates, stats

    opt_state = tx.init(params)
    assert list(opt_state[0].blocks) == ["Dense_0"]
    if fallback == "identity":
        assert not opt_state[0].fallback
    else:
        assert sorted(opt_state[0].fallback) == fallback_paths
    average = {path: 0.0 for path in fallback_paths}  # the EMA m_k of N g², m_0 = 0
    for step in range(1, 6):
        x, y = token_batch(step, tokens, labels)
        params, opt_state, grads, updates, stats = train_step(params, opt_state, x, y)
        assert list(stats) == ["Dense_0"]
        for path in fallback_paths:
            layer, name = path.split("/")
            g = np.asarray(grads[layer][name])
            if fallback == "identity":
                expected = -LR * g
                np.testing.assert_array_equal(updates[layer][name], expected, err_msg=path)
                continue
            average[path] = decay * average[path] + (1 - decay) * len(x) * g**2
            s = average[path] / (1 - decay**step)
            expected = -LR * g / (s + damping)
            np.testing.assert_allclose(updates[layer][name], expected, rtol=1e-10, err_msg=path)
            assert opt_state[0].fallback[path].shape == g.shape
            assert trees_differ(updates[layer][name], -LR * g)
        plain = jax.tree.map(lambda g: -LR * np.asarray(g), grads)
        assert trees_differ(updates["Dense_0"], plain["Dense_0"])
    assert int(opt_state[0].count) == 5


# ----------------------------------------------------------------------------------------------
# Composition with other transformations and wrappers


def test_after_add_decayed_weights_in_a_chain():
    """stats are forwarded past a transformation placed before scale_by_ekfac."""
    params, _, _ = default_setup()
    grads, stats = default_grads(0)
    wd = 0.1
    tx = optax.chain(optax.add_decayed_weights(wd), ek.ekfac(LR, **kw()))
    updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(
        grads, tx.init(params), params, stats
    )
    fresh = ek.ekfac(LR, **kw()).init(params)
    decayed = jax.tree.map(lambda g, p: np.asarray(g) + wd * np.asarray(p), grads, params)
    assert_trees_close(
        updates, reference_update(1e-2, decayed, fresh, params, stats)[0], rtol=ROUND_OFF
    )
    assert trees_differ(updates, reference_update(1e-2, grads, fresh, params, stats)[0])


def test_multi_steps_forwards_stats():
    """optax.MultiSteps forwards ``stats``: the inner update sees the mean of the k gradients and
    the stats of the last micro-batch only (earlier micro-batches add nothing to the curvature)."""
    params, _, _ = default_setup()
    tx = optax.MultiSteps(ek.ekfac(LR, **kw()), every_k_schedule=2, accumulator_dtype=jnp.float64)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    grads_1, stats_1 = default_grads(1)
    grads_2, stats_2 = default_grads(2)

    state = tx.init(params)
    updates_1, state = update(grads_1, state, params, stats_1)
    assert is_zero(updates_1) and int(state.inner_opt_state[0].count) == 0
    updates_2, state = update(grads_2, state, params, stats_2)
    assert int(state.inner_opt_state[0].count) == 1

    mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, grads_1, grads_2)
    fresh = ek.ekfac(LR, **kw()).init(params)
    expected, expected_state = reference_update(1e-2, mean, fresh, params, stats_2)
    assert_trees_close(updates_2, expected, rtol=1e-10)
    assert_trees_close(state.inner_opt_state, expected_state, rtol=1e-10)


def test_apply_if_finite_forwards_stats_and_rejects_nan():
    params, _, _ = default_setup()
    grads, stats = default_grads(0)
    tx = optax.apply_if_finite(ek.ekfac(LR, **kw()), max_consecutive_errors=2)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))

    state = tx.init(params)
    updates, state = update(grads, state, params, stats)
    assert bool(state.last_finite) and int(state.inner_state[0].count) == 1
    fresh = ek.ekfac(LR, **kw()).init(params)
    assert_trees_close(
        updates, reference_update(1e-2, grads, fresh, params, stats)[0], rtol=ROUND_OFF
    )

    bad = jax.tree.map(np.array, grads)
    bad["Dense_0"]["kernel"][0, 0] = np.nan
    rejected, new_state = update(bad, state, params, stats)
    assert not bool(new_state.last_finite) and is_zero(rejected)
    assert_trees_equal(new_state.inner_state, state.inner_state)
