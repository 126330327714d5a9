"""The machinery around the state covers every block type: the non-finite guard, checkpoints,
data-parallel sharding and the basis spread over a mesh.

One model holds a block of each type and the fallback: an ``nn.Embed`` (embedding block), a
learned positional parameter (fallback), a grouped ``nn.Conv`` (stacked Kronecker block), an
MHA (``nn.DenseGeneral`` blocks), ``nn.LayerNorm`` (diagonal block) and a Dense head. float64.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_equal
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ekfac_optax as ek

VOCAB, SEQ, WIDTH = 9, 6, 8
F64 = dict(param_dtype=jnp.float64)


class Mixed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, WIDTH, **F64)(ids)
        x = x + self.param("pos", nn.initializers.normal(0.1), (SEQ, WIDTH), jnp.float64)
        x = x + nn.Conv(WIDTH, (3,), feature_group_count=4, **F64)(x)
        h = nn.LayerNorm(**F64)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, **F64)(h, h)
        return nn.Dense(VOCAB, **F64)(nn.LayerNorm(**F64)(x))


def loss_fn(params, ids, labels):
    logits = Mixed().apply({"params": params}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batches(count, size=16):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (count, size, SEQ))
    return [(jnp.asarray(i), jnp.asarray(i[:, ::-1])) for i in ids]


@pytest.fixture(scope="module")
def setup():
    data = batches(6)
    params = Mixed().init(jax.random.key(0), data[0][0])["params"]
    blocks = ek.find_blocks(loss_fn, params, *data[0])
    assert {s.block for s in blocks.values()} == {"embed", "kronecker", "diagonal"}
    assert any(s.stack for s in blocks.values())
    return params, blocks, data


def make_step(tx):
    grad_fn = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def step(params, state, ids, labels, poison):
        loss, grads, stats = grad_fn(params, ids, labels)
        grads = jax.tree.map(lambda g: g * poison, grads)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state

    return step


def train(step, params, state, data, poison_at=None):
    for k, (ids, labels) in enumerate(data):
        poison = jnp.nan if k == poison_at else 1.0
        params, state = step(params, state, ids, labels, poison)
    return params, state


TXS = {
    "ekfac": dict(scaling="batch"),
    "ekfac_ra": dict(scaling="running"),
}


@functools.cache
def single_device(method):
    """``(tx, jitted step)`` of ``method`` without a mesh, shared by the tests (one compile)."""
    data = batches(1)
    params = Mixed().init(jax.random.key(0), data[0][0])["params"]
    tx = make_tx(ek.find_blocks(loss_fn, params, *data[0]), method)
    return tx, make_step(tx)


def make_tx(blocks, method, mesh=None):
    kw = dict(blocks=blocks, damping=1e-2, basis_update_every=2, factor_decay=0.9, mesh=mesh)
    if method == "kfac":
        return ek.kfac(0.05, **kw)
    return ek.ekfac(0.05, **kw, **TXS[method])


@pytest.mark.parametrize("method", ["ekfac", "ekfac_ra", "kfac"])
def test_a_non_finite_step_changes_nothing_but_skipped(setup, method):
    params, blocks, data = setup
    tx, step = single_device(method)
    poisoned = train(step, params, tx.init(params), data, poison_at=3)
    skipped = train(step, params, tx.init(params), data[:3] + data[4:])
    assert int(poisoned[1][0].skipped) == 1 and int(skipped[1][0].skipped) == 0
    fixed = (poisoned[0], poisoned[1][0]._replace(skipped=skipped[1][0].skipped), poisoned[1][1])
    assert_trees_equal(fixed, (skipped[0], skipped[1][0], skipped[1][1]))
    # The new state slots are really updated (the comparison is not between initial states).
    state = skipped[1][0]
    assert float(jnp.abs(state.fallback["pos"]).max()) > 0
    assert all(float(jnp.abs(b.scalings).max()) > 0 for b in state.blocks.values())


def test_resume_from_checkpoint_is_bit_identical(setup, tmp_path):
    params, blocks, data = setup
    tx, step = single_device("ekfac")
    straight = train(step, params, tx.init(params), data)
    half = train(step, params, tx.init(params), data[:3])
    ek.save_state(tmp_path / "ckpt", {"params": half[0], "opt_state": half[1]})
    restored = ek.restore_state(tmp_path / "ckpt", {"params": params, "opt_state": tx.init(params)})
    assert isinstance(restored["opt_state"][0].blocks["Embed_0"], ek.EmbedState)
    assert isinstance(restored["opt_state"][0].blocks["LayerNorm_0"], ek.DiagonalState)
    resumed = train(step, restored["params"], restored["opt_state"], data[3:])
    assert_trees_equal(resumed, straight)


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


@needs_8
@pytest.mark.parametrize("method", ["ekfac", "kfac"])  # EKFAC-ra adds no reduction
def test_data_parallel_and_spread_basis_equal_one_device(setup, method):
    """Batch sharded over 8 devices (and the basis spread with ``mesh``) against one device.

    float64; the only difference is the order of the cross-device sums (relative ~1e-15), which
    three steps through eigendecompositions of separated spectra amplify to ~1e-10 at most.
    """
    params, blocks, data = setup
    data = data[:3]
    tx, step = single_device(method)
    reference = train(step, params, tx.init(params), data)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    tx = make_tx(blocks, method, mesh=mesh)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded_data = [jax.device_put(batch, sharded) for batch in data]
    out = train(
        make_step(tx),
        jax.device_put(params, replicated),
        jax.device_put(tx.init(params), replicated),
        sharded_data,
    )
    np.testing.assert_allclose(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(out[0])]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(reference[0])]),
        rtol=1e-9,
        atol=1e-12,
    )
    for path in reference[1][0].blocks:
        np.testing.assert_allclose(
            out[1][0].blocks[path].scalings,
            reference[1][0].blocks[path].scalings,
            rtol=1e-9,
            atol=1e-12,
        )
