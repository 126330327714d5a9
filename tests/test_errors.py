"""Bad inputs raise a clear ValueError/TypeError at trace time, eagerly and under jax.jit, naming
the layer and expected vs actual shapes, and leave the optimizer state untouched (a good update
with the same state works afterwards)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import ekfac_optax as ek

N = 32


class MLP(nn.Module):
    widths: tuple[int, ...] = (6, 4)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, param_dtype=jnp.float64)(x)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x


def init_params(model, x):
    """Flax's parameter tree filled with numpy (no compilation): kernels N(0, 1/fan_in),
    LayerNorm scales 1, biases 0."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[-1].key == "kernel":
            return rng.standard_normal(leaf.shape) / np.sqrt(math.prod(leaf.shape[:-1]))
        return np.full(leaf.shape, float(path[-1].key == "scale"))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, 5)), rng.integers(0, 4, N)


def make_loss(model):
    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


MODEL = MLP()
TX = ek.ekfac(0.1, damping=1e-2, basis_update_every=2)


@functools.cache
def setup():
    """params, grads, stats of ``MODEL`` and a jitted good update of ``TX``."""
    x, y = data()
    params = init_params(MODEL, x)
    _, grads, stats = jax.jit(ek.value_grad_and_stats(make_loss(MODEL)))(params, x, y)
    good_update = jax.jit(lambda g, s, p, st: TX.update(g, s, p, stats=st))
    return params, grads, stats, good_update


def default_update(grads, state, params, stats):
    return TX.update(grads, state, params, stats=stats)


def assert_rejected(
    exc, match, grads=None, stats=None, params=None, state=None, update=None, state_is_good=True
):
    """``update`` raises ``exc`` eagerly and under jit; the state is untouched and, when it is a
    state of ``TX`` for ``MODEL`` (``state_is_good``), a good update with it works afterwards."""
    good_params, good_grads, good_stats, good_update = setup()
    params = good_params if params is None else params
    grads = good_grads if grads is None else grads
    stats = good_stats if stats is None else stats
    state = TX.init(good_params) if state is None else state
    update = default_update if update is None else update
    snapshot = jax.tree.map(np.array, state)
    blocks, keys = state[0].blocks, list(state[0].blocks)

    with pytest.raises(exc, match=match):
        update(grads, state, params, stats)
    with pytest.raises(exc, match=match):
        jax.jit(update)(grads, state, params, stats)

    assert state[0].blocks is blocks and list(blocks) == keys
    assert jax.tree.structure(state) == jax.tree.structure(snapshot)
    for leaf, saved in zip(jax.tree.leaves(state), jax.tree.leaves(snapshot), strict=True):
        np.testing.assert_array_equal(leaf, saved)
    if state_is_good:
        updates, new_state = good_update(good_grads, state, good_params, good_stats)
        assert int(new_state[0].count) == int(state[0].count) + 1
        assert all(np.isfinite(u).all() and np.any(u) for u in jax.tree.leaves(updates))


# ----------------------------------------------------------------------------------------------
# stats


@pytest.mark.parametrize("name", ["ekfac", "scale_by_ekfac", "scale_by_kfac"])
def test_stats_forgotten(name):
    tx = TX if name == "ekfac" else optax.chain(getattr(ek, name)())

    def update(grads, state, params, stats):
        return tx.update(grads, state, params)

    assert_rejected(
        TypeError,
        r"needs the keyword argument stats=\.\.\..*value_grad_and_stats",
        state=tx.init(setup()[0]),
        update=update,
        state_is_good=name == "ekfac",
    )


def test_stats_not_a_dict():
    stats = list(setup()[2].values())
    assert_rejected(TypeError, r"stats must be a dict from layer path to LayerStats", stats=stats)


def test_stats_entry_not_layer_stats():
    stats = dict(setup()[2])
    stats["Dense_0"] = tuple(stats["Dense_0"])[:1]
    assert_rejected(TypeError, r"stats\['Dense_0'\] must be a LayerStats", stats=stats)


def test_missing_layer_in_stats():
    stats = dict(setup()[2])
    del stats["Dense_1"]
    assert_rejected(ValueError, r"layers \['Dense_1'\] received no stats.*layers=\[", stats=stats)


def test_extra_layer_in_stats():
    stats = dict(setup()[2])
    stats["Dense_9"] = stats["Dense_0"]
    assert_rejected(
        ValueError,
        r"stats has layers \['Dense_9'\] that are not Kronecker blocks.*"
        r"\['Dense_0', 'Dense_1'\]",
        stats=stats,
    )


def _pad(x, axis):
    """``x`` with one more zero entry along ``axis``."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, 1)
    return jnp.pad(x, widths)


SHAPE_ERRORS = {
    # name: (layer, change of its LayerStats, message)
    "wrong d_in": (
        "Dense_1",
        lambda s: s._replace(h=_pad(s.h, 2)),
        r"stats\['Dense_1'\]\.h: expected shape \(N, T, 6\) for kernel \(6, 4\), got \(32, 1, 7\)",
    ),
    "wrong d_out": (
        "Dense_1",
        lambda s: s._replace(delta=_pad(s.delta, 2)),
        r"stats\['Dense_1'\]\.delta: expected shape \(32, 1, 4\) for kernel \(6, 4\) "
        r"and h of shape \(32, 1, 6\), got \(32, 1, 5\)",
    ),
    "N of h and delta differ": (
        "Dense_0",
        lambda s: s._replace(delta=s.delta[:-1]),
        r"stats\['Dense_0'\]\.delta: expected shape \(32, 1, 6\).*got \(31, 1, 6\)",
    ),
    "T of h and delta differ": (
        "Dense_0",
        lambda s: s._replace(delta=_pad(s.delta, 1)),
        r"stats\['Dense_0'\]\.delta: expected shape \(32, 1, 6\).*got \(32, 2, 6\)",
    ),
    "h without the positions axis": (
        "Dense_0",
        lambda s: s._replace(h=s.h[:, 0]),
        r"stats\['Dense_0'\]\.h: expected shape \(N, T, 5\) for kernel \(5, 6\), got \(32, 5\)",
    ),
    "N differs between layers": (
        "Dense_1",
        lambda s: s._replace(h=s.h[:-1], delta=s.delta[:-1]),
        r"batch sizes differ: 'Dense_0' has 32, 'Dense_1' has 31",
    ),
}


@pytest.mark.parametrize("name", SHAPE_ERRORS)
def test_stats_shape_mismatch(name):
    layer, change, match = SHAPE_ERRORS[name]
    stats = dict(setup()[2])
    stats[layer] = change(stats[layer])
    assert_rejected(ValueError, match, stats=stats)


def test_updates_shape_mismatch():
    grads = dict(setup()[1])
    grads["Dense_1"] = dict(grads["Dense_1"], bias=jnp.zeros(5))
    match = r"updates of layer 'Dense_1': bias has shape \(5,\), expected \(4,\)"
    assert_rejected(ValueError, match, grads=grads)


@pytest.mark.parametrize("has_aux", [False, True])
def test_non_scalar_loss(has_aux):
    def per_example_loss(params, x, y):
        logits = MODEL.apply({"params": params}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # (N,): no mean
        return (loss, logits) if has_aux else loss

    params = setup()[0]
    f = ek.value_grad_and_stats(per_example_loss, has_aux=has_aux)
    match = r"loss_fn must return a scalar.*got shape \(32,\)"
    with pytest.raises(ValueError, match=match):
        f(params, *data())
    with pytest.raises(ValueError, match=match):
        jax.jit(f)(params, *data())


# ----------------------------------------------------------------------------------------------
# Hyperparameters


EVERY = r"basis_update_every must be an integer in \[1, 2\*\*31\), got "
BAD_HYPERPARAMETERS = [
    (dict(damping=-1.0), r"damping must be >= 0, got -1\.0"),
    (dict(damping=float("nan")), r"damping must be >= 0, got nan"),
    (dict(basis_update_every=0), EVERY + r"0"),
    (dict(basis_update_every=-3), EVERY + r"-3"),
    (dict(basis_update_every=2.5), EVERY + r"2\.5"),
    (dict(factor_decay=1.0), r"factor_decay must be in \[0, 1\), got 1\.0"),
    (dict(factor_decay=-0.1), r"factor_decay must be in \[0, 1\), got -0\.1"),
    (dict(scaling="kfac"), r"scaling must be 'batch' or 'running', got 'kfac'"),
    (dict(scaling="diagonal"), r"scaling must be 'batch' or 'running', got 'diagonal'"),
    (dict(scaling_decay=1.5), r"scaling_decay must be in \[0, 1\), got 1\.5"),
    (dict(damping_mode="levenberg"), r"damping_mode must be 'tikhonov' or 'factored'"),
]


@pytest.mark.parametrize(
    "factory, kwargs, match",
    [
        pytest.param(factory, kwargs, match, id=f"{factory}-{kwargs}")
        for factory in ("scale_by_ekfac", "ekfac", "scale_by_kfac", "kfac")
        for kwargs, match in BAD_HYPERPARAMETERS
        if "ekfac" in factory or not any(k.startswith("scaling") for k in kwargs)
    ],
)
def test_invalid_hyperparameters(factory, kwargs, match):
    make = getattr(ek, factory)
    args = (0.1,) if factory in ("ekfac", "kfac") else ()
    with pytest.raises(ValueError, match=match):
        make(*args, **kwargs)
    params = setup()[0]
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p: make(*args, **kwargs).init(p))(params)


def test_layers_given_as_a_string():
    params = setup()[0]
    with pytest.raises(TypeError, match=r"sequence of module paths.*got 'Dense_0'"):
        ek.scale_by_ekfac(layers="Dense_0").init(params)
    with pytest.raises(TypeError, match=r"sequence of module paths.*got 'Dense_0'"):
        ek.value_grad_and_stats(make_loss(MODEL), layers="Dense_0")(params, *data())


# ----------------------------------------------------------------------------------------------
# Kernels that no captured module produces; layers=[...]


class OddModel(nn.Module):
    """A kernel from no captured module (``odd``), then LayerNorm and a Dense named "head".

    ``odd``: "DenseGeneral" (2 output axes, no bias), "DenseGeneral+bias" or "custom" (a
    ``kernel`` param of this module itself, whose path is ``""``).
    """

    odd: str = "DenseGeneral"

    @nn.compact
    def __call__(self, x):
        if self.odd == "custom":
            x = x @ self.param("kernel", nn.initializers.lecun_normal(), (5, 6), jnp.float64)
        else:
            dense = nn.DenseGeneral((2, 3), use_bias="bias" in self.odd, param_dtype=jnp.float64)
            x = dense(x).reshape(x.shape[0], 6)
        x = nn.LayerNorm(param_dtype=jnp.float64)(jnp.tanh(x))
        return nn.Dense(4, param_dtype=jnp.float64, name="head")(x)


@pytest.mark.parametrize("odd", ["DenseGeneral", "custom"])
def test_uncaptured_kernel_needs_layers(odd):
    model = OddModel(odd)
    x, y = data()
    params = init_params(model, x)
    path = "" if odd == "custom" else "DenseGeneral_0"
    assert sorted(ek.find_blocks(params)) == sorted([path, "head"])
    loss_fn = make_loss(model)
    tx = ek.ekfac(0.1, damping=1e-2)
    state = tx.init(params)
    _, grads, stats = jax.jit(ek.value_grad_and_stats(loss_fn))(params, x, y)
    assert list(stats) == ["head"]
    match = rf"layers \['{path}'\] received no stats.*pass layers=\[\.\.\.\] without these paths"
    with pytest.raises(ValueError, match=match):
        tx.update(grads, state, params, stats=stats)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(grads, state, params, stats)

    # The same layers=[...] for both: the odd kernel falls back to the identity.
    layers = ["head"]
    kernel = "kernel" if odd == "custom" else "DenseGeneral_0/kernel"
    rows = {r.split()[0]: r for r in ek.summarize(params, layers).splitlines()[1:]}
    assert "identity" in rows[kernel] and "kronecker block 7x4 of head" in rows["head/kernel"]
    tx = ek.ekfac(0.1, damping=1e-2, layers=layers)
    grad_fn = ek.value_grad_and_stats(loss_fn, layers=layers)

    @jax.jit
    def step(params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        return grads, *tx.update(grads, state, params, stats=stats)

    grads, updates, state = step(params, tx.init(params), x, y)
    assert list(state[0].blocks) == ["head"] and int(state[0].count) == 1
    odd_grads, odd_updates = (grads, updates) if odd == "custom" else (grads[path], updates[path])
    np.testing.assert_array_equal(odd_updates["kernel"], -0.1 * np.asarray(odd_grads["kernel"]))
    assert not np.allclose(updates["head"]["kernel"], -0.1 * grads["head"]["kernel"])


def test_uncaptured_kernel_with_bias_of_another_shape():
    """nn.DenseGeneral with 2 output axes and a bias is no block: identity, listed as such."""
    params = init_params(OddModel("DenseGeneral+bias"), data()[0])
    assert list(ek.ekfac(0.1).init(params)[0].blocks) == ["head"]
    rows = {row.split()[0]: row for row in ek.summarize(params).splitlines()[1:]}
    assert "identity" in rows["DenseGeneral_0/kernel"]
    assert "kronecker block" in rows["head/kernel"]
    # Named explicitly, it is an error that names the layer and the way out.
    with pytest.raises(
        ValueError,
        match=r"'DenseGeneral_0' has a bias of shape \(2, 3\), expected \(3,\).*remove it",
    ):
        ek.ekfac(0.1, layers=["DenseGeneral_0", "head"]).init(params)


@pytest.mark.parametrize(
    "layers, match",
    [
        (["head", "LayerNorm_0"], r"'LayerNorm_0' holds no kernel parameter.*\['bias', 'scale'\]"),
        (["head", "nope"], r"'nope' holds no kernel parameter.*found None"),
    ],
    ids=["LayerNorm_0", "nope"],
)
def test_layers_naming_a_path_without_kernel(layers, match):
    params = init_params(OddModel(), data()[0])
    with pytest.raises(ValueError, match=match):
        ek.ekfac(0.1, layers=layers).init(params)
    with pytest.raises(ValueError, match=match):
        jax.jit(ek.ekfac(0.1, layers=layers).init)(params)
    with pytest.raises(ValueError, match=match):
        ek.summarize(params, layers)


# ----------------------------------------------------------------------------------------------
# A state from another model (checkpoint mismatch)


def test_state_of_a_model_with_other_widths():
    state = TX.init(init_params(MLP((7, 4)), data()[0]))
    assert_rejected(
        ValueError,
        r"does not match the layers' shapes: \{'Dense_0': 'state \(6, 7\), expected \(6, 6\)'",
        state=state,
        state_is_good=False,
    )


def test_state_of_a_model_with_other_layers():
    state = TX.init(init_params(MLP((6, 5, 4)), data()[0]))
    assert_rejected(
        ValueError,
        r"layers do not match the optimizer state: only in updates \[\], "
        r"only in state \['Dense_2'\]",
        state=state,
        state_is_good=False,
    )
