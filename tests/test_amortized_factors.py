"""Factor statistics amortized over updates (``factor_update_every``, issue 32), against the
independent reference (``reference.py``): the factors average only the batches of updates
``0, m, 2m, ...`` (debiased by their number) and KFAC's update on a basis refresh is the dense
solve with those factors."""

import jax
import jax.numpy as jnp
import optax
import pytest
import reference

import ekfac_optax as ek

DECAY, DAMPING = 0.9, 1e-2


def _expected_factors(batches, problem, params, every):
    """Per layer, ``(A, B)`` after each update: the debiased average of the factor updates'
    batches, unchanged between them."""
    out, current, k = [], {}, 0
    for i, (x, y) in enumerate(batches):
        if i % every == 0:
            k += 1
            weight = (1 - DECAY) / (1 - DECAY**k)
            for name, layer in problem.references(params, x, y).items():
                fresh = (layer.factor_a, layer.factor_b)
                old = current.get(name, fresh)
                current[name] = tuple(
                    (1 - weight) * o + weight * f for o, f in zip(old, fresh, strict=True)
                )
        out.append(dict(current))
    return out


@pytest.mark.parametrize("make", [ek.scale_by_kfac, ek.scale_by_ekfac], ids=["kfac", "ekfac"])
def test_factors_average_every_mth_batch_and_kfac_solves_with_them(make):
    problem = reference.PROBLEMS["mlp"]
    params = problem.params
    batches = [problem.batch(seed) for seed in range(10, 15)]
    every = 2
    blocks = ek.find_blocks(problem.loss_fn, params, *batches[0])
    tx = make(
        blocks=blocks,
        damping=DAMPING,
        factor_decay=DECAY,
        factor_update_every=every,
        basis_update_every=every,
    )
    capture = ek.value_grad_and_stats(problem.loss_fn)

    @jax.jit
    def update(state, x, y):  # params fixed: every batch's reference at the same params
        _, grads, stats = capture(params, x, y)
        return tx.update(grads, state, params, stats=stats)

    state = tx.init(params)
    expected = _expected_factors(batches, problem, params, every)
    for i, (x, y) in enumerate(batches):
        updates, state = update(state, x, y)
        for name, (factor_a, factor_b) in expected[i].items():
            block = state.blocks[name]
            # float64 means of a few hundred products: round-off ~1e-15 relative.
            assert reference.relative_error(block.factor_a, factor_a) < 1e-12, (i, name)
            assert reference.relative_error(block.factor_b, factor_b) < 1e-12, (i, name)
        if make is ek.scale_by_kfac and i % every == 0:
            for name, layer in problem.references(params, x, y).items():
                factor_a, factor_b = expected[i][name]
                matrix = reference.kfac_matrix(factor_a, factor_b, 1, DAMPING, "tikhonov")
                solved = reference.solve(matrix, layer.grad)
                actual = reference.block_matrix(updates[name])
                # a dense solve against eigh-based inverse, condition ~1e3: ~1e-12 measured.
                assert reference.relative_error(actual, solved) < 1e-9, (i, name)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, jnp.asarray(0)])
def test_bad_factor_update_every_is_a_clear_error(bad):
    problem = reference.PROBLEMS["mlp"]
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    with pytest.raises(ValueError, match="factor_update_every must be an int >= 1"):
        ek.ekfac(0.1, blocks=blocks, factor_update_every=bad)


def test_factor_update_every_through_inject_hyperparams():
    """As an injected hyperparameter (an array), the amortized path runs as with the int."""
    problem = reference.PROBLEMS["mlp"]
    params = problem.params
    blocks = ek.find_blocks(problem.loss_fn, params, *problem.data)
    capture = ek.value_grad_and_stats(problem.loss_fn)
    plain = ek.ekfac(0.1, blocks=blocks, factor_update_every=2)
    injected = optax.inject_hyperparams(ek.ekfac, static_args=("blocks",))(
        0.1, blocks=blocks, factor_update_every=2
    )
    states = plain.init(params), injected.init(params)
    for seed in range(3):
        _, grads, stats = capture(params, *problem.batch(seed))
        u_plain, s_plain = plain.update(grads, states[0], params, stats=stats)
        u_inj, s_inj = injected.update(grads, states[1], params, stats=stats)
        for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_inj), strict=True):
            assert reference.relative_error(a, b) < 1e-12
        states = s_plain, s_inj
