"""Same-shaped blocks are processed as one stacked block (issue 31): exact equivalence with the
per-layer path, what is grouped and what never is, the eigendecompositions traced once per
group, the errors naming the member.

The per-layer path (``stack_blocks=False``, the default) is tested against independent
references in ``test_reference_updates.py`` and ``test_kinds.py``.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, init_params, normal_batch
from jax.sharding import Mesh

import ekfac_optax as ek
from ekfac_optax.kinds import _blocks
from ekfac_optax.update import _stacking

# float64 throughout: the stacked path runs the same operations batched (a vmapped matmul, the
# same LAPACK eigh per member); their round-off differs from the per-layer calls' at ~1e-16, which
# five steps through two basis refreshes (separated spectra) and KFE-Adam's division by
# sqrt(v) + eps (v ~ 1e-8 on the CNN head's bias) amplify to 1.5e-9 at most (measured).
RTOL = 1e-8
STEPS, EVERY = 5, 2  # basis refreshes on steps 0, 2 and 4


class LoopMLP(nn.Module):
    """Same-shaped Dense + LayerNorm layers written as a Python loop, an odd one out (no bias),
    and a DenseGeneral q/k/v trio of equal shapes."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="stem")(x)
        for i in range(3):
            x = nn.tanh(nn.LayerNorm(name=f"norm_{i}")(nn.Dense(6, name=f"dense_{i}")(x)))
        x = nn.Dense(6, use_bias=False, name="no_bias")(x)
        q, k, v = (nn.DenseGeneral((2, 3), name=n)(x) for n in ("q", "k", "v"))
        x = (q * k + v).reshape(x.shape[0], 6)
        return nn.Dense(3, name="head")(x)


class LoopCNN(nn.Module):
    """Same-shaped 3x3 convolutions as a loop, then a strided one (other positions).

    Every factor has full rank (more samples than rows), as in the MLP: a rank-deficient factor's
    null-space eigenvectors are any basis of it, which round-off picks, and a stale basis then
    scales a new batch's gradient differently in either path."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), name="stem")(x)
        for i in range(3):
            x = nn.relu(nn.Conv(3, (3, 3), name=f"conv_{i}")(x))
        x = nn.Conv(3, (3, 3), strides=2, name="down")(x)
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


MODELS = {"mlp": (LoopMLP, (8, 5), (8,)), "cnn": (LoopCNN, (8, 6, 6, 2), (8,))}


def _setup(name):
    cls, x_shape, y_shape = MODELS[name]
    model = cls()
    batches = [normal_batch(seed, x_shape, y_shape) for seed in range(STEPS)]
    params = init_params(model, batches[0][0], dtype=jnp.float64)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn, params, batches


def _make(method, blocks, **kwargs):
    kwargs = dict(blocks=blocks, basis_update_every=EVERY, **kwargs)
    if method == "kfac":
        return ek.scale_by_kfac(damping=1e-3, **kwargs)
    if method == "kfe_adam":
        return ek.scale_by_kfe_adam(**kwargs)
    scaling = "running" if method == "ekfac_ra" else "batch"
    return ek.scale_by_ekfac(damping=1e-3, scaling=scaling, **kwargs)


def _run(loss_fn, params, batches, tx):
    capture = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def step(params, state, *batch):
        _, grads, stats = capture(params, *batch)
        updates, state = tx.update(grads, state, params, stats=stats)
        return (
            optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates)),
            state,
            updates,
        )

    state, updates = tx.init(params), []
    for batch in batches:
        params, state, u = step(params, state, *batch)
        updates.append(u)
    return updates, state


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["ekfac", "ekfac_ra", "kfac", "kfe_adam"])
def test_stacked_updates_equal_per_layer_updates(model, method):
    loss_fn, params, batches = _setup(model)
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    stacked = _run(loss_fn, params, batches, _make(method, blocks, stack_blocks=True))
    reference = _run(loss_fn, params, batches, _make(method, blocks))
    for step, (u, r) in enumerate(zip(stacked[0], reference[0], strict=True)):
        assert_trees_close(u, r, f"step {step}", rtol=RTOL)
    # The state stores each group as one stacked entry: its members' slices are their states.
    stored = _stacking.plan(_blocks.with_cap(blocks, None))
    assert set(stacked[1].blocks) == set(stored) != set(reference[1].blocks)
    per_layer = _stacking.unstack(stored, stacked[1].blocks)
    assert_trees_close(per_layer, reference[1].blocks, "state", rtol=RTOL)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")
def test_stacked_eigh_spread_over_a_mesh_equals_per_layer():
    """``mesh=`` splits the groups' stacked factors over 8 devices; the result is the per-layer
    one on one device."""
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    mesh = Mesh(np.array(jax.devices()[:8]), ("basis",))
    spread = _run(loss_fn, params, batches, _make("ekfac", blocks, mesh=mesh, stack_blocks=True))
    reference = _run(loss_fn, params, batches, _make("ekfac", blocks))
    for step, (u, r) in enumerate(zip(spread[0], reference[0], strict=True)):
        assert_trees_close(u, r, f"step {step}", rtol=RTOL)


def _groups(loss_fn, params, batch, **kwargs):
    """The groups an update of ``scale_by_ekfac`` forms, as sorted member tuples."""
    blocks = ek.find_blocks(loss_fn, params, *batch)
    # The grouping reads shapes and dtypes only: the stats' abstract values suffice.
    _, _, stats = jax.eval_shape(ek.value_grad_and_stats(loss_fn), params, *batch)
    specs = {p: dataclasses.replace(s, **kwargs.get(p, {})) for p, s in blocks.items()}
    h = {p: stats[p].h for p in specs}
    delta = {p: stats[p].delta for p in specs}
    return sorted(g.members for g in _stacking.group(specs, h, delta).values())


def test_what_is_grouped():
    """Equal shapes, bias and positions are grouped, whatever the kind (the Dense layers and the
    DenseGeneral q/k/v are all 7x6 blocks); another bias, another number of positions (the
    strided convolution) or another size stays apart."""
    loss_fn, params, batches = _setup("mlp")
    assert _groups(loss_fn, params, batches[0]) == [
        ("dense_0", "dense_1", "dense_2", "k", "q", "v"),
        ("head",),
        ("no_bias",),
        ("norm_0", "norm_1", "norm_2"),
        ("stem",),
    ]
    loss_fn, params, batches = _setup("cnn")
    assert _groups(loss_fn, params, batches[0]) == [
        ("conv_0", "conv_1", "conv_2"),
        ("down",),
        ("head",),
        ("stem",),
    ]


def test_a_stored_group_whose_statistics_differ_is_split_for_them():
    """The state groups blocks by their specs; the strided convolution's block equals the
    others' (27 x 3) and is stored with them, but its statistics have other positions, so an
    update processes it apart (``test_stacked_updates_equal_per_layer_updates[cnn]``: equal)."""
    loss_fn, params, batches = _setup("cnn")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    stored = sorted(g.members for g in _stacking.plan(blocks).values())
    assert ("conv_0", "conv_1", "conv_2", "down") in stored
    assert ("conv_0", "conv_1", "conv_2") in _groups(loss_fn, params, batches[0])


def test_regroup_moves_members_between_groupings_and_back():
    """Members interleaved across groups (a gather, a slice, a group of one) come out in the
    target's order, and back; a group found in both is passed on as it is."""
    loss_fn, params, batches = _setup("mlp")
    spec = next(iter(ek.find_blocks(loss_fn, params, *batches[0]).values()))
    group = lambda *m: _stacking.Group(spec, m)  # noqa: E731 (the spec is not read)
    source = {"a": group("a", "b", "c", "d"), "e": group("e")}
    target = {"a": group("a", "c", "e"), "b": group("b", "d")}
    values = {"a": {"x": jnp.arange(4.0)}, "e": {"x": jnp.asarray(4.0)}}
    moved = _stacking.regroup(source, target, values)
    np.testing.assert_array_equal(moved["a"]["x"], [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(moved["b"]["x"], [1.0, 3.0])
    back = _stacking.regroup(target, source, moved)
    np.testing.assert_array_equal(back["a"]["x"], values["a"]["x"])
    np.testing.assert_array_equal(back["e"]["x"], values["e"]["x"])
    assert _stacking.regroup(source, source, values)["a"] is values["a"]


def test_blocks_that_differ_in_an_option_are_never_grouped():
    """A member whose side is capped (``max_factor_dim``) is not stacked with uncapped ones."""
    loss_fn, params, batches = _setup("mlp")
    groups = _groups(loss_fn, params, batches[0], dense_1=dict(max_factor_dim=4))
    assert ("dense_1",) in groups
    assert ("dense_0", "dense_2", "k", "q", "v") in groups


def _count_eigh(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "eigh"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_eigh(sub)
    return count


def test_one_eigh_per_group_side_is_traced():
    """The update's program holds one ``eigh`` per distinct factor of a group (a loop runs it
    over the members), not one per layer."""
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    tx = _make("ekfac", blocks, stack_blocks=True)
    state = tx.init(params)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, *batches[0])
    jaxpr = jax.make_jaxpr(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, state, stats)
    kronecker_groups = 4  # dense_0-2 with q/k/v, stem, no_bias, head
    assert _count_eigh(jaxpr.jaxpr) == 2 * kronecker_groups
    assert sum(spec.block == "kronecker" for spec in blocks.values()) == 9


def test_a_members_wrong_stats_are_named_by_its_own_path():
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    tx = _make("ekfac", blocks, stack_blocks=True)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, *batches[0])
    bad = dict(stats)
    bad["dense_1"] = stats["dense_1"]._replace(h=stats["dense_1"].h[..., :4])
    with pytest.raises(ValueError, match=r"stats\['dense_1'\]\.h: expected shape"):
        tx.update(grads, tx.init(params), params, stats=bad)


def test_stack_blocks_is_a_static_bool_also_through_the_aliases_and_inject_hyperparams():
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    with pytest.raises(TypeError, match="stack_blocks must be True or False"):
        ek.scale_by_ekfac(blocks=blocks, stack_blocks="yes")
    alias = ek.ekfac(0.1, blocks=blocks, stack_blocks=True, basis_update_every=EVERY)
    injected = optax.inject_hyperparams(ek.ekfac, static_args=("stack_blocks",))(
        0.1, blocks=blocks, stack_blocks=True, basis_update_every=EVERY
    )
    chained = optax.chain(_make("ekfac", blocks, stack_blocks=True), optax.scale(-0.1))
    outs = [_run(loss_fn, params, batches[:2], tx)[0] for tx in (alias, injected, chained)]
    for out in outs[1:]:
        for u, r in zip(out, outs[0], strict=True):
            assert_trees_close(u, r, rtol=1e-12)  # the same computation: equal to round-off


def test_a_state_of_the_other_layout_fails_naming_stack_blocks():
    """A checkpoint of a per-layer state does not restore into a stacked optimizer, nor the
    other way round: the error says which ``stack_blocks`` made it."""
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, *batches[0])
    stacked, per_layer = _make("ekfac", blocks, stack_blocks=True), _make("ekfac", blocks)
    with pytest.raises(ValueError, match="one entry per layer.*stack_blocks=False made it"):
        stacked.update(grads, per_layer.init(params), params, stats=stats)
    with pytest.raises(ValueError, match="lacks some layers.*stack_blocks=True"):
        per_layer.update(grads, stacked.init(params), params, stats=stats)


def test_micro_batches_of_a_stacked_state_equal_the_per_layer_ones():
    """``ek.multi_steps`` keeps its sums per layer, reading the stacked state's members;
    the stacked accumulated steps equal the per-layer ones (which ``test_accumulate.py`` tests
    against one big batch)."""
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    outs = []
    for stack_blocks in (True, False):
        tx = ek.multi_steps(_make("ekfac_ra", blocks, stack_blocks=stack_blocks), 2)
        micro = [(x[a : a + 4], y[a : a + 4]) for x, y in batches[:3] for a in (0, 4)]
        outs.append(_run(loss_fn, params, micro, tx)[0])
    for step, (u, r) in enumerate(zip(*outs, strict=True)):
        assert_trees_close(u, r, f"micro-step {step}", rtol=RTOL)


def test_summary_of_a_stacked_state_gives_each_member_its_share():
    """A group's stacked entry holds its members' equal states: each gets its share, the same
    bytes as the per-layer state's."""
    loss_fn, params, batches = _setup("mlp")
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    stacked = ek.summary(params, blocks, tx=_make("ekfac", blocks, stack_blocks=True))
    per_layer = ek.summary(params, blocks, tx=_make("ekfac", blocks))
    assert stacked == per_layer
