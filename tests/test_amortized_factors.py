"""Factor statistics amortized over updates (``factor_update_every``, issue 32), against the
independent reference (``reference.py``): the factors average only the batches of updates
``0, m, 2m, ...`` (debiased by their number) and KFAC's update on a basis refresh is the dense
solve with those factors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


VOCAB, WIDTH, LENGTH = 7, 3, 4


class EmbedThenDense(nn.Module):
    """A token embedding and a Dense head per position: an embedding block and a Kronecker one."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, WIDTH, param_dtype=jnp.float64, name="embed")(ids)
        return nn.Dense(3, param_dtype=jnp.float64, name="head")(x)


def _token_batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (5, LENGTH))
    return jnp.asarray(ids), jnp.asarray(rng.integers(0, 3, (5, LENGTH)))


def test_an_embeddings_factors_average_every_batch_the_others_every_mth():
    """With ``factor_update_every=m`` an embedding's factors still average every batch (a batch
    sees only some tokens: from every m-th batch alone a token of the others keeps a zero
    frequency), debiased by the number of updates; a Dense block's average every m-th batch.
    References computed here: the embedding's token frequencies and the head's ``E[h_aug
    h_augᵀ]`` (``h`` the embedding's rows, the params fixed), their debiased averages; the
    embedding's ``B`` equals that of ``factor_update_every=1`` on every update."""
    model = EmbedThenDense()
    batches = [_token_batch(seed) for seed in range(6)]
    params = model.init(jax.random.key(0), batches[0][0])["params"]

    def loss_fn(params, ids, labels):
        logits = model.apply({"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    assert (blocks["embed"].block, blocks["head"].block) == ("embed", "kronecker")
    every = 3
    options = dict(blocks=blocks, factor_decay=DECAY, scaling="running", basis_update_every=2)
    amortized = ek.scale_by_ekfac(factor_update_every=every, **options)
    each = ek.scale_by_ekfac(**options)
    capture = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def update(states, ids, labels):  # params fixed: every batch's reference at the same params
        _, grads, stats = capture(params, ids, labels)
        return tuple(
            tx.update(grads, state, params, stats=stats)[1]
            for tx, state in zip((amortized, each), states, strict=True)
        )

    def debiased(values):  # the factors' debiased moving average after each value
        out, current = [], None
        for k, value in enumerate(values, start=1):
            weight = (1 - DECAY) / (1 - DECAY**k)
            current = value if current is None else (1 - weight) * current + weight * value
            out.append(current)
        return out

    table = np.asarray(params["embed"]["embedding"])
    frequencies = [np.bincount(np.ravel(ids), minlength=VOCAB) / ids.size for ids, _ in batches]
    h_aug = [
        np.concatenate([table[np.ravel(ids)], np.ones((ids.size, 1))], axis=1) for ids, _ in batches
    ]
    head_a = debiased([h.T @ h / len(h) for h in h_aug[::every]])
    states = (amortized.init(params), each.init(params))
    for i, (ids, labels) in enumerate(batches):
        states = update(states, ids, labels)
        mine, per_update = states[0].blocks, states[1].blocks
        # float64 means of at most a few dozen products: round-off ~1e-16 relative.
        expected_a = debiased(frequencies[: i + 1])[-1]
        assert reference.relative_error(mine["embed"].factor_a, expected_a) < 1e-12, i
        assert reference.relative_error(mine["embed"].factor_b, per_update["embed"].factor_b) < (
            1e-12
        ), i
        assert reference.relative_error(mine["head"].factor_a, head_a[i // every]) < 1e-12, i
    # The head's factors did change between its factor updates in the per-update run.
    assert reference.relative_error(per_update["head"].factor_a, head_a[-1]) > 1e-3
