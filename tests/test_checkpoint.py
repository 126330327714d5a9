"""Checkpoints (orbax) and determinism: resumed or repeated training is bit-identical."""

import hashlib
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MLP, assert_trees_equal, classifier_loss, digits_batches, train, train_step

import ekfac_optax as ek

KW = dict(damping=1e-2, basis_update_every=3, factor_decay=0.9, scaling="running")
F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def float32_mlp(widths=(32, 10)):
    """The model, its loss and initial params on the digits, its blocks."""
    model = MLP(widths, **F32)
    batch = digits_batches(1)[0]
    params = model.init(jax.random.key(0), batch[0])["params"]
    loss_fn = classifier_loss(model)
    return loss_fn, params, ek.find_blocks(loss_fn, params, *batch)


@pytest.fixture(scope="module")
def training():
    loss_fn, params, blocks = float32_mlp()
    tx = ek.ekfac(0.05, blocks=blocks, **KW)
    return tx, train_step(loss_fn, tx), digits_batches(10), params


def init_state(widths):
    """The initial state of ``ek.ekfac(0.05, **KW)`` for ``float32_mlp(widths)``."""
    _, params, blocks = float32_mlp(widths)
    return ek.ekfac(0.05, blocks=blocks, **KW).init(params)


def test_resume_from_checkpoint_is_bit_identical(training, tmp_path):
    tx, step, batches, params0 = training
    straight = train(step, params0, tx.init(params0), batches)

    params, opt_state, _ = train(step, params0, tx.init(params0), batches[:4])
    ek.save_state(tmp_path / "ckpt", {"params": params, "opt_state": opt_state})
    del params, opt_state
    like = {"params": params0, "opt_state": tx.init(params0)}
    restored = ek.restore_state(tmp_path / "ckpt", like)
    assert jax.tree.structure(restored) == jax.tree.structure(like)
    resumed = train(step, restored["params"], restored["opt_state"], batches[4:])
    assert_trees_equal(resumed[:2], straight[:2])  # params and state (the losses: 6 vs 10)


def test_checkpoint_of_another_model_names_the_layers(training, tmp_path):
    tx, _, batches, params0 = training
    ek.save_state(tmp_path / "ckpt", tx.init(params0))

    wider = init_state((48, 10))
    with pytest.raises(ValueError, match=r"Dense_0.*float32\[33, 33\] in checkpoint.*\[49, 49\]"):
        ek.restore_state(tmp_path / "ckpt", wider)

    deeper = init_state((32, 16, 10))
    with pytest.raises(ValueError, match=r"layers only in the model \['Dense_2'\]"):
        ek.restore_state(tmp_path / "ckpt", deeper)


def training_digest() -> str:
    """sha256 of the params, states and losses of EKFAC and EKFAC-ra runs on digits."""
    loss_fn, params, blocks = float32_mlp()
    batches = digits_batches(6)
    digest = hashlib.sha256()
    for scaling in ("batch", "running"):
        tx = ek.ekfac(0.05, blocks=blocks, damping=1e-2, basis_update_every=2, scaling=scaling)
        p, s, losses = train(train_step(loss_fn, tx), params, tx.init(params), batches)
        for leaf in jax.tree.leaves((p, s, losses)):
            digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


@pytest.mark.slow  # two subprocesses
def test_checkpoint_of_the_other_stack_blocks_layout_says_so(tmp_path):
    """Dense_1 and Dense_2 (both 33 x 32) are one stacked entry with ``stack_blocks=True``: a
    per-layer checkpoint does not restore into that state, and the error names the cause."""
    _, params, blocks = float32_mlp((32, 32, 32, 10))
    per_layer = ek.ekfac(0.05, blocks=blocks, **KW).init(params)
    stacked = ek.ekfac(0.05, blocks=blocks, stack_blocks=True, **KW).init(params)
    ek.save_state(tmp_path / "ckpt", per_layer)
    with pytest.raises(ValueError, match=r"only in the checkpoint \['Dense_2'\].*stack_blocks"):
        ek.restore_state(tmp_path / "ckpt", stacked)


def test_same_seed_is_bit_identical_across_processes():
    """A fresh process (own compilation, own thread pool) gives the same bytes as this one."""
    root = str(pathlib.Path(__file__).parents[1])  # ekfac_optax, importable from any directory
    other = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])},
    ).stdout.strip()
    assert len(other) == 64
    assert other == training_digest()


def test_conv_model_checkpoint_round_trip(tmp_path):
    """A conv + dense state (float64 curvature) restores exactly, dtypes included."""

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x)
            return nn.Dense(3, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))

    x = jnp.ones((2, 5, 5, 1))
    params = CNN().init(jax.random.key(1), x)["params"]

    def loss_fn(params, x):
        return jnp.mean(CNN().apply({"params": params}, x) ** 2)

    blocks = ek.find_blocks(loss_fn, params, x)
    assert sorted(blocks) == ["Conv_0", "Dense_0"]
    tx = ek.scale_by_kfac(blocks=blocks, damping=1e-2)
    state = tx.init(params)
    state = state._replace(
        blocks={p: b._replace(factor_a=b.factor_a + 1.5) for p, b in state.blocks.items()}
    )
    ek.save_state(tmp_path / "c", state)
    restored = ek.restore_state(tmp_path / "c", tx.init(params))
    assert isinstance(restored, ek.ScaleByEkfacState)
    assert restored.blocks["Conv_0"].factor_a.dtype == np.float64
    assert_trees_equal(restored, state)


if __name__ == "__main__":  # the other process of test_same_seed_is_bit_identical_across_processes
    jax.config.update("jax_enable_x64", True)
    print(training_digest())


def test_capped_state_round_trip(tmp_path):
    """A state with capped factor sides (vectors, no basis) restores exactly, and a state of
    another cap is refused naming the layer."""
    loss_fn, params, blocks = float32_mlp()
    batches = digits_batches(3)
    tx = ek.ekfac(0.05, blocks=blocks, max_factor_dim=40, **KW)
    _, state, _ = train(train_step(loss_fn, tx), params, tx.init(params), batches)
    block = state[0].blocks["Dense_0"]  # 65 x 32: input side capped, output side kept
    assert (
        block.factor_a.shape == (65,) and block.basis_a is None and block.basis_b.shape == (32, 32)
    )
    ek.save_state(tmp_path / "capped", state)
    assert_trees_equal(ek.restore_state(tmp_path / "capped", tx.init(params)), state)

    uncapped = ek.ekfac(0.05, blocks=blocks, max_factor_dim=None, **KW).init(params)
    with pytest.raises(ValueError, match=r"Dense_0.*factor_a float32\[65\] in checkpoint"):
        ek.restore_state(tmp_path / "capped", uncapped)
