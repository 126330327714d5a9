"""The library's EKFAC/KFAC updates against the dense float64 reference of ``reference.py``.

The reference builds the Fisher approximations as explicit ``np.kron`` matrices from per-example
gradients (``jax.vmap(jax.grad(...))``) and independently computed ``h``/``delta``, and solves
with ``np.linalg.solve``. Only the public API of ``ekfac_optax`` is used.

Tolerances: every damped matrix solved here has a condition number below ``1e5`` (asserted), so
a float64 solve (unit round-off 1.1e-16) is accurate to about ``1e5 · 1e-16 = 1e-11`` relative;
the batches have ``N · T > d_in + 1`` for every layer, so the factors have distinct eigenvalues
and numpy's and JAX's ``eigh`` agree on the eigenvectors (up to signs, which cancel) to about
``1e-16 / relative gap``. The measured errors are below ``2e-13``. The norm-wise relative
tolerance ``1e-8`` keeps a wide margin, while a modelling error (a missing ``T``, a wrong basis,
a biased average) changes an update by ``1e-2`` or more; the tests check that the references
are that far from the identity and from a fresh-basis update, so the comparisons are not vacuous.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
import reference as ref

import ekfac_optax as ek

DAMPING = 1e-3
RTOL = 1e-8  # norm-wise, see the module docstring
MAX_COND = 1e5
MODES = [
    ("ekfac", "tikhonov"),
    ("ekfac", "factored"),
    ("kfac", "tikhonov"),
    ("kfac", "factored"),
]


def make_tx(method: str, **kwargs) -> optax.GradientTransformationExtraArgs:
    if method == "ekfac":
        return ek.scale_by_ekfac(scaling="batch", **kwargs)
    return ek.scale_by_kfac(**kwargs)


def problem_blocks(problem: ref.Problem) -> dict:
    """``ek.find_blocks`` of the problem's loss on its batch: one Kronecker block per layer."""
    blocks = ek.find_blocks(problem.loss_fn, problem.params, *problem.data)
    assert sorted(blocks) == sorted(problem.params)
    assert {spec.block for spec in blocks.values()} == {"kronecker"}
    return blocks


def library_step(tx, loss_fn):
    """``jax.jit((params, state, x, y) -> (updates, state))``: capture, then ``tx.update``."""

    @jax.jit
    def step(params, state, x, y):
        _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
        return tx.update(grads, state, params, stats=stats)

    return step


def reference_update(layer: ref.LayerReference, method: str, damping_mode: str) -> np.ndarray:
    """The dense-solve update of one layer on its own batch, with a condition-number check."""
    matrix = ref.layer_matrix(layer, method, DAMPING, damping_mode)
    assert np.linalg.cond(matrix) < MAX_COND
    return ref.solve(matrix, layer.grad)


# --- The reference validates itself ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ref.PROBLEMS))
def test_reference_forward_is_the_flax_model(name):
    """The hand-written forward pass (conv: explicit patches) computes the Flax model's output."""
    problem = ref.PROBLEMS[name]
    x, _ = problem.data
    expected = jax.jit(problem.model.apply)({"params": problem.params}, x)
    actual = jax.jit(ref.hand_forward, static_argnums=0)(problem.forward, problem.params, x)
    # Same products summed in a different order (patches @ kernel vs lax conv): round-off only.
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", sorted(ref.PROBLEMS))
def test_reference_h_delta_give_per_example_grads(name):
    """``G_n = Σ_t h_aug_{n,t} delta_{n,t}ᵀ`` for the reference ``h``, ``delta`` and ``G_n`` from
    ``jax.vmap(jax.grad(...))``: validates the reference ``h`` and ``delta`` (and ``T``)."""
    problem = ref.PROBLEMS[name]
    assert set(problem.layers) == set(problem.params)  # every layer is a Kronecker block
    for layer in problem.layers.values():
        h_aug = ref.augment(layer.h, layer.has_bias)
        from_stats = np.einsum("nti,nto->nio", h_aug, layer.delta)
        # A sum of T products against autodiff's own sum: round-off only.
        assert ref.relative_error(from_stats, layer.per_example) < 1e-12
        np.testing.assert_allclose(layer.grad, layer.per_example.mean(axis=0))


@pytest.mark.parametrize("name", sorted(ref.PROBLEMS))
def test_reference_kfac_factored_is_ekfac_factored_with_kfac_scalings(name):
    """Cross-check of the two dense damping formulas: with ``s = T S_A ⊗ S_B`` in place of ``s*``,
    the EKFAC "factored" denominator ``s + ε + √ε (T S_A ⊕ S_B)`` is KFAC's
    ``(T A + √ε I) ⊗ (B + √ε I)``."""
    for layer in ref.PROBLEMS[name].layers.values():
        eigvals_a, basis_a = np.linalg.eigh(layer.factor_a)
        eigvals_b, basis_b = np.linalg.eigh(layer.factor_b)
        s = layer.positions * np.outer(eigvals_a, eigvals_b)
        s += DAMPING + np.sqrt(DAMPING) * np.add.outer(layer.positions * eigvals_a, eigvals_b)
        update = basis_a @ ((basis_a.T @ layer.grad @ basis_b) / s) @ basis_b.T
        expected = reference_update(layer, "kfac", "factored")
        assert ref.relative_error(update, expected) < RTOL


# --- First step: one-batch statistics -------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(ref.PROBLEMS))
def first_updates(request):
    """The library's first update in every mode, ``factor_decay=0``, under one ``jax.jit``."""
    problem = ref.PROBLEMS[request.param]
    blocks = problem_blocks(problem)
    txs = {
        f"{method}-{mode}": make_tx(
            method, blocks=blocks, damping=DAMPING, factor_decay=0.0, damping_mode=mode
        )
        for method, mode in MODES
    }

    @jax.jit
    def updates(params, x, y):
        _, grads, stats = ek.value_grad_and_stats(problem.loss_fn)(params, x, y)
        return {
            key: tx.update(grads, tx.init(params), params, stats=stats)[0]
            for key, tx in txs.items()
        }

    return problem, updates(problem.params, *problem.data)


@pytest.mark.parametrize("method, damping_mode", MODES)
def test_first_update_matches_dense_reference(first_updates, method, damping_mode):
    """First update, ``factor_decay=0``: EKFAC ``scaling="batch"`` is
    ``(F_EKFAC + ε I)⁻¹ g`` (or the factored damping), KFAC is ``(T A ⊗ B + ε I)⁻¹ g`` or
    ``((T A + √ε I) ⊗ (B + √ε I))⁻¹ g``, for every layer (dense, conv, shared, sequence)."""
    problem, all_updates = first_updates
    updates = all_updates[f"{method}-{damping_mode}"]
    assert jax.tree.structure(updates) == jax.tree.structure(problem.params)
    for path, layer in problem.layers.items():
        expected = reference_update(layer, method, damping_mode)
        actual = ref.block_matrix(updates[path])
        assert ref.relative_error(actual, expected) < RTOL, path
        # The preconditioning is not the identity: the check above is not vacuous.
        assert ref.relative_error(layer.grad, expected) > 1e-2, path


# --- Several steps: amortized basis, averaged factors, running scalings ---------------------------


def batches(problem, steps: int):
    return [problem.batch(100 + k) for k in range(steps)]


def descend(params, updates: dict, learning_rate: float):
    """``params - learning_rate * updates`` for ``updates`` given as block matrices per layer
    (in numpy: eager JAX ops would each compile)."""
    return {
        path: {
            key: np.asarray(value)
            - learning_rate * ref.from_block_matrix(updates[path], layer)[key]
            for key, value in layer.items()
        }
        for path, layer in params.items()
    }


@pytest.mark.parametrize("name", ["mlp", "sequence"])
def test_ekfac_running_scalings_replay(name):
    """EKFAC-ra over 5 steps, ``basis_update_every=3``, ``factor_decay=0.5``,
    ``scaling_decay=0.7``, replayed from the documented recursion:

    - ``A_k = Σ_j β^{k-j} A(batch_j) / Σ_j β^{k-j}`` (and ``B_k``), the debiased average;
    - eigenbasis of ``A_k``, ``B_k`` on steps 0 and 3 only, where ``s`` restarts from
      ``T S_A ⊗ S_B``;
    - every step ``s ← d s + (1 - d) N (U_Aᵀ g U_B)²`` and
      ``update = U_A [(U_Aᵀ g U_B) / (s + ε)] U_Bᵀ``.

    The parameters move by the reference update between steps, so each step has a new gradient.
    """
    problem = ref.PROBLEMS[name]
    factor_decay, scaling_decay, steps, every, learning_rate = 0.5, 0.7, 5, 3, 0.05
    tx = ek.scale_by_ekfac(
        blocks=problem_blocks(problem),
        damping=DAMPING,
        basis_update_every=every,
        factor_decay=factor_decay,
        scaling="running",
        scaling_decay=scaling_decay,
    )
    step = library_step(tx, problem.loss_fn)
    params = problem.params
    state = jax.jit(tx.init)(params)
    history = {path: [] for path in params}  # the one-batch factors (A_j, B_j) of each step
    basis, scalings = {}, {}
    for k, (x, y) in enumerate(batches(problem, steps)):
        updates, state = step(params, state, x, y)
        expected = {}
        for path, layer in problem.references(params, x, y).items():
            history[path].append((layer.factor_a, layer.factor_b))
            weights = factor_decay ** np.arange(k, -1, -1.0)  # β^{k-j}, j = 0..k
            weights /= weights.sum()
            factor_a = sum(w * a for w, (a, _) in zip(weights, history[path], strict=True))
            factor_b = sum(w * b for w, (_, b) in zip(weights, history[path], strict=True))
            if k % every == 0:
                eigvals_a, basis_a = np.linalg.eigh(factor_a)
                eigvals_b, basis_b = np.linalg.eigh(factor_b)
                basis[path] = basis_a, basis_b
                scalings[path] = layer.positions * np.outer(eigvals_a, eigvals_b)
            basis_a, basis_b = basis[path]
            grad_kfe = basis_a.T @ layer.grad @ basis_b
            batch_size = layer.per_example.shape[0]
            scalings[path] = (
                scaling_decay * scalings[path] + (1 - scaling_decay) * batch_size * grad_kfe**2
            )
            denominator = scalings[path] + DAMPING
            assert denominator.max() / denominator.min() < MAX_COND  # the diagonal's condition
            expected[path] = basis_a @ (grad_kfe / denominator) @ basis_b.T
            actual = ref.block_matrix(updates[path])
            assert ref.relative_error(actual, expected[path]) < RTOL, (k, path)
        params = descend(params, expected, learning_rate)


@pytest.mark.parametrize("name", ["mlp", "sequence"])
def test_ekfac_batch_scalings_in_stale_basis(name):
    """With the basis amortized (``basis_update_every=2``), EKFAC ``scaling="batch"`` at step 1
    uses ``s*`` of step 1's batch in the eigenbasis of step 0's factors:
    ``((U_A ⊗ U_B) diag(s*) (U_A ⊗ U_B)ᵀ + ε I)⁻¹ g`` with ``U`` from step 0."""
    problem = ref.PROBLEMS[name]
    tx = ek.scale_by_ekfac(
        blocks=problem_blocks(problem),
        damping=DAMPING,
        basis_update_every=2,
        factor_decay=0.5,
        scaling="batch",
    )
    step = library_step(tx, problem.loss_fn)
    params = problem.params
    (x0, y0), (x1, y1) = batches(problem, 2)

    updates, state = step(params, jax.jit(tx.init)(params), x0, y0)
    first = problem.references(params, x0, y0)
    expected = {path: reference_update(layer, "ekfac", "tikhonov") for path, layer in first.items()}
    for path in first:
        assert ref.relative_error(ref.block_matrix(updates[path]), expected[path]) < RTOL

    params = descend(params, expected, 0.05)
    updates, state = step(params, state, x1, y1)
    for path, layer in problem.references(params, x1, y1).items():
        stale = ref.ekfac_matrix(
            layer.per_example,
            first[path].factor_a,  # the basis of step 0's factors
            first[path].factor_b,
            layer.positions,
            DAMPING,
            "tikhonov",
        )
        assert np.linalg.cond(stale) < MAX_COND
        expected = ref.solve(stale, layer.grad)
        assert ref.relative_error(ref.block_matrix(updates[path]), expected) < RTOL, path
        # The stale basis matters: a fresh basis (step 1's factors) gives another update.
        fresh = reference_update(layer, "ekfac", "tikhonov")
        assert ref.relative_error(fresh, expected) > 1e-4, path


# --- max_factor_dim: a side above the cap keeps its diagonal --------------------------------------

# Per problem, two caps: the first leaves some sides whole and caps others (input side only,
# output side only), the second caps nearly every side, both sides of most layers.
CAPS = {"mlp": (6, 2), "cnn": (16, 3), "shared": (8, 7), "sequence": (5, 2)}


def capped(layer: ref.LayerReference, cap: int) -> ref.LayerReference:
    """The layer with each factor above ``cap`` replaced by its diagonal: the reference then
    builds ``U = I`` on that side (``eigh`` of a diagonal matrix) and ``S = diag(factor)``."""

    def keep(factor):
        return np.diag(np.diag(factor)) if len(factor) > cap else factor

    return dataclasses.replace(layer, factor_a=keep(layer.factor_a), factor_b=keep(layer.factor_b))


@pytest.mark.parametrize("name", sorted(ref.PROBLEMS))
def test_capped_factors_match_dense_reference(name):
    """``max_factor_dim``: first update, ``factor_decay=0``, every method and damping mode,
    against the dense reference built from the same factors with each side above the cap
    replaced by its diagonal (EKFAC: ``s*`` in the basis ``U_A ⊗ I``, ``I ⊗ U_B`` or ``I``;
    KFAC: ``T diag(A) ⊗ B`` and the like). The state holds the diagonal as a vector and no
    basis. Not vacuous: every capped layer's reference differs from the uncapped one."""
    problem = ref.PROBLEMS[name]
    blocks = problem_blocks(problem)
    for cap in CAPS[name]:
        txs = {
            (method, mode): make_tx(
                method,
                blocks=blocks,
                damping=DAMPING,
                factor_decay=0.0,
                damping_mode=mode,
                max_factor_dim=cap,
            )
            for method, mode in MODES
        }

        @jax.jit
        def updates(params, x, y, txs=txs):
            _, grads, stats = ek.value_grad_and_stats(problem.loss_fn)(params, x, y)
            return {
                key: tx.update(grads, tx.init(params), params, stats=stats)
                for key, tx in txs.items()
            }

        out = updates(problem.params, *problem.data)
        sides = set()
        for (method, mode), (update, state) in out.items():
            for path, layer in problem.layers.items():
                a, b = layer.factor_a.shape[0], layer.factor_b.shape[0]
                block = state.blocks[path]
                assert block.factor_a.ndim == (1 if a > cap else 2), (path, cap)
                assert block.factor_b.ndim == (1 if b > cap else 2), (path, cap)
                assert (block.basis_a is None) == (a > cap) and (block.basis_b is None) == (b > cap)
                expected = reference_update(capped(layer, cap), method, mode)
                actual = ref.block_matrix(update[path])
                assert ref.relative_error(actual, expected) < RTOL, (path, cap, method, mode)
                if a > cap or b > cap:
                    sides.add((a > cap, b > cap))
                    uncapped = reference_update(layer, method, mode)
                    assert ref.relative_error(uncapped, expected) > 1e-3, (path, cap)
        assert sides, (name, cap)  # the cap applies somewhere


def test_max_factor_dim_must_be_a_positive_integer():
    blocks = problem_blocks(ref.PROBLEMS["mlp"])
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_factor_dim must be an integer >= 1 or None"):
            ek.scale_by_ekfac(blocks=blocks, max_factor_dim=bad)
        with pytest.raises(ValueError, match="max_factor_dim"):
            ek.kfac(0.1, blocks=blocks, max_factor_dim=bad)
    # Through optax.inject_hyperparams: left out, it stays static (default None); given, it
    # must be static, and a traced one names the way out.
    injected = optax.inject_hyperparams(ek.ekfac)(0.1, blocks=blocks)
    jax.jit(injected.init)(ref.PROBLEMS["mlp"].params)
    traced = optax.inject_hyperparams(ek.ekfac)(0.1, blocks=blocks, max_factor_dim=4)
    with pytest.raises(TypeError, match=r"static_args=\('max_factor_dim',\)"):
        jax.jit(traced.init)(ref.PROBLEMS["mlp"].params)
    static = optax.inject_hyperparams(ek.ekfac, static_args="max_factor_dim")
    state = static(0.1, blocks=blocks, max_factor_dim=4).init(ref.PROBLEMS["mlp"].params)
    assert state.inner_state[0].blocks["Dense_0"].basis_b is None  # 6 x 7: output side capped


# --- damping_mode="relative": a fraction of each block's mean scaling ----------------------------


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_relative_damping_is_tikhonov_with_each_blocks_mean_scaling(first_updates, method):
    """``damping_mode="relative"`` with ``λ = 0.1`` is the Tikhonov update of each layer with
    its own ``ε = λ · mean(s)``, computed here without an eigendecomposition (the mean of the
    scalings does not depend on the basis): EKFAC's ``mean(s*) = mean_n ||G_n||² / (a b)``,
    KFAC's ``mean(T S_A ⊗ S_B) = T tr(A) tr(B) / (a b)``. Layers whose curvature differs get
    different ``ε`` (asserted), so the comparison is not the absolute damping's."""
    problem, _ = first_updates
    fraction = 0.1
    blocks = problem_blocks(problem)
    tx = make_tx(method, blocks=blocks, damping=fraction, factor_decay=0.0, damping_mode="relative")
    step = library_step(tx, problem.loss_fn)
    updates, _ = step(problem.params, tx.init(problem.params), *problem.data)
    dampings = {}
    for path, layer in problem.layers.items():
        a, b = layer.grad.shape
        if method == "ekfac":
            mean = np.mean(np.sum(layer.per_example**2, axis=(1, 2))) / (a * b)
            matrix = ref.ekfac_matrix(
                layer.per_example,
                layer.factor_a,
                layer.factor_b,
                layer.positions,
                fraction * mean,
                "tikhonov",
            )
        else:
            mean = layer.positions * np.trace(layer.factor_a) * np.trace(layer.factor_b) / (a * b)
            matrix = ref.kfac_matrix(
                layer.factor_a, layer.factor_b, layer.positions, fraction * mean, "tikhonov"
            )
        dampings[path] = fraction * mean
        expected = ref.solve(matrix, layer.grad)
        assert ref.relative_error(ref.block_matrix(updates[path]), expected) < RTOL, path
    if len(dampings) > 1:
        values = sorted(dampings.values())
        assert values[-1] > 1.5 * values[0], dampings


def test_relative_damping_must_be_positive():
    problem = ref.PROBLEMS[sorted(ref.PROBLEMS)[0]]
    blocks = problem_blocks(problem)
    with pytest.raises(ValueError, match="damping must be > 0 with damping_mode='relative'"):
        ek.scale_by_ekfac(blocks=blocks, damping=0.0, damping_mode="relative")
    with pytest.raises(ValueError, match="damping must be >= 0, got -0.1"):
        ek.scale_by_kfac(blocks=blocks, damping=-0.1, damping_mode="relative")
    ek.scale_by_kfac(blocks=blocks, damping=optax.constant_schedule(0.1), damping_mode="relative")
