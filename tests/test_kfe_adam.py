"""KFE-Adam (issue 30): Adam in the Kronecker-factored eigenbasis, against first-principles
references in float64.

- Between basis updates KFE-Adam is ``optax.scale_by_adam`` applied to the gradients rotated into
  the eigenbasis, the eigenbasis computed here by ``numpy.linalg.eigh`` of the factors the test
  builds from the captured ``h`` and ``delta`` (``value_grad_and_stats`` is checked against
  hand-written forward passes elsewhere), with distinct eigenvalues so that the basis is unique up
  to signs and order (the update does not depend on either). Diagonal blocks are plain Adam.
  Tolerance ``RTOL = 1e-8`` norm-wise: float64 round-off amplified by ``1 / (√ν̂ + eps)`` over
  five steps (measured ``<= 4.9e-9`` relative to each layer's norm, as compared here: Adam's
  ``g̃ / (√ν̂ + eps)`` is most sensitive at coordinates with ``|g̃|`` near ``eps = 1e-8``, where
  the eigenbases' ``1e-16 / gap`` differences between numpy and JAX show most; a thin margin);
  KFE-Adam differs from plain Adam by far more (asserted).
- A basis change keeps what ``nu`` knows of each new eigenvector (the old second-moment matrix's
  diagonal in the new basis, ``diag(Qᵀ M Q)``, weighted in log space by each new vector's
  overlap with an old one) and takes the rest from KFAC's eigenvalues, checked against dense
  ``np.kron`` matrices; a refresh that finds the same basis leaves the trajectory unchanged (a
  model whose factors do not change).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import kinds_reference as kr
import numpy as np
import optax
import pytest
import reference as ref
from helpers import (
    NormClassifier,
    TiedLM,
    assert_trees_close,
    classifier_loss,
    init_params,
    lm_loss,
    lm_token_batch,
    normal_batch,
    train,
    train_step,
)

import ekfac_optax as ek

F64 = jnp.float64
RTOL = 1e-8  # see the module docstring
LR = 0.05
B1, B2, EPS = 0.9, 0.99, 1e-8


Net = NormClassifier
loss_fn = classifier_loss(Net())


def eigenbases(stats):
    """``{layer: (U_A, U_B)}`` from numpy's ``eigh`` of the one-batch factors ``A = mean h_aug
    h_augᵀ``, ``B = mean δ δᵀ`` built from the captured stats (distinct eigenvalues asserted)."""
    out = {}
    for layer in ("hidden", "out"):
        h = ref.augment(np.asarray(stats[layer].h), True).reshape(-1, 5 if layer == "hidden" else 7)
        delta = np.asarray(stats[layer].delta).reshape(h.shape[0], -1)
        bases = []
        for factor in (h.T @ h / len(h), delta.T @ delta / len(delta)):
            eigvals, basis = np.linalg.eigh(factor)
            kr.assert_distinct(eigvals)
            bases.append(basis)
        out[layer] = tuple(bases)
    return out


def rotated_adam_updates(params, batch, steps):
    """The reference: ``optax.scale_by_adam`` on ``{layer: U_Aᵀ [W; b] U_B}`` (the norm's scale
    and shift as they are), rotated back, ``steps`` steps of ``-LR`` times it."""
    _, _, stats = ek.value_grad_and_stats(loss_fn)(params, *batch)
    bases = eigenbases(stats)
    adam = optax.scale_by_adam(B1, B2, EPS)
    state, updates = None, []
    for _ in range(steps):
        grads = jax.grad(loss_fn)(params, *batch)
        rotated = {"norm": grads["norm"]}
        for layer, (basis_a, basis_b) in bases.items():
            rotated[layer] = basis_a.T @ ref.block_matrix(grads[layer]) @ basis_b
        state = adam.init(rotated) if state is None else state
        step, state = adam.update(rotated, state)
        update = {"norm": step["norm"]}
        for layer, (basis_a, basis_b) in bases.items():
            matrix = basis_a @ np.asarray(step[layer]) @ basis_b.T
            update[layer] = {"kernel": matrix[:-1], "bias": matrix[-1]}
        updates.append(update)
        params = jax.tree.map(lambda p, u: p - LR * u, params, update)
    return updates


def test_kfe_adam_is_adam_on_the_rotated_gradients_over_a_basis_period():
    """Five steps of ``scale_by_kfe_adam`` (basis every 5 updates, one-batch factors) on one
    batch equal ``optax.scale_by_adam`` on the gradients rotated into the eigenbasis of step 0;
    the norm's scale and shift get plain Adam."""
    x, y = normal_batch(3, (32, 4), (32,), classes=3)
    params = init_params(Net(), x)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    assert {s.block for s in blocks.values()} == {"kronecker", "diagonal"}
    tx = ek.scale_by_kfe_adam(
        blocks=blocks, b1=B1, b2=B2, eps=EPS, basis_update_every=5, factor_decay=0.0
    )
    expected = rotated_adam_updates(params, (x, y), 5)
    step = jax.jit(
        lambda p, s: tx.update(
            ek.value_grad_and_stats(loss_fn)(p, x, y)[1],
            s,
            p,
            stats=ek.value_grad_and_stats(loss_fn)(p, x, y)[2],
        )
    )
    state, plain_state = tx.init(params), optax.scale_by_adam(B1, B2, EPS).init(params)
    for k, reference in enumerate(expected):
        update, state = step(params, state)
        assert_trees_close(update, reference, f"step {k}", rtol=RTOL)
        plain, plain_state = optax.scale_by_adam(B1, B2, EPS).update(
            jax.grad(loss_fn)(params, x, y), plain_state
        )
        error = ref.relative_error(
            ref.block_matrix(update["hidden"]), ref.block_matrix(plain["hidden"])
        )
        assert error > 1e-2, (k, error)  # not plain Adam
        params = jax.tree.map(lambda p, u: p - LR * u, params, update)
    assert type(state.blocks["hidden"].scalings).__name__ == "AdamSlot"


def test_kfe_adam_basis_change_keeps_what_it_knows_of_each_new_vector():
    """``nu`` after a basis change is ``proj^w · prior^(1 - w)``, computed here from dense
    ``np.kron`` matrices: ``proj`` the diagonal, in the new basis, of the old second-moment
    matrix ``(U_A ⊗ U_B) diag(nu) (U_A ⊗ U_B)ᵀ``, ``w`` each new vector pair's largest squared
    overlap with an old one, ``prior`` KFAC's eigenvalues scaled to ``nu``'s sum or the bias-
    corrected first moment's square in the new basis, whichever is larger; ``mu`` is unchanged;
    an unchanged basis (up to the signs of its vectors) leaves ``nu`` exactly as it was."""
    from ekfac_optax.curvature import _eigenbasis, _scalings

    rng = np.random.default_rng(0)
    a, b, count = 4, 3, 5
    old = [np.linalg.qr(rng.normal(size=(d, d)))[0] for d in (a, b)]
    new = [np.linalg.qr(rng.normal(size=(d, d)))[0] for d in (a, b)]
    mu, nu, kfac = rng.normal(size=(a, b)), rng.random((a, b)) * 1e-3, rng.random((a, b))
    slot = _scalings.AdamSlot(jnp.asarray(mu), jnp.asarray(nu))
    rule = _scalings.AdamScaling()

    def change(rotations, basis):
        def to_kfe(m):
            return _eigenbasis.to_eigenbasis(m, *(jnp.asarray(u) for u in basis))

        return _scalings.BasisChange(jnp.asarray(kfac), *rotations, to_kfe, jnp.asarray(count))

    rotations = [jnp.asarray(o.T @ n) for o, n in zip(old, new, strict=True)]
    out = rule.restart(slot, change(rotations, new))
    old_kron, new_kron = np.kron(*old), np.kron(*new)
    second = old_kron @ np.diag(nu.ravel()) @ old_kron.T
    proj = np.diag(new_kron.T @ second @ new_kron).reshape(a, b)
    w = np.outer(*((np.asarray(r) ** 2).max(axis=0) for r in rotations))
    first = (new_kron.T @ mu.ravel()).reshape(a, b) / (1 - 0.9**count)
    prior = np.maximum(kfac * nu.sum() / kfac.sum(), first**2 * (1 - 0.999**count))
    np.testing.assert_allclose(out.nu, proj**w * prior ** (1 - w), rtol=1e-12)
    np.testing.assert_array_equal(out.mu, slot.mu)
    assert ref.relative_error(np.asarray(out.nu), proj) > 1e-2  # the prior counts
    signs = [np.diag(rng.choice([-1.0, 1.0], d)) for d in (a, b)]
    flipped = [o @ s for o, s in zip(old, signs, strict=True)]
    same_rotations = [jnp.asarray(o.T @ f) for o, f in zip(old, flipped, strict=True)]
    same = rule.restart(slot, change(same_rotations, flipped))
    np.testing.assert_allclose(same.nu, slot.nu, rtol=1e-14)


class LinearLoss(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, param_dtype=F64, name="layer")(x)


def test_kfe_adam_refresh_with_an_unchanged_basis_keeps_the_trajectory():
    """A loss linear in the layer's output (``delta`` constant) on one batch: the factors, hence
    the basis, are the same at every refresh, so refreshing every update gives the trajectory
    of refreshing once."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4)))
    c = jnp.asarray(np.random.default_rng(2).normal(size=(16, 3)))

    def linear_loss(params, x, c):
        return jnp.mean(jnp.sum(c * LinearLoss().apply({"params": params}, x), axis=-1))

    params = init_params(LinearLoss(), x)
    blocks = ek.find_blocks(linear_loss, params, x, c)
    trajectories = []
    for every in (1, 100):
        tx = optax.chain(
            ek.scale_by_kfe_adam(blocks=blocks, basis_update_every=every, factor_decay=0.0),
            optax.scale(-LR),
        )
        final, _, losses = train(train_step(linear_loss, tx), params, tx.init(params), [(x, c)] * 6)
        trajectories.append((final, losses))
    assert_trees_close(trajectories[0][0], trajectories[1][0], "refreshed", rtol=1e-12)
    assert trajectories[0][1][-1] < trajectories[0][1][0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(b1=1.0), r"b1 must be in \[0, 1\), got 1\.0"),
        (dict(b2=-0.1), r"b2 must be in \[0, 1\), got -0\.1"),
        (dict(eps=-1e-8), r"eps must be >= 0, got -1e-08"),
    ],
)
def test_kfe_adam_bad_hyperparameters_raise_at_construction(kwargs, message):
    x, y = normal_batch(3, (8, 4), (8,), classes=3)
    blocks = ek.find_blocks(loss_fn, init_params(Net(), x), x, y)
    with pytest.raises(ValueError, match=message):
        ek.scale_by_kfe_adam(blocks=blocks, **kwargs)


def test_kfe_adamw_with_inject_hyperparams_and_a_schedule_trains():
    """``optax.inject_hyperparams(ek.kfe_adamw)`` with a learning-rate schedule, ``b1``, ``b2``
    and ``weight_decay`` as state: changing ``b2`` in the state does not retrace and changes the
    update; 20 steps lower the loss by a quarter."""
    x, y = normal_batch(4, (32, 4), (32,), classes=3)
    params = init_params(Net(), x)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    schedule = optax.linear_schedule(0.03, 0.01, 20)
    tx = optax.inject_hyperparams(ek.kfe_adamw)(
        learning_rate=schedule, blocks=blocks, b1=0.9, b2=0.99, weight_decay=1e-3
    )
    state = tx.init(params)
    assert {"learning_rate", "b1", "b2", "weight_decay"} <= set(state.hyperparams)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
    update = jax.jit(lambda g, s: tx.update(g, s, params, stats=stats))
    first, _ = update(grads, state)
    hyper = dict(state.hyperparams, b2=jnp.asarray(0.5, state.hyperparams["b2"].dtype))
    second, _ = update(grads, state._replace(hyperparams=hyper))
    assert update._cache_size() == 1
    assert ref.relative_error(ref.block_matrix(second["out"]), ref.block_matrix(first["out"])) > 0
    _, _, losses = train(train_step(loss_fn, tx), params, state, [(x, y)] * 20)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("cap", [None, 8], ids=["uncapped", "capped"])
def test_kfe_adam_trains_a_tied_language_model_in_bfloat16(cap):
    """The small language model of ``helpers`` (tied embedding, RMSNorm, GLU) in
    bfloat16 compute, with every side above ``max_factor_dim`` (``cap``) diagonal: 30 steps of
    ``ek.kfe_adam`` (learning rate 1e-2) lower the next-token loss below 60% of its start, with
    a float32 ``AdamSlot`` on every block and fallback-free model."""
    model = TiedLM(dtype=jnp.bfloat16)
    loss = lm_loss(model)
    ids, labels = lm_token_batch(0)
    params = model.init(jax.random.key(0), ids)["params"]
    blocks = ek.find_blocks(loss, params, ids, labels)
    tx = ek.kfe_adam(1e-2, blocks=blocks, max_factor_dim=cap)
    final, state, losses = train(
        train_step(loss, tx), params, tx.init(params), [lm_token_batch(s) for s in range(30)]
    )
    assert int(state[0].skipped) == 0
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    slots = {path: block.scalings for path, block in state[0].blocks.items()}
    assert all(isinstance(slot, ek.AdamSlot) for slot in slots.values()), slots
    if cap is not None:
        assert state[0].blocks["up"].basis_b is None  # 16 > 8: the identity basis


def test_momentum_for_ekfac_is_a_trace_of_the_preconditioned_updates():
    """The README's momentum recipe: ``optax.chain(scale_by_ekfac, optax.trace(0.9))`` gives
    ``m_k = 0.9 m_{k-1} + u_k`` of the preconditioned updates ``u_k`` of ``scale_by_ekfac`` alone
    on the same gradients and stats (equal to round-off)."""
    x, y = normal_batch(5, (32, 4), (32,), classes=3)
    params = init_params(Net(), x)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    alone = ek.scale_by_ekfac(blocks=blocks)
    chained = optax.chain(ek.scale_by_ekfac(blocks=blocks), optax.trace(decay=0.9))
    state_alone, state_chained, momentum = alone.init(params), chained.init(params), None
    for k in range(3):
        xk, yk = normal_batch(10 + k, (32, 4), (32,), classes=3)
        _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, xk, yk)
        u, state_alone = alone.update(grads, state_alone, params, stats=stats)
        m, state_chained = chained.update(grads, state_chained, params, stats=stats)
        momentum = u if momentum is None else jax.tree.map(lambda a, b: 0.9 * a + b, momentum, u)
        assert_trees_close(m, momentum, f"step {k}", rtol=1e-12)


def test_summary_of_kfe_adam_counts_its_two_moments():
    """``ek.summary(..., tx=ek.kfe_adam(...))``: each block's state bytes are those of its
    ``init`` (factors, bases and the two moments) and the total that of the whole chain's state;
    EKFAC's summary of the same model is smaller by one moment per weight; a chain without a
    preconditioner of ours is a TypeError."""
    x, y = normal_batch(3, (8, 4), (8,), classes=3)
    params = init_params(Net(), x)
    blocks = ek.find_blocks(loss_fn, params, x, y)
    tx = ek.kfe_adam(1e-2, blocks=blocks)
    state = tx.init(params)
    info = ek.summary(params, blocks, tx=tx)

    def nbytes(tree):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

    assert info.state_bytes == nbytes(state)
    rows = {row.path: row for row in info.rows}
    assert rows["hidden/bias"].state_bytes == nbytes(state[0].blocks["hidden"])
    # One more array of each parameter's size (every parameter is in a block; float64).
    assert info.state_bytes - ek.summary(params, blocks).state_bytes == info.param_bytes
    assert "Adam" not in ek.summarize(params, blocks)
    with pytest.raises(TypeError, match="no ScaleByEkfacState"):
        ek.summary(params, blocks, tx=optax.adam(1e-3))
