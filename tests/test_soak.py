"""Soak: 1,000 steps on numerically hard curvature never produce NaN/Inf or a diverging loss.

Cases: rank-deficient factors (batch smaller than d_in), constant and all-zero inputs, dead
ReLUs (zero delta), huge (1e8) and tiny (1e-8) activations, bfloat16 params and activations.
The training loop runs inside `jax.lax.scan`, so each case compiles once.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import classifier_loss

import ekfac_optax as ek

pytestmark = pytest.mark.slow  # many compiled training runs

STEPS = 1000
D_IN, CLASSES = 16, 4


class Net(nn.Module):
    activation: str = "tanh"
    bias_init: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            12,
            dtype=self.dtype,
            param_dtype=self.dtype,
            bias_init=nn.initializers.constant(self.bias_init),
        )(x)
        x = getattr(nn, self.activation)(x)
        return nn.Dense(CLASSES, dtype=self.dtype, param_dtype=self.dtype)(x)


# name: (batch, input transform, Net kwargs)
CASES = {
    "rank_deficient": (4, lambda x: x, {}),
    "constant_inputs": (32, lambda x: jnp.full_like(x, 0.5), {}),
    "zero_inputs": (32, jnp.zeros_like, {}),
    "dead_relu": (32, lambda x: x, {"activation": "relu", "bias_init": -100.0}),
    "huge_activations": (32, lambda x: x * 1e8, {}),
    "tiny_activations": (32, lambda x: x * 1e-8, {}),
    "bfloat16": (32, lambda x: x.astype(jnp.bfloat16), {"dtype": jnp.bfloat16}),
}


def chained(precond):
    """The README's recipe: precondition, clip the update norm, scale by the learning rate."""
    return optax.chain(precond, optax.clip_by_global_norm(1.0), optax.scale_by_learning_rate(0.1))


# name: the preconditioner, given the blocks of the model
OPTIMIZERS = {
    "ekfac": lambda blocks: chained(ek.scale_by_ekfac(blocks=blocks, basis_update_every=10)),
    "ekfac_ra": lambda blocks: chained(
        ek.scale_by_ekfac(blocks=blocks, basis_update_every=10, scaling="running")
    ),
    "kfac": lambda blocks: chained(
        ek.scale_by_kfac(blocks=blocks, basis_update_every=10, damping_mode="factored")
    ),
}


def soak(case, optimizer):
    batch, transform, net_kwargs = CASES[case]
    model = Net(**net_kwargs)
    teacher = jax.random.normal(jax.random.key(7), (D_IN, CLASSES))

    def data(i):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (batch, D_IN))
        return transform(x), jnp.argmax(x @ teacher, axis=-1)

    loss_fn = classifier_loss(model)
    grad_fn = ek.value_grad_and_stats(loss_fn)

    def step(carry, i):
        params, opt_state = carry
        loss, grads, stats = grad_fn(params, *data(i))
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return (optax.apply_updates(params, updates), opt_state), loss

    params = model.init(jax.random.key(1), data(0)[0])["params"]
    tx = OPTIMIZERS[optimizer](ek.find_blocks(loss_fn, params, *data(0)))

    @jax.jit
    def run(params):
        (params, opt_state), losses = jax.lax.scan(
            step, (params, tx.init(params)), jnp.arange(STEPS)
        )
        return params, opt_state, losses

    return run(params)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_soak(case, optimizer):
    params, opt_state, losses = soak(case, optimizer)
    leaves = jax.tree.leaves((params, opt_state))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), "non-finite params or state"
    assert bool(jnp.all(jnp.isfinite(losses))), "non-finite loss"
    # No step was skipped: the hard cases are handled, not hidden by the non-finite guard.
    assert int(opt_state[0].skipped) == 0
    assert int(opt_state[0].count) == STEPS
    # The loss does not blow up: the last 100 steps stay below the first step's loss, up to
    # the noise of one batch (a 1.5x margin; a diverging run is orders of magnitude above).
    assert float(losses[-100:].mean()) <= 1.5 * float(losses[0]), (losses[0], losses[-100:].mean())


if __name__ == "__main__":
    # The README's soak table: python tests/test_soak.py (float64 enabled, as in conftest.py)
    jax.config.update("jax_enable_x64", True)
    for case in sorted(CASES):
        row = []
        for optimizer in sorted(OPTIMIZERS):
            _, _, losses = soak(case, optimizer)
            row.append(f"{float(losses[0]):.3f} → {float(losses[-100:].mean()):.3f}")
        print(f"| {case} | " + " | ".join(row) + " |", flush=True)
