"""Flax NNX models (issue 15): the same layer-kind table as linen, checked against linen twins.

Each NNX model here has a linen twin with the same parameter tree; both get the same float64
weights. Capture goes through different code (patched NNX methods on a tagged copy of the model
vs. linen's method interceptor), the forward passes are the same arithmetic, so blocks agree
exactly and stats, grads and updates to round-off: measured ``<= 1e-15`` relative to each layer's
norm (``test_transforms.assert_trees_close``); tolerance ``RTOL = 1e-8`` (``test_kinds.py``).
Batches have more examples than any factor's size and no layer has repeated eigenvalues (a
``ConvTranspose`` with kernel = stride would: its patches hold each kernel offset equally often, so
that ``A`` has identical diagonal blocks), so that the eigenbases are unique and the
trajectories of 3 steps of ``nnx.Optimizer`` under ``nnx.jit`` stay equal (tolerance ``1e-10``:
round-off growing over 3 preconditioned steps, measured ``<= 1e-13``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    METHODS,
    assert_trees_close,
    classifier_loss,
    init_params,
    normal_batch,
    stepper,
    train_step,
    transforms,
)

import ekfac_optax as ek

F64 = dict(param_dtype=jnp.float64)
TRAJECTORY = 1e-10  # see the module docstring


# --- Twins ----------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="norm")(jnp.tanh(nn.Dense(8, name="hidden")(x)))
        return nn.Dense(3, name="head")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs, **F64)
        self.norm = nnx.LayerNorm(8, rngs=rngs, **F64)
        self.head = nnx.Linear(8, 3, rngs=rngs, **F64)

    def __call__(self, x):
        return self.head(self.norm(jnp.tanh(self.hidden(x))))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=2, name="group_norm")(x))
        x = nn.ConvTranspose(4, (3, 3), strides=(2, 2), name="up")(x)
        x = nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(x)
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs, **F64)
        self.group_norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs, **F64)
        self.up = nnx.ConvTranspose(4, 4, (3, 3), strides=(2, 2), rngs=rngs, **F64)
        self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs, **F64)
        self.head = nnx.Linear(4, 3, rngs=rngs, **F64)

    def __call__(self, x):
        x = nnx.relu(self.group_norm(self.conv(x)))
        return self.head(self.depthwise(self.up(x)).mean(axis=(1, 2)))


VOCAB, WIDTH, HEADS = 7, 8, 2


def attention(q, k, v):
    """The same attention for both twins (``(N, T, heads, head dim)``)."""
    return jax.nn.dot_product_attention(q, k, v)


class LinenTransformerBlock(nn.Module):
    """Embed, LayerNorm, attention from ``DenseGeneral`` projections, a Dense MLP. (Flax's two
    stock attention modules differ by ~6e-8 in float64, so the twins share one attention.)"""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, WIDTH, name="embed")(ids)
        h = nn.LayerNorm(name="ln")(x)
        q, k, v = (
            nn.DenseGeneral((HEADS, WIDTH // HEADS), name=name)(h)
            for name in ("query", "key", "value")
        )
        x = x + nn.DenseGeneral(WIDTH, axis=(-2, -1), name="out")(attention(q, k, v))
        x = x + nn.Dense(WIDTH, name="mlp_out")(nn.gelu(nn.Dense(16, name="mlp_in")(x)))
        return nn.Dense(VOCAB, name="head")(x)


class NnxTransformerBlock(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs, **F64)
        self.ln = nnx.LayerNorm(WIDTH, rngs=rngs, **F64)
        for name in ("query", "key", "value"):
            setattr(self, name, nnx.LinearGeneral(WIDTH, (HEADS, WIDTH // HEADS), rngs=rngs, **F64))
        self.out = nnx.LinearGeneral(
            (HEADS, WIDTH // HEADS), WIDTH, axis=(-2, -1), rngs=rngs, **F64
        )
        self.mlp_in = nnx.Linear(WIDTH, 16, rngs=rngs, **F64)
        self.mlp_out = nnx.Linear(16, WIDTH, rngs=rngs, **F64)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs, **F64)

    def __call__(self, ids):
        x = self.embed(ids)
        h = self.ln(x)
        x = x + self.out(attention(self.query(h), self.key(h), self.value(h)))
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(x)))
        return self.head(x)


class LinenTied(nn.Module):
    """A tied embedding: ``Embed`` as the input layer and, through ``attend``, the output one;
    an ``Einsum`` between them."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(VOCAB, WIDTH, name="embed")
        mix = nn.Einsum((WIDTH, WIDTH), "btd,df->btf", name="mix")
        return embed.attend(jnp.tanh(mix(embed(ids))))


class NnxTied(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs, **F64)
        self.mix = nnx.Einsum("btd,df->btf", (WIDTH, WIDTH), (WIDTH,), rngs=rngs, **F64)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.mix(self.embed(ids))))


def twins(name: str):
    """``(linen model, nnx model with the linen weights, linen params, batch)``."""
    rng = np.random.default_rng(5)
    if name == "mlp":
        linen, model, batch = LinenMLP(), NnxMLP(nnx.Rngs(0)), normal_batch(0, (32, 4), (32,))
    elif name == "cnn":
        linen, model = LinenCNN(), NnxCNN(nnx.Rngs(0))
        batch = normal_batch(1, (24, 5, 5, 1), (24,))
    else:
        linen, model = LinenTransformerBlock(), NnxTransformerBlock(nnx.Rngs(0))
        if name == "tied":
            linen, model = LinenTied(), NnxTied(nnx.Rngs(0))
        ids = jnp.asarray(rng.integers(0, VOCAB, (8, 6)), jnp.int32)
        batch = (ids, jnp.asarray(rng.integers(0, VOCAB, (8, 6)), jnp.int32))
    params = init_params(linen, batch[0], dtype=jnp.float64)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return linen, model, params, batch


def nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "tied",
        pytest.param("cnn", marks=pytest.mark.slow),
        pytest.param("transformer", marks=pytest.mark.slow),
    ],
)
def test_nnx_twin_gives_the_linen_updates(name):
    """Blocks, stats, grads and the updates of EKFAC, EKFAC-ra and KFAC of an NNX model equal
    those of its linen twin; ``summarize`` takes the NNX model and shows the same table."""
    linen, model, params, batch = twins(name)
    linen_loss = classifier_loss(linen)
    blocks = ek.find_blocks(linen_loss, params, *batch)
    assert ek.find_blocks(nnx_loss, model, *batch) == blocks
    assert ek.summarize(model, blocks) == ek.summarize(params, blocks)
    assert ek.summarize(nnx.state(model, nnx.Param), blocks) == ek.summarize(params, blocks)
    assert "identity" not in ek.summarize(model, blocks)

    # Both eagerly: jitted and eager float64 differ by up to ~1e-8 here (XLA's fusions).
    txs = transforms(blocks)
    _, expected_grads, expected_stats = ek.value_grad_and_stats(linen_loss)(params, *batch)
    _, grads, stats = ek.value_grad_and_stats(nnx_loss)(model, *batch)
    assert isinstance(grads, nnx.State)
    grads = nnx.to_pure_dict(grads)
    assert_trees_close((grads, stats), (expected_grads, expected_stats), name)
    for method, tx in txs.items():
        update, _ = tx.update(grads, tx.init(params), params, stats=stats)
        expected, _ = tx.update(expected_grads, tx.init(params), params, stats=expected_stats)
        assert_trees_close(update, expected, (name, method))


@pytest.mark.parametrize("name", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_nnx_optimizer_trains_like_linen(name):
    """3 steps of ``nnx.Optimizer(model, ek.ekfac(...), wrt=nnx.Param)`` under ``nnx.jit``,
    ``optimizer.update(model, grads, stats=stats)``, follow the linen twin's trajectory."""
    linen, model, params, batch = twins(name)
    linen_loss = classifier_loss(linen)
    blocks = ek.find_blocks(nnx_loss, model, *batch)
    optimizer = nnx.Optimizer(model, ek.ekfac(0.1, blocks=blocks), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads, stats = ek.value_grad_and_stats(nnx_loss)(model, x, y)
        optimizer.update(model, grads, stats=stats)
        return loss

    tx = ek.ekfac(0.1, blocks=blocks)
    linen_step = train_step(linen_loss, tx)
    state = tx.init(params)
    for _ in range(3):
        loss = nnx_step(model, optimizer, *batch)
        params, state, expected_loss = linen_step(params, state, *batch)
        np.testing.assert_allclose(loss, expected_loss, rtol=TRAJECTORY)
    assert_trees_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params, name, TRAJECTORY)


@pytest.mark.parametrize("name", ["mlp", pytest.param("transformer", marks=pytest.mark.slow)])
def test_nnx_state_without_optimizer_trains_like_linen(name):
    """The functional NNX style without ``nnx.Optimizer``: ``nnx.split`` the model, ``tx.init``
    and ``tx.update`` on the ``nnx.State`` of its ``nnx.Param`` variables inside ``jax.jit``,
    ``optax.apply_updates``; the updates keep the state's structure (variables) and 3 steps
    follow the linen twin's trajectory."""
    linen, model, params, batch = twins(name)
    linen_loss = classifier_loss(linen)
    blocks = ek.find_blocks(nnx_loss, model, *batch)
    tx = ek.ekfac(0.1, blocks=blocks)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(state)

    @jax.jit
    def nnx_step(state, opt_state, x, y):
        loss, grads, stats = ek.value_grad_and_stats(nnx_loss)(
            nnx.merge(graphdef, state, rest), x, y
        )
        updates, opt_state = tx.update(grads, opt_state, state, stats=stats)
        assert jax.tree.structure(updates) == jax.tree.structure(state)
        return optax.apply_updates(state, updates), opt_state, loss

    linen_step = train_step(linen_loss, tx)
    linen_state = tx.init(params)
    for _ in range(3):
        state, opt_state, loss = nnx_step(state, opt_state, *batch)
        params, linen_state, expected_loss = linen_step(params, linen_state, *batch)
        np.testing.assert_allclose(loss, expected_loss, rtol=TRAJECTORY)
    assert isinstance(state, nnx.State)
    assert_trees_close(nnx.to_pure_dict(state), params, name, TRAJECTORY)
    assert_trees_close(opt_state, linen_state, name, TRAJECTORY)


def test_nnx_bridge_to_nnx_raises_and_the_linen_module_trains():
    """A linen model wrapped in ``nnx.bridge.ToNNX`` runs its layers inside linen's ``apply``,
    out of the NNX capture's reach: ``find_blocks`` and ``value_grad_and_stats`` raise a
    TypeError naming the wrapper and the way out, which works: the same linen module captured
    with the wrapper's parameters gives every layer its block."""
    x, y = normal_batch(2, (32, 4), (32,))
    model = nnx.bridge.ToNNX(LinenMLP(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x)
    for capture in (ek.find_blocks, lambda f, *a: ek.value_grad_and_stats(f)(*a)):
        with pytest.raises(TypeError, match=r"nnx\.bridge\.ToNNX module as the model"):
            capture(nnx_loss, model, x, y)

    class Wrapped(nnx.Module):  # the wrapper below the root: the error names its path
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            return self.inner(x)

    with pytest.raises(TypeError, match="ToNNX module at 'inner'"):
        ek.find_blocks(nnx_loss, Wrapped(model), x, y)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    loss_fn = classifier_loss(model.to_nnx__module)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    assert set(blocks) == {"hidden", "norm", "head"}
    tx = ek.ekfac(0.1, blocks=blocks)
    new_params, state, loss = train_step(loss_fn, tx)(params, tx.init(params), x, y)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert np.isfinite(float(loss)) and int(state[0].skipped) == 0


# --- NNX transforms -------------------------------------------------------------------------------


class NnxLayer(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(6, rngs=rngs, **F64)
        self.dense = nnx.Linear(6, 6, rngs=rngs, **F64)

    def __call__(self, x):
        return x + jnp.tanh(self.dense(self.norm(x)))


class NnxScanned(nnx.Module):
    """3 layers created by ``nnx.vmap`` (stacked params) and applied by ``nnx.scan``, optionally
    under ``nnx.remat``: the NNX idiom for deep stacks."""

    def __init__(self, rngs, remat=False):
        self.embed = nnx.Linear(6, 6, rngs=rngs, **F64)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxLayer(rngs)

        self.stack = make(rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs, **F64)
        self.remat = remat

    def __call__(self, x):
        def layer(x, layer):
            return layer(x)

        layer = nnx.remat(layer) if self.remat else layer
        body = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return self.head(body(self.embed(x), self.stack))


class LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + jnp.tanh(nn.Dense(6, name="dense")(nn.LayerNorm(name="norm")(x))), None


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="embed")(x)
        stack = nn.scan(
            LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = stack(name="stack")(x, None)
        return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize(
    "remat", [pytest.param(False, marks=pytest.mark.slow), True], ids=["scan", "scan_remat"]
)
def test_nnx_scan_over_layers_equals_linen_scan(remat):
    """``nnx.vmap``-created, ``nnx.scan``-applied layers (with ``nnx.remat``) are stacked blocks
    (``lifted == (3,)``), and their stats and updates equal the linen ``nn.scan`` twin's, under
    ``nnx.jit``."""
    x, y = normal_batch(7, (32, 6), (32,))
    linen = LinenScanned()
    params = init_params(linen, x, dtype=jnp.float64)
    model = NnxScanned(nnx.Rngs(0), remat=remat)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    blocks = ek.find_blocks(nnx_loss, model, x, y)
    assert blocks == ek.find_blocks(classifier_loss(linen), params, x, y)
    assert blocks["stack/dense"].lifted == (3,) and blocks["stack/norm"].lifted == (3,)
    txs = transforms(blocks)
    expected, _, expected_grads, expected_stats = stepper(classifier_loss(linen), txs)(
        params, None, x, y
    )
    _, grads, stats = nnx.jit(ek.value_grad_and_stats(nnx_loss))(model, x, y)
    grads = nnx.to_pure_dict(grads)
    assert_trees_close((grads, stats), (expected_grads, expected_stats), remat)
    for method in METHODS:
        update, _ = txs[method].update(grads, txs[method].init(params), params, stats=stats)
        assert_trees_close(update, expected[method], (remat, method))


class NnxBatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 6, rngs=rngs, **F64)
        self.bn = nnx.BatchNorm(6, rngs=rngs, **F64)
        self.head = nnx.Linear(6, 3, rngs=rngs, **F64)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.dense(x))))


def test_nnx_batch_norm_statistics_are_updated_once():
    """Like ``nnx.value_and_grad``, capture writes the state the loss changed (BatchNorm's
    running statistics) back to the model, once per call (not by the abstract pass or the
    normalised-input computation); the params stay unchanged."""
    x, y = normal_batch(8, (32, 4), (32,))
    model = NnxBatchNormNet(nnx.Rngs(0))
    reference = nnx.clone(model)
    _, expected_grads = nnx.value_and_grad(nnx_loss)(reference, x, y)
    _, grads, stats = ek.value_grad_and_stats(nnx_loss)(model, x, y)
    assert_trees_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(expected_grads), "grads")
    assert_trees_close(
        nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(reference)), "state"
    )
    assert set(stats) == {"dense", "bn", "head"}


def test_nnx_model_without_layers_of_the_table_raises():
    """An NNX model whose loss calls none of its table layers (here: a layer created inside the
    loss) raises a ValueError naming the cause, never empty stats."""
    model = NnxMLP(nnx.Rngs(0))

    def loss_fn(model, x, y):
        other = NnxMLP(nnx.Rngs(1))
        return nnx_loss(other, x, y) + 0.0 * model.head.bias[...].sum()

    x, y = normal_batch(9, (8, 4), (8,))
    with pytest.raises(ValueError, match="called no NNX layer"):
        ek.value_grad_and_stats(loss_fn)(model, x, y)


class NnxStockTransformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        h = self.ln(x)
        return self.head(x + self.attention(h, mask=nnx.make_causal_mask(ids)))


def test_nnx_multi_head_attention_is_covered_and_trains():
    """``nnx.MultiHeadAttention`` (float32, causal mask): every projection is a block, nothing
    gets the identity, and 5 steps of ``nnx.Optimizer`` under ``nnx.jit`` lower the loss."""
    model = NnxStockTransformer(nnx.Rngs(0))
    rng = np.random.default_rng(6)
    ids = jnp.asarray(rng.integers(0, VOCAB, (16, 6)), jnp.int32)
    targets = jnp.roll(ids, -1, axis=1)
    blocks = ek.find_blocks(nnx_loss, model, ids, targets)
    kinds = {path: spec.kind for path, spec in blocks.items()}
    assert kinds == {
        "attention/query": "dense_general",
        "attention/key": "dense_general",
        "attention/value": "dense_general",
        "attention/out": "dense_general",
        "embed": "embed",
        "ln": "scale_and_shift",
        "head": "dense",
    }, kinds
    assert "identity" not in ek.summarize(model, blocks)
    optimizer = nnx.Optimizer(model, ek.ekfac(0.03, blocks=blocks), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, ids, targets):
        loss, grads, stats = ek.value_grad_and_stats(nnx_loss)(model, ids, targets)
        optimizer.update(model, grads, stats=stats)
        return loss

    losses = [float(step(model, optimizer, ids, targets)) for _ in range(5)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_nnx_fit_curvature_and_influence_equal_the_linen_twins():
    """``ek.fit_curvature``, ``ek.per_example_grads`` and ``ek.influence`` take the NNX model in
    place of the params and give its linen twin's numbers (vectors as ``nnx.State``)."""
    linen, model, params, batch = twins("mlp")
    linen_loss = classifier_loss(linen)
    blocks = ek.find_blocks(linen_loss, params, *batch)
    batches = [tuple(a[:20] for a in batch), tuple(a[20:] for a in batch)]
    expected = ek.fit_curvature(linen_loss, params, batches, blocks)
    op = ek.fit_curvature(nnx_loss, model, batches, blocks)
    np.testing.assert_allclose(op.trace(), expected.trace(), rtol=1e-10)
    grads = ek.per_example_grads(nnx_loss, model, *batch)
    linen_grads = ek.per_example_grads(linen_loss, params, *batch)
    scores = ek.influence(op, grads, grads, 1e-3)
    np.testing.assert_allclose(
        scores, ek.influence(expected, linen_grads, linen_grads, 1e-3), rtol=1e-8
    )


def test_nnx_true_fisher_statistics_equal_the_linen_twins():
    """``value_grad_and_stats(loss, fisher=TrueFisher(...))`` on the NNX model: its loss and
    ``nnx.Param`` gradients, and the statistics of the labels drawn with the same key as its
    linen twin's."""
    linen, model, params, batch = twins("mlp")
    key = jax.random.key(7)
    fisher = ek.TrueFisher(lambda m, x, y: m(x))
    value, grads, stats = ek.value_grad_and_stats(nnx_loss, fisher=fisher)(
        model, *batch, fisher_key=key
    )
    assert isinstance(grads, nnx.State)
    linen_fisher = ek.TrueFisher(lambda p, x, y: linen.apply({"params": p}, x))
    expected = ek.value_grad_and_stats(classifier_loss(linen), fisher=linen_fisher)(
        params, *batch, fisher_key=key
    )
    assert_trees_close((value, nnx.to_pure_dict(grads), stats), expected, "true Fisher")
