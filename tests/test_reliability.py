"""Reliability: non-finite steps are skipped exactly, hard curvature never produces NaN/Inf."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MLP, assert_trees_equal, classifier_loss, digits_batches

import ekfac_optax as ek

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


NO_POISON = {"grads": 0.0, "h": 0.0, "delta": 0.0}


@functools.cache
def mlp_setup(widths=(32, 10)):
    """``MLP(widths)`` in float32, its initial params on the digits and its blocks."""
    model = MLP(widths, **F32)
    x, y = digits_batches(1)[0]
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, ek.find_blocks(classifier_loss(model), params, x, y)


def make_step(model, tx):
    """A jitted train step; `poison[k]` is added to one number of the grads, h or delta."""
    grad_fn = ek.value_grad_and_stats(classifier_loss(model))

    @jax.jit
    def step(params, opt_state, x, y, poison):
        loss, grads, stats = grad_fn(params, x, y)
        grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].add(poison["grads"]), grads)
        stats = {
            path: ek.LayerStats(
                h=s.h.at[-1, 0, 0].add(poison["h"]), delta=s.delta.at[0, 0, 0].add(poison["delta"])
            )
            for path, s in stats.items()
        }
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def ekfac_state(opt_state):
    return next(s for s in opt_state if isinstance(s, ek.ScaleByEkfacState))


POISON = {"grads": jnp.inf, "h": jnp.inf, "delta": jnp.nan}
# A finite input whose square overflows float32 (3.4e38): the factor's diagonal (h²) becomes
# inf with every input finite; the guard, which checks the factors' diagonals, must see it.
HUGE_H = 1e25


@functools.cache
def chained_step(scaling):
    """One compiled step per preconditioner, shared by the parametrized cases."""
    common = dict(blocks=mlp_setup()[2], damping=1e-2, basis_update_every=3, factor_decay=0.9)
    precond = (
        ek.scale_by_kfac(**common)
        if scaling == "kfac"
        else ek.scale_by_ekfac(scaling=scaling, **common)
    )
    tx = optax.chain(precond, optax.clip_by_global_norm(1.0), optax.scale_by_learning_rate(0.1))
    return tx, make_step(mlp_setup()[0], tx)


@pytest.mark.parametrize("corrupt", ["input", "grads", "delta", "h", "h_overflow"])
@pytest.mark.parametrize("scaling", ["batch", "running", "kfac"])
def test_nonfinite_step_equals_skipping_the_batch(corrupt, scaling):
    """A NaN/Inf at step k (or a finite input whose square overflows) leaves params and state
    exactly as if batch k had been skipped."""
    tx, step = chained_step(scaling)
    batches = digits_batches(8)
    _, params0, _ = mlp_setup()
    k = 4

    def run(skip):
        params, opt_state = params0, tx.init(params0)
        for i, (x, y) in enumerate(batches):
            if i == k and skip:
                continue
            if i == k:
                before = params, opt_state
                if corrupt == "input":
                    x = x.at[0, 0].set(jnp.nan)
                    params, opt_state, _ = step(params, opt_state, x, y, NO_POISON)
                elif corrupt == "h_overflow":
                    poison = dict(NO_POISON, h=HUGE_H)
                    params, opt_state, _ = step(params, opt_state, x, y, poison)
                else:
                    poison = dict(NO_POISON, **{corrupt: POISON[corrupt]})
                    params, opt_state, _ = step(params, opt_state, x, y, poison)
                # Nothing moved but the skip counter.
                assert_trees_equal(params, before[0])
                assert int(ekfac_state(opt_state).skipped) == 1
                assert_trees_equal(
                    ekfac_state(opt_state)._replace(skipped=0),
                    ekfac_state(before[1])._replace(skipped=0),
                )
                continue
            params, opt_state, _ = step(params, opt_state, x, y, NO_POISON)
        return params, opt_state

    params_bad, state_bad = run(skip=False)
    params_skip, state_skip = run(skip=True)
    assert_trees_equal(params_bad, params_skip)
    assert int(ekfac_state(state_bad).skipped) == 1
    assert int(ekfac_state(state_skip).skipped) == 0
    assert int(ekfac_state(state_bad).count) == len(batches) - 1
    assert_trees_equal(
        ekfac_state(state_bad)._replace(skipped=0), ekfac_state(state_skip)._replace(skipped=0)
    )
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params_bad))


def test_apply_if_finite_wraps_ekfac_under_jit():
    """`optax.apply_if_finite` forwards `stats` and rejects the step as a whole."""
    model, params, blocks = mlp_setup()
    tx = optax.apply_if_finite(ek.ekfac(0.1, blocks=blocks, damping=1e-2, basis_update_every=2), 3)
    step = make_step(model, tx)
    batches = digits_batches(4)
    opt_state = tx.init(params)
    losses = []
    for i, (x, y) in enumerate(batches):
        before = params
        poison = dict(NO_POISON, grads=jnp.inf if i == 2 else 0.0)
        params, opt_state, loss = step(params, opt_state, x, y, poison)
        losses.append(float(loss))
        if i == 2:
            assert_trees_equal(params, before)
            assert int(opt_state.total_notfinite) == 1
    assert int(opt_state.inner_state[0].count) == 3
    assert np.isfinite(losses).all()


def test_failed_eigh_keeps_previous_basis():
    """`safe_eigh` of a non-finite factor returns the fallback pair and ok=False."""
    from ekfac_optax.curvature._eigenbasis import safe_eigh

    fallback_vals, fallback_basis = jnp.arange(3.0), jnp.eye(3)[::-1]
    bad = jnp.eye(3).at[1, 2].set(jnp.nan)
    vals, basis, ok = jax.jit(safe_eigh)(bad, fallback_vals, fallback_basis)
    assert not bool(ok)
    np.testing.assert_array_equal(vals, fallback_vals)
    np.testing.assert_array_equal(basis, fallback_basis)
    # A PSD factor with round-off: eigenvalues clipped at 0, reconstruction exact.
    v = jax.random.normal(jax.random.key(0), (5, 2), jnp.float64)
    factor = v @ v.T
    vals, basis, ok = safe_eigh(factor, jnp.zeros(5), jnp.eye(5))
    assert bool(ok) and bool(jnp.all(vals >= 0))
    np.testing.assert_allclose(basis @ jnp.diag(vals) @ basis.T, factor, atol=1e-12)


def test_all_finite_sees_every_nonfinite_number_and_only_those():
    """The guard's check sums each array: an infinity of either sign and a NaN show (``inf -
    inf`` is NaN), integers are not checked, and half-precision arrays whose sum exceeds their
    own range (float16: 65504) are summed in float32, so they are not taken for an overflow."""
    from ekfac_optax.update._step import all_finite

    ones = jnp.ones((4, 3), jnp.float32)
    assert bool(all_finite({"a": ones, "ids": jnp.arange(5)}))
    assert bool(all_finite([]))
    assert bool(all_finite(jnp.full((1000,), 6e4, jnp.float16)))  # sum 6e7 > float16's max
    assert not bool(all_finite([ones, ones.at[1, 2].set(jnp.inf), -ones.at[0, 0].set(-jnp.inf)]))
    assert not bool(
        all_finite(
            [ones, ones.at[3, 0].set(jnp.inf)],
        )
    )
    assert not bool(all_finite({"x": jnp.asarray([jnp.nan], jnp.bfloat16), "y": ones}))


def fused_instructions(compiled) -> int:
    """Instructions in the fused computations of a compiled program (most of its size)."""
    return sum(
        block.count("\n")
        for block in compiled.as_text().split("\n\n")
        if "fused_computation" in block.lstrip().split("\n", 1)[0]
    )


def test_guard_program_grows_linearly_with_depth():
    """The guard selects each new array on one flag. XLA once fused the whole chain of checks
    behind that flag into every select: a program growing with arrays times checks (a 12-block
    LM's step compiled in 118 s instead of 11). With the flag computed once, the update's
    program grows linearly with the layers: measured on these MLPs, 3,168 fused instructions
    with 8 layers and 6,263 with 16 (1.98x); with the chain fused into the selects 7,774 and
    24,686 (3.2x). The bound 2.3x separates the two."""
    sizes = []
    x = jnp.ones((4, 5), jnp.float32)
    y = jnp.zeros((4,), jnp.int32)
    for layers in (8, 16):
        model = MLP((8,) * (layers - 1) + (3,), **F32)
        params = model.init(jax.random.key(0), x)["params"]
        loss = classifier_loss(model)
        tx = ek.ekfac(0.1, blocks=ek.find_blocks(loss, params, x, y), scaling="running")
        grad_fn = ek.value_grad_and_stats(loss)

        def step(params, opt_state, tx=tx, grad_fn=grad_fn):
            _, grads, stats = grad_fn(params, x, y)
            return tx.update(grads, opt_state, params, stats=stats)

        sizes.append(fused_instructions(jax.jit(step).lower(params, tx.init(params)).compile()))
    assert sizes[1] <= 2.3 * sizes[0], sizes
