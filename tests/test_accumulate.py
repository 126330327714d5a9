"""Gradient accumulation with the curvature accumulated too (``ek.multi_steps``, issue 32).

``k`` micro-batches give the update of one batch of all their examples: exactly for KFAC,
EKFAC-ra and KFE-Adam, and for EKFAC on updates that keep the basis (tested here against the
big-batch optimizer, an exact equivalence); on an update that refreshes the basis EKFAC's ``s*``
is the last micro-batch's in the new basis (tested against the independent reference).
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from helpers import assert_trees_close, init_params, normal_batch

import ekfac_optax as ek
from ekfac_optax.update import _microbatch

# float64: both paths compute the same means, as sums weighted by the micro-batches' sizes
# against one mean; they differ by round-off (~1e-16), which the eigh and the divisions by small
# scalings over a few steps amplify to 1e-11 at most (measured: 1e-13).
RTOL = 1e-9
SIZES = (4, 2, 6)  # micro-batches of different sizes: a real step of 12 examples
EVERY = 3  # basis refreshes on real steps 0 and 3


class NormMLP(nn.Module):
    """Dense layers, a LayerNorm (a diagonal block) and a PReLU (the fallback)."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.LayerNorm()(nn.Dense(6)(x)))
        x = nn.PReLU(param_dtype=jnp.float64)(nn.Dense(5)(x))
        return nn.Dense(3)(x)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        # 2 channels before a 3-class head: every factor has full rank but the head's B (its
        # null space, softmax's, is one direction): an eigenbasis unique up to signs.
        return nn.Dense(3)(jnp.mean(nn.Conv(2, (3, 3), strides=2)(x), axis=(1, 2)))


MODELS = {"mlp": (NormMLP(), (5,)), "cnn": (SmallCNN(), (6, 6, 2))}
METHODS = {
    "ekfac": lambda blocks: ek.ekfac(0.02, blocks=blocks, basis_update_every=EVERY),
    "ekfac_ra": lambda blocks: ek.ekfac(
        0.02, blocks=blocks, scaling="running", basis_update_every=EVERY
    ),
    "kfac": lambda blocks: ek.kfac(0.02, blocks=blocks, basis_update_every=EVERY),
    # The clip (its count, in the state, advances on real steps only) around EKFAC-ra, with a
    # schedule; the bound 5e-3 is above the first step's squared norm (1.9e-3, measured) and
    # below the later ones' (7.7e-3 to 1.7e-2): both sides of it are taken.
    "ekfac_ra_clipped": lambda blocks: ek.ekfac(
        optax.linear_schedule(0.02, 0.05, 5),
        blocks=blocks,
        scaling="running",
        basis_update_every=EVERY,
        norm_constraint=5e-3,
    ),
    # eps 1e-4: Adam's first steps are about g̃ / (|g̃| + eps), whose round-off grows like
    # 1 / (|g̃| + eps) on the tiny components of g̃; 1e-4 bounds that growth below RTOL.
    "kfe_adam": lambda blocks: ek.kfe_adamw(
        1e-2, blocks=blocks, basis_update_every=EVERY, weight_decay=1e-2, eps=1e-4
    ),
}


def _problem(model_name):
    model, shape = MODELS[model_name]
    x, y = normal_batch(0, (sum(SIZES), *shape), (sum(SIZES),))
    params = init_params(model, x, dtype=jnp.float64)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn, params, ek.find_blocks(loss_fn, params, x, y)


def _micro_batches(x, y):
    bounds = np.cumsum((0, *SIZES))
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _steps(loss_fn, big, accumulated):
    grad_fn = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def big_step(params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        updates, state = big.update(grads, state, params, stats=stats)
        return updates, state

    @jax.jit
    def micro_step(params, state, x, y):
        _, grads, stats = grad_fn(params, x, y)
        return accumulated.update(grads, state, params, stats=stats)

    return big_step, micro_step


def _assert_micro_batches_equal_the_big_batch(loss_fn, params, make, batches):
    """Each real step of ``multi_steps(make(), len(SIZES))`` over the micro-batches of a batch
    equals ``make()``'s step on the whole batch, updates and state (each real step starts both
    from the big batch's params and state)."""
    big, accumulated = make(), ek.multi_steps(make(), len(SIZES))
    big_step, micro_step = _steps(loss_fn, big, accumulated)
    big_state, acc_state = big.init(params), accumulated.init(params)
    p = params
    for step, (x, y) in enumerate(batches):
        expected, big_state = big_step(p, big_state, x, y)
        for xm, ym in _micro_batches(x, y):
            updates, acc_state = micro_step(p, acc_state, xm, ym)
        assert_trees_close(updates, expected, f"step {step}", rtol=RTOL)
        assert_trees_close(acc_state.inner_state, big_state, f"state {step}", rtol=RTOL)
        p = optax.apply_updates(p, expected)
        acc_state = acc_state._replace(inner_state=big_state)


# Every method on the MLP; on the CNN EKFAC alone, which accumulates the conv factors as the
# others do, and s* of conv patches besides.
CASES = [(method, "mlp") for method in METHODS] + [("ekfac", "cnn")]


@pytest.mark.parametrize(("method", "model_name"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_micro_batches_give_the_update_of_their_union(method, model_name):
    """``k`` micro-batches of different sizes = one batch of all their examples, step after step
    (two basis refreshes; the factors' moving averages, EKFAC-ra's running scalings and Adam's
    moments carried). Each real step starts both from the big batch's params and state, so that
    a step's round-off is not amplified by the next steps (KFAC's and EKFAC's steps of ~g / damping
    along low-curvature directions), and EKFAC's ``s*`` on a refresh step is the last
    micro-batch's (tested below), so that step is not compared."""
    loss_fn, params, blocks = _problem(model_name)
    big, accumulated = METHODS[method](blocks), ek.multi_steps(METHODS[method](blocks), 3)
    big_step, micro_step = _steps(loss_fn, big, accumulated)
    big_state, acc_state = big.init(params), accumulated.init(params)
    p_big = params
    for step in range(5):
        refresh = step % EVERY == 0
        x, y = normal_batch(10 + step, (sum(SIZES), *MODELS[model_name][1]), (sum(SIZES),))
        expected, big_state = big_step(p_big, big_state, x, y)
        for i, (xm, ym) in enumerate(_micro_batches(x, y)):
            updates, acc_state = micro_step(p_big, acc_state, xm, ym)
            if i < len(SIZES) - 1:  # a micro-step updates nothing
                assert all(not np.any(u) for u in jax.tree.leaves(updates))
                assert int(acc_state.mini_step) == i + 1
        if not (method == "ekfac" and refresh):
            assert_trees_close(updates, expected, f"{method} step {step}", rtol=RTOL)
            assert_trees_close(acc_state.inner_state, big_state, f"state {step}", rtol=RTOL)
        assert int(acc_state.gradient_step) == step + 1
        p_big = optax.apply_updates(p_big, expected)
        acc_state = acc_state._replace(inner_state=big_state)


def test_ekfac_refresh_step_takes_s_star_of_the_last_micro_batch_in_the_new_basis():
    """On an update that refreshes the basis: the factors of all the micro-batches, the basis of
    those, ``s*`` of the last micro-batch in it, the mean gradient of all, against the
    independent reference (``reference.py``: per-example gradients by ``jax.vmap(jax.grad)``,
    ``h`` and ``delta`` from a hand-written forward pass)."""
    problem = reference.PROBLEMS["mlp"]
    params, (x, y) = problem.params, problem.data
    sizes = (10, 6, 8)  # problem.batch_size = 24
    damping = 1e-3
    blocks = ek.find_blocks(problem.loss_fn, params, x, y)
    tx = ek.multi_steps(ek.scale_by_ekfac(blocks=blocks, damping=damping), len(sizes))
    state = tx.init(params)
    bounds = np.cumsum((0, *sizes))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        _, grads, stats = ek.value_grad_and_stats(problem.loss_fn)(params, x[a:b], y[a:b])
        updates, state = tx.update(grads, state, params, stats=stats)
    whole = problem.references(params, x, y)
    last = problem.references(params, x[bounds[-2] :], y[bounds[-2] :])
    for name, layer in whole.items():
        basis_a = np.linalg.eigh(layer.factor_a)[1]
        basis_b = np.linalg.eigh(layer.factor_b)[1]
        s_star = np.mean(reference.to_kfe(last[name].per_example, basis_a, basis_b) ** 2, axis=0)
        grad_kfe = reference.to_kfe(layer.grad, basis_a, basis_b)
        expected = basis_a @ (grad_kfe / (s_star + damping)) @ basis_b.T
        actual = reference.block_matrix(updates[name])
        # float64 through one eigh and a division by s* + 1e-3: relative error ~1e-12 measured.
        assert reference.relative_error(actual, expected) < 1e-9, name


def test_plain_optax_inner_is_optax_multi_steps():
    """Without a preconditioner inside, equal micro-batches give optax.MultiSteps' updates."""
    loss_fn, params, _ = _problem("mlp")
    adam = optax.adam(1e-2)
    # optax accumulates in float32 unless told: float64, as ours (the gradients' dtype)
    ours = ek.multi_steps(adam, 2)
    theirs = optax.MultiSteps(adam, 2, accumulator_dtype=jnp.float64)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for step in range(4):
        x, y = normal_batch(step, (4, 5), (4,))
        grads = jax.grad(loss_fn)(params, x, y)
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
        # A sum of two then a division against optax's running mean: round-off (1e-16) that
        # Adam's first steps, about g / (|g| + eps), grow on the tiny gradients.
        assert_trees_close(u_ours, u_theirs, f"step {step}", rtol=1e-10)
        params = optax.apply_updates(params, u_ours)


def test_schedule_of_micro_batches_and_inject_hyperparams():
    """``every_k_schedule`` as a function of the real steps; a preconditioner inside
    ``optax.inject_hyperparams`` accumulates as well."""
    loss_fn, params, blocks = _problem("mlp")
    inner = optax.inject_hyperparams(ek.ekfac, static_args=("blocks",))(0.1, blocks=blocks)
    tx = ek.multi_steps(inner, lambda step: jnp.where(step == 0, 1, 2))
    state = tx.init(params)
    grad_fn = jax.jit(ek.value_grad_and_stats(loss_fn))
    update = jax.jit(tx.update)
    emitted = []
    for step in range(5):
        x, y = normal_batch(step, (4, 5), (4,))
        _, grads, stats = grad_fn(params, x, y)
        updates, state = update(grads, state, params, stats=stats)
        emitted.append(any(np.any(u) for u in jax.tree.leaves(updates)))
    assert emitted == [True, False, True, False, True]
    assert int(state.gradient_step) == 3
    inner_count = jax.tree.leaves(
        state.inner_state, is_leaf=lambda s: isinstance(s, ek.ScaleByEkfacState)
    )
    assert [int(s.count) for s in inner_count if isinstance(s, ek.ScaleByEkfacState)] == [3]


def test_non_finite_micro_batch_rejects_the_real_step_and_drops_the_sums():
    """A NaN in one micro-batch's statistics: the real step changes nothing but ``skipped``,
    the sums start again, and the next real step is the one of its own micro-batches alone."""
    loss_fn, params, blocks = _problem("mlp")
    make = lambda: ek.multi_steps(ek.ekfac(0.1, blocks=blocks, scaling="running"), 2)  # noqa: E731
    tx, clean = make(), make()
    state, clean_state = tx.init(params), clean.init(params)
    grad_fn = ek.value_grad_and_stats(loss_fn)
    x, y = normal_batch(0, (4, 5), (4,))
    _, grads, stats = grad_fn(params, x, y)
    poisoned = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), stats)
    _, state = tx.update(grads, state, params, stats=poisoned)
    updates, state = tx.update(grads, state, params, stats=stats)
    assert all(not np.any(u) for u in jax.tree.leaves(updates))
    inner = state.inner_state[0]
    assert int(inner.skipped) == 1 and int(inner.count) == 0
    assert int(state.n) == 0 and all(not np.any(p) for p in jax.tree.leaves(state.pending))
    u1, s1 = _two_micro_steps(tx, state, grads, params, stats)
    u2, _ = _two_micro_steps(clean, clean_state, grads, params, stats)
    assert_trees_close(u1, u2, "after a rejected step", rtol=1e-12)
    assert int(s1.inner_state[0].count) == 1


def _two_micro_steps(tx, state, grads, params, stats):
    for _ in range(2):
        updates, state = tx.update(grads, state, params, stats=stats)
    return updates, state


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_every_k_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="every_k_schedule must be an int >= 1"):
        ek.multi_steps(optax.sgd(0.1), bad)


def _count(jaxpr, primitive: str) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == primitive
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count(sub, primitive)
    return count


def test_a_micro_step_runs_no_preconditioner_step():
    """The update is one ``lax.cond``: its micro-step branch holds no ``eigh`` (nor the rest of
    a preconditioner step), its real-step branch holds them all."""
    loss_fn, params, blocks = _problem("mlp")
    tx = ek.multi_steps(ek.ekfac(0.1, blocks=blocks), 4)
    state = tx.init(params)
    x, y = normal_batch(0, (4, 5), (4,))
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
    jaxpr = jax.make_jaxpr(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, state, stats)
    (cond,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    micro, real = cond.params["branches"]  # lax.cond(last, real_step, micro_step)
    assert _count(micro.jaxpr, "eigh") == 0
    assert _count(real.jaxpr, "eigh") == 2 * 3  # both sides of the three Dense layers


class EmbedMLP(nn.Module):
    """A token embedding (factors on every update, also when the others' are amortized), mean
    over the sequence, a Dense head."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(7, 2, param_dtype=jnp.float64)(ids)  # B: full rank (2 = classes - 1)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.mean(x, axis=1))


def test_micro_batches_with_amortized_factors_and_an_embedding():
    """With ``factor_update_every=2``, the micro-steps add an embedding's factors on every real
    step and the Dense head's on every other: the accumulated updates and states equal the
    big-batch optimizer's (EKFAC-ra and KFE-Adam, exact)."""
    model = EmbedMLP()
    rng = np.random.default_rng(7)
    batches = [
        (jnp.asarray(rng.integers(0, 7, (sum(SIZES), 3))), jnp.asarray(rng.integers(0, 3, 12)))
        for _ in range(4)
    ]
    params = init_params(model, batches[0][0], dtype=jnp.float64)

    def loss_fn(params, ids, y):
        logits = model.apply({"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    assert {s.block for s in blocks.values()} == {"embed", "kronecker"}
    for make in (
        lambda: ek.ekfac(0.02, blocks=blocks, scaling="running", factor_update_every=2),
        lambda: ek.kfe_adam(1e-2, blocks=blocks, factor_update_every=2, eps=1e-4),
    ):
        _assert_micro_batches_equal_the_big_batch(loss_fn, params, make, batches)


def test_an_accumulating_state_needs_micro_batch_stats():
    """The preconditioner's update called with an accumulating state but plain stats (not
    through ``multi_steps``) is a TypeError that says what it got."""
    loss_fn, params, blocks = _problem("mlp")
    tx = ek.scale_by_ekfac(blocks=blocks)
    x, y = normal_batch(0, (4, 5), (4,))
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
    state = ek.multi_steps(tx, 2).init(params)
    wrapped = _microbatch.Accumulating(state.inner_state, state.pending[0])
    with pytest.raises(TypeError, match="needs stats of a micro-batch"):
        tx.update(grads, wrapped, params, stats=stats)


@pytest.mark.parametrize(
    "options",
    [dict(factor_update_every=2), dict(factor_decay=0.0, basis_update_every=2)],
    ids=["factor_update_every", "one_batch_factors"],
)
def test_micro_batches_with_amortized_or_one_batch_factors(options):
    """The micro-steps of real steps that do not read the factors skip them (``factors_used``);
    the real steps that do read them see all the micro-batches' (EKFAC-ra, exact)."""
    loss_fn, params, blocks = _problem("mlp")

    def make():
        return ek.ekfac(0.02, blocks=blocks, scaling="running", **options)

    batches = [normal_batch(20 + step, (sum(SIZES), 5), (sum(SIZES),)) for step in range(4)]
    _assert_micro_batches_equal_the_big_batch(loss_fn, params, make, batches)
