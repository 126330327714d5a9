"""Capture through the code structure of real training loops (issue 15): Flax lifted transforms
(``nn.scan`` and ``nn.vmap`` over layers, ``nn.remat``, ``nn.jit``) and JAX transforms in the loss
(``jax.checkpoint``, an inner ``jax.jit``, a pre-jitted ``apply``), each against the same model
without the transform; ``jax.vmap`` over examples and a loss without a linen model raise.

Exact equivalences, float64:

- A model scanned (or vmapped) over ``L`` copies of a layer has stacked parameters ``(L, ...)``;
  its update equals, leaf for leaf, the stacked updates of the model with ``L`` explicit layers and
  the same weights (EKFAC, EKFAC-ra, KFAC, 2 steps: the second with moving averages). The two runs
  do the same arithmetic (the stacked one through ``vmap``): measured ``0`` to ``4e-16`` relative
  to each layer's norm; tolerance ``1e-8`` (``helpers.assert_trees_close``).
- With ``nn.remat`` / ``jax.checkpoint`` / ``jax.jit`` the forward pass is the same computation
  (recomputed, or compiled separately), so the stats, grads and updates agree to round-off:
  measured ``<= 5e-16``; tolerance ``1e-12``.

Not vacuous: the updates differ from the gradients by more than ``1e-2`` (asserted), and a
scanned layer's ``L`` blocks have different factors (asserted), so one block shared by the ``L``
layers (or the layer axis folded into the fan-in) would fail.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import (
    METHODS,
    assert_trees_close,
    classifier_loss,
    init_params,
    normal_batch,
    stepper,
    transforms,
)

import ekfac_optax as ek

WIDTH, LAYERS = 6, 3
ROUND_OFF = 1e-12  # the same computation, recomputed or compiled apart; see the docstring
STEPS = 2  # the second step uses the moving averages


class Layer(nn.Module):
    """One residual layer of a stack; ``nn.scan`` calls it as ``(carry, x) -> (carry, y)``."""

    use_bias: bool = True
    norm: bool = False
    checkpoint: bool = False  # the dense layer called through jax.checkpoint

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm(name="norm")(x) if self.norm else x
        dense = nn.Dense(WIDTH, use_bias=self.use_bias, name="dense")
        h = jax.checkpoint(lambda h: dense(h))(h) if self.checkpoint else dense(h)
        return x + jnp.tanh(h), None


class ScannedNet(nn.Module):
    """``nn.scan`` over ``Layer``; ``wrap`` adds ``nn.remat`` around the body (``"scan_remat"``)
    or the scan (``"remat_scan"``), or ``jax.checkpoint`` inside the body (``"checkpoint"``)."""

    use_bias: bool = True
    norm: bool = False
    wrap: str = "none"

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="embed")(x)
        stack = nn.scan(
            nn.remat(Layer) if self.wrap == "scan_remat" else Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        stack = nn.remat(stack) if self.wrap == "remat_scan" else stack
        layer = stack(self.use_bias, self.norm, self.wrap == "checkpoint", name="stack")
        x, _ = layer(x, None)
        return nn.Dense(3, name="head")(x)


class UnrolledNet(nn.Module):
    use_bias: bool = True
    norm: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="embed")(x)
        for i in range(LAYERS):
            x, _ = Layer(self.use_bias, self.norm, name=f"layer_{i}")(x)
        return nn.Dense(3, name="head")(x)


def unroll(tree, stacked: str, prefix: str, layers: int = LAYERS) -> dict:
    """A params-like tree with the stacked subtree ``stacked`` as ``layers`` subtrees."""
    out = {k: v for k, v in tree.items() if k != stacked}
    for i in range(layers):
        out[f"{prefix}{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], tree[stacked])
    return out


def run(loss_fn, params, batches, **kwargs):
    """Updates of each step of the three methods (``transforms``, moving averages on)."""
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    txs = transforms(blocks, ekfac_decay=0.5, kfac_decay=0.5, **kwargs)
    step = stepper(loss_fn, txs)  # one compilation: the states exist from the start
    states, out = {key: tx.init(params) for key, tx in txs.items()}, []
    for batch in batches:
        updates, states, grads, stats = step(params, states, *batch)
        out.append((updates, grads, stats))
        params = jax.tree.map(lambda p, u: p + u, params, updates["ekfac"])
    return blocks, out, states


# --- nn.scan over layers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use_bias, norm, wrap",
    [
        (True, True, "none"),
        pytest.param(False, False, "none", marks=pytest.mark.slow),
        (True, True, "scan_remat"),
        pytest.param(True, False, "remat_scan", marks=pytest.mark.slow),
        pytest.param(True, True, "checkpoint", marks=pytest.mark.slow),
    ],
    ids=["bias_norm", "no_bias", "scan_of_remat", "remat_of_scan", "checkpoint_in_body"],
)
def test_scan_over_layers_equals_unrolled(use_bias, norm, wrap):
    """``nn.scan`` over 3 layers = 3 explicit layers with the same weights: the blocks are a
    stack of 3 (``lifted == (3,)``, never the layer axis folded into the fan-in), and every
    update of 2 steps of EKFAC, EKFAC-ra and KFAC is equal leaf for leaf (stacked). With
    ``nn.remat`` around the scanned layer or the scan, or ``jax.checkpoint`` in its body, too:
    the layer is seen once per position (Flax's discarded constancy trace of the body is not
    a call, even when a remat inside it traces the layer again), so ``h`` and ``delta`` are
    the unrolled model's."""
    x, y = normal_batch(0, (9, 5), (9,))
    batches = [(x, y), normal_batch(1, (9, 5), (9,)), normal_batch(2, (9, 5), (9,))]
    scanned, unrolled = ScannedNet(use_bias, norm, wrap), UnrolledNet(use_bias, norm)
    params = init_params(scanned, x, dtype=jnp.float64)
    blocks, scanned_out, states = run(classifier_loss(scanned), params, batches)
    _, unrolled_out, _ = run(classifier_loss(unrolled), unroll(params, "stack", "layer_"), batches)
    for step in range(STEPS):  # the stats themselves, position for position
        stats, unrolled_stats = scanned_out[step][2], unrolled_out[step][2]
        for path in blocks:
            layers = [path.replace("stack/", f"layer_{i}/") for i in range(LAYERS)]
            expected = (
                jax.tree.map(lambda *s: jnp.stack(s), *[unrolled_stats[p] for p in layers])
                if path.startswith("stack/")
                else unrolled_stats[path]
            )
            assert jax.tree.map(jnp.shape, stats[path]) == jax.tree.map(jnp.shape, expected)
            assert_trees_close(stats[path], expected, (path, step))
    spec = blocks["stack/dense"]
    assert (spec.lifted, spec.stack) == ((LAYERS,), (LAYERS,)), spec
    assert (spec.d_in_aug, spec.d_out) == (WIDTH + use_bias, WIDTH), spec
    if norm:
        assert blocks["stack/norm"].stack == (LAYERS,), blocks["stack/norm"]
    assert "lifted 3" in ek.summarize(params, blocks)
    for step in range(STEPS):
        for method in METHODS:
            expected = unrolled_out[step][0][method]
            stacked = {
                "stack": jax.tree.map(
                    lambda *leaves: jnp.stack(leaves),
                    *[expected[f"layer_{i}"] for i in range(LAYERS)],
                ),
                **{k: v for k, v in expected.items() if not k.startswith("layer_")},
            }
            assert_trees_close(scanned_out[step][0][method], stacked, (method, step))
    updates, grads, _ = scanned_out[0]
    kernel = ("stack", "dense", "kernel")
    g, u = grads, updates["ekfac"]
    for key in kernel:
        g, u = g[key], u[key]
    assert ref.relative_error(u, g) > 1e-2
    factors = np.asarray(states["ekfac"].blocks["stack/dense"].factor_a)
    assert ref.relative_error(factors[0], factors[1]) > 1e-2  # each layer its own block


class Block(nn.Module):
    """A pre-LN transformer block of stock modules."""

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.LayerNorm(name="ln_0")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(h, h)
        h = nn.LayerNorm(name="ln_1")(x)
        return x + nn.Dense(WIDTH, name="mlp_out")(nn.gelu(nn.Dense(8, name="mlp_in")(h))), None


class ScannedTransformer(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(7, WIDTH, name="embed")(ids)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(7, name="head")(x)


class UnrolledTransformer(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(7, WIDTH, name="embed")(ids)
        for i in range(2):
            x, _ = Block(name=f"block_{i}")(x)
        return nn.Dense(7, name="head")(x)


@pytest.mark.slow  # 40 s: compiles a transformer block scanned and unrolled
def test_scanned_transformer_block_equals_unrolled():
    """A scanned stack of 2 pre-LN transformer blocks (LayerNorm, MultiHeadDotProductAttention,
    Dense MLP) = the 2 blocks written out: every q/k/v/out projection, norm and MLP layer is a
    stack of 2 blocks, and the updates of 2 steps of the three methods are equal."""
    rng = np.random.default_rng(3)
    batches = [
        tuple(jnp.asarray(rng.integers(0, 7, (4, 5)), jnp.int32) for _ in range(2))
        for _ in range(STEPS)
    ]
    scanned = ScannedTransformer()
    params = init_params(scanned, batches[0][0], dtype=jnp.float64)
    # Softmax is invariant to a key's bias, so the keys' blocks have directions of (near-)zero
    # curvature; damping 0.1 bounds the amplification of round-off there (1 / damping) that
    # 1e-3 lets reach 1e-1 of the keys' small update.
    blocks, scanned_out, _ = run(classifier_loss(scanned), params, batches, damping=0.1)
    unrolled_params = unroll(params, "blocks", "block_", layers=2)
    _, unrolled_out, _ = run(
        classifier_loss(UnrolledTransformer()), unrolled_params, batches, damping=0.1
    )

    lifted = {p: s.kind for p, s in blocks.items() if s.lifted == (2,)}
    assert lifted == {
        "blocks/attention/query": "dense_general",
        "blocks/attention/key": "dense_general",
        "blocks/attention/value": "dense_general",
        "blocks/attention/out": "dense_general",
        "blocks/ln_0": "scale_and_shift",
        "blocks/ln_1": "scale_and_shift",
        "blocks/mlp_in": "dense",
        "blocks/mlp_out": "dense",
    }, blocks
    assert "identity" not in ek.summarize(params, blocks)
    for step in range(STEPS):
        for method in METHODS:
            expected = unrolled_out[step][0][method]
            stacked = {
                "blocks": jax.tree.map(
                    lambda a, b: jnp.stack([a, b]), expected["block_0"], expected["block_1"]
                ),
                **{k: v for k, v in expected.items() if not k.startswith("block_")},
            }
            assert_trees_close(scanned_out[step][0][method], stacked, (method, step))


class Ensemble(nn.Module):
    """``nn.vmap`` over 3 copies of a Dense layer, on one shared input."""

    @nn.compact
    def __call__(self, x):
        members = nn.vmap(
            nn.Dense,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=3,
        )
        return nn.Dense(3, name="head")(jnp.tanh(members(WIDTH, name="members")(x)).mean(0))


class ExplicitEnsemble(nn.Module):
    @nn.compact
    def __call__(self, x):
        outs = [jnp.tanh(nn.Dense(WIDTH, name=f"member_{i}")(x)) for i in range(3)]
        return nn.Dense(3, name="head")(jnp.stack(outs).mean(0))


def test_vmap_over_layers_equals_explicit_layers():
    """``nn.vmap`` over 3 Dense layers (an ensemble, input shared) = 3 explicit Dense layers."""
    batches = [normal_batch(10 + i, (9, 5), (9,)) for i in range(STEPS)]
    params = init_params(Ensemble(), batches[0][0], dtype=jnp.float64)
    blocks, out, _ = run(classifier_loss(Ensemble()), params, batches)
    explicit = unroll(params, "members", "member_")
    _, expected_out, _ = run(classifier_loss(ExplicitEnsemble()), explicit, batches)
    assert blocks["members"].lifted == (3,)
    for step in range(STEPS):
        for method in METHODS:
            expected = expected_out[step][0][method]
            stacked = {
                "members": jax.tree.map(
                    lambda *leaves: jnp.stack(leaves), *[expected[f"member_{i}"] for i in range(3)]
                ),
                "head": expected["head"],
            }
            assert_trees_close(out[step][0][method], stacked, (method, step))


@pytest.mark.parametrize("cap", [6, 5], ids=["input_side", "both_sides"])
def test_scan_with_capped_factors_equals_unrolled(cap):
    """``max_factor_dim`` on a stacked block: the 3 scanned layers (``7 x 6`` blocks) with the
    input side capped (``cap=6``), or both (``cap=5``), update as the 3 explicit layers with
    the same cap, over 2 steps of every method (moving averages on the second); the stacked
    state holds ``(3, 7)`` diagonals and no basis on a capped side."""
    x, y = normal_batch(0, (9, 5), (9,))
    batches = [(x, y), normal_batch(1, (9, 5), (9,))]
    scanned, unrolled = ScannedNet(True, False), UnrolledNet(True, False)
    params = init_params(scanned, x, dtype=jnp.float64)
    _, scanned_out, states = run(classifier_loss(scanned), params, batches, max_factor_dim=cap)
    _, unrolled_out, _ = run(
        classifier_loss(unrolled), unroll(params, "stack", "layer_"), batches, max_factor_dim=cap
    )
    block = states["ekfac"].blocks["stack/dense"]
    assert block.factor_a.shape == (LAYERS, WIDTH + 1) and block.basis_a is None
    assert (block.basis_b is None) == (cap < WIDTH)
    for step in range(2):
        for method in METHODS:
            expected = unrolled_out[step][0][method]
            stacked = {
                "stack": jax.tree.map(
                    lambda *leaves: jnp.stack(leaves),
                    *[expected[f"layer_{i}"] for i in range(LAYERS)],
                ),
                **{k: v for k, v in expected.items() if not k.startswith("layer_")},
            }
            assert_trees_close(scanned_out[step][0][method], stacked, (cap, method, step))


# --- remat, checkpoint, jit: the same model ------------------------------------------------------


class Net(nn.Module):
    """A norm + Dense block and a Dense head; ``wrap`` lifts both modules (nn.remat, nn.jit)."""

    wrap: str = "none"

    @nn.compact
    def __call__(self, x):
        lift = {"none": lambda cls: cls, "remat": nn.remat, "jit": nn.jit}[self.wrap]
        x, _ = lift(Layer)(norm=True, name="block")(x)
        return lift(nn.Dense)(3, name="head")(x)


def loss_with(structure: str):
    """The loss of ``Net`` with ``structure`` around (or inside) the model's application."""
    plain = Net()
    apply = {
        "plain": plain.apply,
        "nn.remat": Net("remat").apply,
        "nn.jit": Net("jit").apply,
        "jax.checkpoint(apply)": jax.checkpoint(plain.apply),
        "jax.jit(apply)": jax.jit(plain.apply),
    }

    if structure == "jax.checkpoint(closure)":

        def loss_fn(params, x, y):
            logits = jax.checkpoint(lambda x: plain.apply({"params": params}, x))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return loss_fn

    def loss_fn(params, x, y):
        logits = apply[structure]({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


STRUCTURES = [
    "nn.remat",
    "nn.jit",
    "jax.checkpoint(apply)",
    "jax.checkpoint(closure)",
    "jax.jit(apply)",
]


@functools.cache
def plain_run():
    """``(params, batches, blocks, [(updates, grads, stats)] per step)`` of the plain ``Net``."""
    batches = [normal_batch(20 + i, (7, WIDTH), (7,)) for i in range(STEPS)]
    params = init_params(Net(), batches[0][0], dtype=jnp.float64)
    blocks, out, _ = run(loss_with("plain"), params, batches)
    return params, batches, blocks, out


@pytest.mark.parametrize("structure", STRUCTURES)
def test_transform_in_the_loss_changes_nothing(structure):
    """Stats, grads and updates of 2 steps (jitted) equal those of the plain model."""
    params, batches, blocks, expected = plain_run()
    actual_blocks, actual, _ = run(loss_with(structure), params, batches)
    assert actual_blocks == blocks and set(blocks) == {"block/norm", "block/dense", "head"}
    for step in range(STEPS):
        assert_trees_close(actual[step], expected[step], (structure, step), rtol=ROUND_OFF)


@pytest.mark.parametrize("jit_outer", [False, True], ids=["eager", "jit"])
def test_pre_jitted_apply_with_a_warm_cache(jit_outer):
    """A pre-jitted ``apply_fn`` already called on these shapes (its cache holds a trace that ran
    no interceptor): capture still sees every layer, eagerly and under jit, every time."""
    model = Net()
    x, y = normal_batch(30, (7, WIDTH), (7,))
    params = init_params(model, x, dtype=jnp.float64)
    apply_fn = jax.jit(model.apply)
    apply_fn({"params": params}, x)  # warm the cache

    def loss_fn(params, x, y):
        logits = apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    f = ek.value_grad_and_stats(loss_fn)
    f = jax.jit(f) if jit_outer else f
    _, expected_grads, expected_stats = ek.value_grad_and_stats(loss_with("plain"))(params, x, y)
    for _ in range(2):
        _, grads, stats = f(params, x, y)
        assert_trees_close(
            (grads, stats), (expected_grads, expected_stats), "pre-jitted", ROUND_OFF
        )


# --- What capture cannot see raises, at trace time -----------------------------------------------


def test_vmap_over_examples_raises_naming_the_transform():
    """``jax.vmap`` over examples in the loss (shared params) and ``nn.vmap`` with broadcast
    params both raise a ValueError naming ``jax.vmap`` and the layer, eagerly and under jit."""
    model = Net()
    x, y = normal_batch(40, (7, WIDTH), (7,))
    params = init_params(model, x, dtype=jnp.float64)

    def vmapped_loss(params, x, y):
        logits = jax.vmap(lambda xi: model.apply({"params": params}, xi[None])[0])(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    class Broadcast(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.vmap(nn.Dense, variable_axes={"params": None}, split_rngs={"params": False})
            return dense(3, name="shared")(x[:, None])[:, 0]

    broadcast = Broadcast()
    broadcast_params = broadcast.init(jax.random.key(0), x)["params"]

    def broadcast_loss(params, x, y):
        logits = broadcast.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    for loss_fn, p, layer in (
        (vmapped_loss, params, "'block/norm'"),
        (broadcast_loss, broadcast_params, "'shared'"),
    ):
        for f in (ek.value_grad_and_stats(loss_fn), jax.jit(ek.value_grad_and_stats(loss_fn))):
            with pytest.raises(ValueError, match="jax.vmap") as info:
                f(p, x, y)
            assert layer in str(info.value)
        with pytest.raises(ValueError, match="jax.vmap"):
            ek.find_blocks(loss_fn, p, x, y)


def test_a_loss_without_linen_calls_raises():
    """A loss that runs no Flax linen module (plain JAX on the params, as an NNX model would):
    a ValueError that names the likely causes, never empty stats."""
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}

    def loss_fn(params, x):
        return jnp.mean((x @ params["dense"]["kernel"] + params["dense"]["bias"]) ** 2)

    x = jnp.ones((4, 3))
    for call in (
        lambda: ek.value_grad_and_stats(loss_fn)(params, x),
        lambda: ek.find_blocks(loss_fn, params, x),
    ):
        with pytest.raises(ValueError, match="no Flax linen module call") as info:
            call()
        assert "NNX" in str(info.value)


def test_scan_over_a_non_leading_axis_falls_back():
    """``nn.scan`` with ``variable_axes={"params": 1}``: the layer's parameters are stacked on
    axis 1, which a block cannot map over: they get the fallback (stated by ``find_blocks``'s
    absence and ``summarize``), and an update still runs."""

    class Axis1(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(
                Layer, variable_axes={"params": 1}, split_rngs={"params": True}, length=2
            )
            x, _ = stack(name="stack")(x, None)
            return nn.Dense(3, name="head")(x)

    x, y = normal_batch(50, (7, WIDTH), (7,))
    model = Axis1()
    params = init_params(model, x, dtype=jnp.float64)
    loss_fn = classifier_loss(model)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    assert set(blocks) == {"head"}
    assert "stack/dense/kernel" in ek.summarize(params, blocks)
    tx = ek.ekfac(0.1, blocks=blocks)
    _, grads, stats = ek.value_grad_and_stats(loss_fn, layers=blocks)(params, x, y)
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


class Shared(nn.Module):
    """One Dense layer called twice (weight sharing), plainly or as one ``nn.remat`` module."""

    wrap: str = "none"

    @nn.compact
    def __call__(self, x):
        shared = (nn.remat(nn.Dense) if self.wrap == "remat" else nn.Dense)(WIDTH, name="shared")
        return nn.Dense(3, name="head")(jnp.tanh(shared(jnp.tanh(shared(x)))))


def test_repeated_calls_are_positions_through_remat_and_separate_applies():
    """A module called twice is one block with two positions, also when each call is its own
    ``nn.remat`` trace, and a model applied twice in one loss (two inputs) contributes both
    applications' inputs as positions, in call order: never one probe shared by two calls."""
    x, y = normal_batch(60, (7, WIDTH), (7,))
    plain, remat = Shared(), Shared("remat")
    params = init_params(plain, x, dtype=jnp.float64)
    _, expected_grads, expected = ek.value_grad_and_stats(classifier_loss(plain))(params, x, y)
    _, grads, stats = ek.value_grad_and_stats(classifier_loss(remat))(params, x, y)
    assert stats["shared"].h.shape == (7, 2, WIDTH)
    assert_trees_close((grads, stats), (expected_grads, expected), "remat", ROUND_OFF)

    x2, _ = normal_batch(61, (7, WIDTH), (7,))

    def twice(params, x, x2, y):
        return (classifier_loss(plain)(params, x, y) + classifier_loss(plain)(params, x2, y)) / 2

    _, _, both = ek.value_grad_and_stats(twice)(params, x, x2, y)
    _, _, second = ek.value_grad_and_stats(classifier_loss(plain))(params, x2, y)
    h = both["shared"].h
    assert h.shape == (7, 4, WIDTH)
    np.testing.assert_array_equal(h[:, :2], expected["shared"].h)
    np.testing.assert_array_equal(h[:, 2:], second["shared"].h)


def test_integer_inputs_to_a_dense_layer():
    """uint8 inputs (raw images) to a Dense layer: ``h`` comes back as floats, equal to the
    inputs, and the update runs (the probes are differentiated, so they are never integers)."""
    model = nn.Dense(3)
    x = jnp.asarray(np.random.default_rng(70).integers(0, 255, (9, 4)), jnp.uint8)
    y = jnp.arange(9) % 3
    params = init_params(model, x.astype(jnp.float64), dtype=jnp.float64)
    loss_fn = classifier_loss(model)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
    np.testing.assert_array_equal(stats[""].h[:, 0], x.astype(stats[""].h.dtype))
    tx = ek.ekfac(0.1, blocks=blocks)
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
