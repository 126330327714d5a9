"""Bad inputs raise a clear ValueError/TypeError at trace time, eagerly and under jax.jit, naming
the layer and expected vs actual shapes, and leave the optimizer state untouched (a good update
with the same state works afterwards)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import MLP, classifier_loss, init_params

import ekfac_optax as ek

N = 32


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, 5)), rng.integers(0, 4, N)


def blocks_of(model, params=None):
    """``ek.find_blocks`` of ``classifier_loss(model)`` on a batch of ``data()``'s shapes."""
    x, y = data()
    params = init_params(model, x, dtype=jnp.float64) if params is None else params
    return ek.find_blocks(classifier_loss(model), params, x, y)


MODEL = MLP((6, 4))
BLOCKS = blocks_of(MODEL)
TX = ek.ekfac(0.1, blocks=BLOCKS, damping=1e-2, basis_update_every=2)


@functools.cache
def setup():
    """params, grads, stats of ``MODEL`` and a jitted good update of ``TX``."""
    x, y = data()
    params = init_params(MODEL, x, dtype=jnp.float64)
    _, grads, stats = jax.jit(ek.value_grad_and_stats(classifier_loss(MODEL)))(params, x, y)
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
    tx = TX if name == "ekfac" else optax.chain(getattr(ek, name)(blocks=BLOCKS))

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


MISSING = r"received no stats.*ek\.value_grad_and_stats\(loss_fn, layers=blocks\)"


def test_missing_layer_in_stats():
    stats = dict(setup()[2])
    del stats["Dense_1"]
    assert_rejected(ValueError, r"layers \['Dense_1'\] " + MISSING, stats=stats)


def test_stats_captured_for_fewer_layers_than_the_blocks():
    """value_grad_and_stats(layers=[...]) restricted to a subset while the optimizer has every
    block: the layers without stats are named, with the way out."""
    x, y = data()
    stats = jax.jit(ek.value_grad_and_stats(classifier_loss(MODEL), layers=["Dense_1"]))(
        setup()[0], x, y
    )[2]
    assert list(stats) == ["Dense_1"]
    assert_rejected(ValueError, r"layers \['Dense_0'\] " + MISSING, stats=stats)


def test_extra_layer_in_stats():
    stats = dict(setup()[2])
    stats["Dense_9"] = stats["Dense_0"]
    assert_rejected(
        ValueError,
        r"stats has layers \['Dense_9'\] that are not blocks of this optimizer.*"
        r"\['Dense_0', 'Dense_1'\].*layers=blocks",
        stats=stats,
    )


def test_stats_of_every_block_for_an_optimizer_of_a_subset():
    """The optimizer has a sub-dict of the blocks but the stats cover every block (layers= was
    not passed to value_grad_and_stats): a ValueError names the extra layer."""
    params, grads, stats, _ = setup()
    tx = ek.ekfac(0.1, blocks={"Dense_1": BLOCKS["Dense_1"]}, damping=1e-2)
    match = r"stats has layers \['Dense_0'\] that are not blocks of this optimizer"
    state = tx.init(params)
    with pytest.raises(ValueError, match=match):
        tx.update(grads, state, params, stats=stats)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(grads, state, params, stats)


def _pad(x, axis):
    """``x`` with one more zero entry along ``axis``."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, 1)
    return jnp.pad(x, widths)


# The blocks as the messages name them.
DENSE_0 = r"kronecker block 6x6 of Dense_0 \[dense\]"
DENSE_1 = r"kronecker block 7x4 of Dense_1 \[dense\]"
N_T = r"\('?N'?, '?T'?, "  # "(N, T, " with or without quotes
SHAPE_ERRORS = {
    # name: (layer, change of its LayerStats, message)
    "wrong d_in": (
        "Dense_1",
        lambda s: s._replace(h=_pad(s.h, 2)),
        rf"stats\['Dense_1'\]\.h: expected shape \(32, 1, 6\) for {DENSE_1} and delta of shape "
        r"\(32, 1, 4\), got \(32, 1, 7\)",
    ),
    "wrong d_out": (
        "Dense_1",
        lambda s: s._replace(delta=_pad(s.delta, 2)),
        rf"stats\['Dense_1'\]\.delta: expected shape {N_T}4\) for {DENSE_1}, got \(32, 1, 5\)",
    ),
    "N of h and delta differ": (
        "Dense_0",
        lambda s: s._replace(delta=s.delta[:-1]),
        rf"stats\['Dense_0'\]\.h: expected shape \(31, 1, 5\) for {DENSE_0} and delta of shape "
        r"\(31, 1, 6\), got \(32, 1, 5\)",
    ),
    "T of h and delta differ": (
        "Dense_0",
        lambda s: s._replace(delta=_pad(s.delta, 1)),
        rf"stats\['Dense_0'\]\.h: expected shape \(32, 2, 5\) for {DENSE_0}.*got \(32, 1, 5\)",
    ),
    "h without the positions axis": (
        "Dense_0",
        lambda s: s._replace(h=s.h[:, 0]),
        rf"stats\['Dense_0'\]\.h: expected shape \(32, 1, 5\) for {DENSE_0}.*got \(32, 5\)",
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
    match = (
        r"updates: layer 'Dense_1' \(dense\) expects a parameter 'bias' of shape \(4,\), "
        r"got \(5,\); build the blocks with ek\.find_blocks"
    )
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
    (dict(damping_mode="levenberg"), r"damping_mode must be .*'tikhonov'.*'factored'.*'levenberg'"),
    (dict(weight_sharing="mean"), r"weight_sharing must be .*'expand'.*'reduce'.*'mean'"),
    (dict(fallback="adam"), r"fallback must be .*'diagonal'.*'identity'.*'adam'"),
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
        make(*args, blocks=BLOCKS, **kwargs)
    params = setup()[0]
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p: make(*args, blocks=BLOCKS, **kwargs).init(p))(params)


BLOCKS_TYPE = r"blocks must be the dict of BlockSpec returned by ek\.find_blocks\(loss_fn, params"


@pytest.mark.parametrize("factory", ["scale_by_ekfac", "ekfac", "scale_by_kfac", "kfac"])
def test_blocks_required_and_typed_layers_gone(factory):
    """``blocks`` is a required keyword: without it, or given as anything but the dict of
    ``ek.BlockSpec`` from ``ek.find_blocks`` (a list of paths, a string, old-style layer names
    mapped to anything), a TypeError says how to build it. ``layers`` is no argument of the
    optimizers any more."""
    make = getattr(ek, factory)
    args = (0.1,) if factory in ("ekfac", "kfac") else ()
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'blocks'"):
        make(*args)
    renamed = {"Dense_9": BLOCKS["Dense_0"]}  # a BlockSpec under another layer's path
    for bad in (["Dense_0", "Dense_1"], "Dense_0", None, {"Dense_0": "dense"}, renamed):
        with pytest.raises(TypeError, match=BLOCKS_TYPE):
            make(*args, blocks=bad)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'layers'"):
        make(*args, blocks=BLOCKS, layers=["Dense_0"])


def test_layers_given_as_a_string():
    params = setup()[0]
    with pytest.raises(TypeError, match=r"sequence of module paths.*got 'Dense_0'"):
        ek.value_grad_and_stats(classifier_loss(MODEL), layers="Dense_0")(params, *data())
    with pytest.raises(TypeError, match=BLOCKS_TYPE):
        ek.scale_by_ekfac(blocks="Dense_0")


# ----------------------------------------------------------------------------------------------
# Parameters of no layer kind: the fallback, never an error; layers=[...] naming no block


class OddModel(nn.Module):
    """An odd layer, then LayerNorm and a Dense named "head".

    ``odd``: "DenseGeneral" (2 output axes, no bias), "DenseGeneral+bias" (its bias of shape
    (2, 3)) or "custom" (a ``kernel`` param of this module itself, whose path is ``""``, used in
    a plain matmul: no layer kind captures it).
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


def odd_problem(odd):
    model = OddModel(odd)
    x, y = data()
    params = init_params(model, x, dtype=jnp.float64)
    return model, params, blocks_of(model, params), x, y


@pytest.mark.parametrize("fallback", ["diagonal", "identity"])
def test_uncaptured_kernel_gets_the_fallback(fallback):
    """A ``self.param`` kernel used in a plain matmul is in no block: the blocks are those of
    the layers around it, value_grad_and_stats captures exactly those (no layers=[...] needed,
    no "received no stats" error), and the kernel gets the fallback: ``g / (N g² + damping)`` on
    the first step (``"diagonal"``, the default) or ``g`` (``"identity"``)."""
    model, params, blocks, x, y = odd_problem("custom")
    assert list(blocks) == ["LayerNorm_0", "head"]
    assert [blocks[p].block for p in blocks] == ["diagonal", "kronecker"]
    rows = {r.split()[0]: r for r in ek.summarize(params, blocks, fallback).splitlines()[1:]}
    assert ("diagonal fallback" if fallback == "diagonal" else "identity") in rows["kernel"]
    assert "kronecker block 7x4 of head" in rows["head/kernel"]
    damping = 1e-2
    tx = ek.ekfac(0.1, blocks=blocks, damping=damping, fallback=fallback)
    grad_fn = ek.value_grad_and_stats(classifier_loss(model))

    @jax.jit
    def step(params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        return grads, stats, *tx.update(grads, state, params, stats=stats)

    state = tx.init(params)
    assert list(state[0].fallback) == ([] if fallback == "identity" else ["kernel"])
    grads, stats, updates, state = step(params, state, x, y)
    assert sorted(stats) == ["LayerNorm_0", "head"]
    assert list(state[0].blocks) == ["LayerNorm_0", "head"] and int(state[0].count) == 1
    g = np.asarray(grads["kernel"])
    if fallback == "identity":
        np.testing.assert_array_equal(updates["kernel"], -0.1 * g)
    else:
        np.testing.assert_allclose(updates["kernel"], -0.1 * g / (N * g**2 + damping), rtol=1e-12)
        np.testing.assert_allclose(state[0].fallback["kernel"], N * g**2, rtol=1e-12)
    assert not np.allclose(updates["head"]["kernel"], -0.1 * grads["head"]["kernel"])


@pytest.mark.parametrize("odd", ["DenseGeneral", "DenseGeneral+bias"])
def test_dense_general_with_two_output_axes_is_a_block(odd):
    """nn.DenseGeneral with 2 output axes (with or without its (2, 3) bias) is a Kronecker block
    (d_out = 6), not a kernel to leave out; one jitted step preconditions it."""
    model, params, blocks, x, y = odd_problem(odd)
    assert list(blocks) == ["DenseGeneral_0", "LayerNorm_0", "head"]
    spec = blocks["DenseGeneral_0"]
    assert (spec.kind, spec.block, spec.stack, spec.d_in, spec.d_out) == (
        "dense_general",
        "kronecker",
        (),
        5,
        6,
    )
    size = "6x6" if "bias" in odd else "5x6"
    rows = {r.split()[0]: r for r in ek.summarize(params, blocks).splitlines()[1:]}
    assert f"kronecker block {size} of DenseGeneral_0" in rows["DenseGeneral_0/kernel"]
    tx = ek.ekfac(0.1, blocks=blocks, damping=1e-2)
    grad_fn = ek.value_grad_and_stats(classifier_loss(model))

    @jax.jit
    def step(params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        return grads, *tx.update(grads, state, params, stats=stats)

    grads, updates, state = step(params, tx.init(params), x, y)
    assert int(state[0].count) == 1 and not state[0].fallback
    assert state[0].blocks["DenseGeneral_0"].scalings.shape == (int(size[0]), 6)
    odd_grads, odd_updates = grads["DenseGeneral_0"], updates["DenseGeneral_0"]
    for name in odd_grads:
        assert odd_updates[name].shape == odd_grads[name].shape
        assert not np.allclose(odd_updates[name], -0.1 * odd_grads[name])


def test_blocks_of_another_model_name_the_layer():
    """Blocks found for one model given with the params of another (here: the DenseGeneral
    without its bias): init and summarize raise a ValueError naming the layer, the expected
    parameter and the way out."""
    blocks = odd_problem("DenseGeneral+bias")[2]
    params = odd_problem("DenseGeneral")[1]
    match = (
        r"layer 'DenseGeneral_0' \(dense_general\) expects a parameter 'bias' of shape \(2, 3\), "
        r"got \['kernel'\]; build the blocks with ek\.find_blocks\(loss_fn, params, \*batch\)"
    )
    tx = ek.ekfac(0.1, blocks=blocks)
    with pytest.raises(ValueError, match=r"init: " + match):
        tx.init(params)
    with pytest.raises(ValueError, match=match):
        jax.jit(tx.init)(params)
    with pytest.raises(ValueError, match=r"summarize: " + match):
        ek.summarize(params, blocks)


@pytest.mark.parametrize("path", ["nope", ""])
def test_layers_naming_a_path_that_is_no_block(path):
    """value_grad_and_stats(layers=[...]) with a path that is no block of the model (a missing
    module; the custom module's own kernel, in no block) raises a ValueError naming it and the
    model's blocks."""
    model, params, _, x, y = odd_problem("custom")
    f = ek.value_grad_and_stats(classifier_loss(model), layers=["head", path])
    match = rf"layers \['{path}'\] are not blocks of this model \(blocks: \['LayerNorm_0', 'head'\]"
    with pytest.raises(ValueError, match=match):
        f(params, x, y)
    with pytest.raises(ValueError, match=match):
        jax.jit(f)(params, x, y)


# ----------------------------------------------------------------------------------------------
# A state from another model (checkpoint mismatch)


def state_of(widths):
    """The initial state of ``TX``'s optimizer built for ``MLP(widths)`` instead."""
    model = MLP(widths)
    params = init_params(model, data()[0], dtype=jnp.float64)
    return ek.ekfac(0.1, blocks=blocks_of(model, params), damping=1e-2).init(params)


def test_state_of_a_model_with_other_widths():
    assert_rejected(
        ValueError,
        r"does not match the layers' shapes: \{'Dense_0': 'state \(6, 7\), expected \(6, 6\)'",
        state=state_of((7, 4)),
        state_is_good=False,
    )


def test_state_of_a_model_with_other_layers():
    assert_rejected(
        ValueError,
        r"state's layers do not match its blocks: only in blocks \[\], "
        r"only in state \['Dense_2'\]",
        state=state_of((6, 5, 4)),
        state_is_good=False,
    )


# --- Errors a user understands (issue 33) --------------------------------------------------------


def aux_loss(params, x, y):
    loss = classifier_loss(MODEL)(params, x, y)
    return loss, {"loss": loss}


def test_loss_with_aux_without_has_aux():
    """A loss returning ``(loss, aux)`` without ``has_aux=True``: a ValueError saying to pass
    it (it was a TracerArrayConversionError from inside the capture), eagerly and under jit;
    ``has_aux=True`` with a single value: a ValueError too."""
    params, *_ = setup()
    x, y = data()
    for fn in (ek.value_grad_and_stats(aux_loss), jax.jit(ek.value_grad_and_stats(aux_loss))):
        with pytest.raises(ValueError, match=r"returned a tuple of 2 items.*has_aux=True"):
            fn(params, x, y)
    single = ek.value_grad_and_stats(classifier_loss(MODEL), has_aux=True)
    with pytest.raises(ValueError, match=r"must return a pair \(loss, aux\); got a single value"):
        single(params, x, y)
    (loss, aux), _, _ = ek.value_grad_and_stats(aux_loss, has_aux=True)(params, x, y)
    assert float(loss) == float(aux["loss"])


def test_misspelled_stats_keyword_is_named():
    """``update(..., stat=stats)``: a TypeError naming ``stat`` (optax.chain forwards any
    keyword, so the preconditioner sees it), also through a chain, state untouched."""
    params, grads, stats, _ = setup()
    state = TX.init(params)
    with pytest.raises(TypeError, match=r"keyword argument\(s\) \['stat'\] and no stats="):
        TX.update(grads, state, params, stat=stats)
    chained = optax.chain(optax.clip_by_global_norm(1.0), TX)
    with pytest.raises(TypeError, match=r"\['stat'\]"):
        jax.jit(lambda g, s, p, st: chained.update(g, s, p, stat=st))(
            grads, chained.init(params), params, stats
        )


def test_summarize_with_swapped_arguments():
    """``summarize(blocks, params)`` / ``summary`` / ``block_labels``: a TypeError saying the
    arguments are swapped (it was an AttributeError from inside ``_blocks``); a blocks argument
    of another type: a TypeError naming ``blocks``."""
    params, *_ = setup()
    for fn in (ek.summarize, ek.summary, ek.block_labels):
        name = fn.__name__
        with pytest.raises(TypeError, match=rf"{name}: params is a dict of BlockSpec.*swapped"):
            fn(BLOCKS, params)
        with pytest.raises(TypeError, match=rf"{name}: {BLOCKS_TYPE}"):
            fn(params, ["Dense_0"])
    assert "Dense_0" in ek.summarize(params, BLOCKS)


def test_non_finite_params_at_init():
    """Params holding NaN or inf: ``init`` raises a ValueError naming them (values known); under
    ``jax.jit`` the values are not known and ``init`` passes (documented)."""
    params, *_ = setup()
    bad = jax.tree.map(lambda x: x, params)
    bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)
    bad["Dense_1"]["bias"] = bad["Dense_1"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"init: the params hold NaN or infinite values in 2 "):
        TX.init(bad)
    with pytest.raises(ValueError, match=r"\['Dense_0/kernel', 'Dense_1/bias'\]"):
        ek.kfe_adam(1e-3, blocks=BLOCKS).init(bad)
    jax.jit(TX.init)(bad)  # traced: not checked
    TX.init(params)


def test_check_loss():
    """``ek.check_loss``: a mean loss passes; a sum over the batch, non-finite params, a pair
    without ``has_aux`` and a non-finite loss raise, each saying what it found."""
    params, *_ = setup()
    x, y = data()
    mean_loss = classifier_loss(MODEL)
    ek.check_loss(mean_loss, params, x, y)
    ek.check_loss(aux_loss, params, x, y, has_aux=True)
    ek.check_loss(mean_loss, params, x[:7], y[:7])  # odd N: halves of 3 and 4, weighted

    def sum_loss(params, x, y):
        return mean_loss(params, x, y) * x.shape[0]

    with pytest.raises(ValueError, match=r"looks like a sum over the batch, not a mean"):
        ek.check_loss(sum_loss, params, x, y)
    with pytest.raises(ValueError, match=r"has_aux=True"):
        ek.check_loss(aux_loss, params, x, y)
    nan = jax.tree.map(lambda a: a * jnp.nan, params)
    with pytest.raises(ValueError, match=r"check_loss: the params hold NaN"):
        ek.check_loss(mean_loss, nan, x, y)
    with pytest.raises(ValueError, match=r"returned nan"):
        ek.check_loss(lambda p, x, y: mean_loss(p, x, y) * jnp.nan, params, x, y)
    with pytest.raises(ValueError, match=r"at least 2 examples"):
        ek.check_loss(mean_loss, params, x[:1], y[:1])
